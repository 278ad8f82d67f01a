"""The chat page in a real browser: Debian's chromium, headless, driven by Playwright (never
`playwright install`: the browser is the system's), against the real mesh. It asks, watches the
answer grow token by token, opens a citation, asks a follow-up, sees its place in line while the
mesh is busy, uploads a file and watches it to success, and saves screenshots.

A missing browser fails this test (it is not skipped): `.ci/run` installs chromium."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import WebMesh

pytestmark = pytest.mark.mesh

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and nothing that reaches the network beyond the page's own server.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Where to copy the mid-answer screenshot as well (docs/chat-page.png was made this way).
SCREENSHOT_COPY_ENV = "ASKMESH_PAGE_SCREENSHOT"

# Records each state of the newest answer (its data-state and text) as the DOM changes.
WATCH_ANSWERS = """
() => {
  window.answerStates = [];
  const record = () => {
    const answer = document.querySelector('#conversation > li:last-child .answer');
    if (!answer) return;
    const now = answer.dataset.state + '|' + answer.textContent;
    if (window.answerStates[window.answerStates.length - 1] !== now) window.answerStates.push(now);
  };
  new MutationObserver(record).observe(document.getElementById('conversation'),
    {subtree: true, childList: true, characterData: true, attributes: true});
}
"""
WATCH_UPLOAD = """
() => {
  window.uploadStates = [];
  const status = document.getElementById('upload-status');
  new MutationObserver(() => {
    const now = status.dataset.state + '|' + document.getElementById('upload-label').textContent;
    if (window.uploadStates[window.uploadStates.length - 1] !== now) window.uploadStates.push(now);
  }).observe(status, {subtree: true, childList: true, characterData: true, attributes: true});
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium chromium-driver), as .ci/run does")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, web_mesh: WebMesh) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 900, "height": 720})
    page = context.new_page()
    page.goto(f"{web_mesh.url}/#key={web_mesh.admin_key}")
    yield page
    context.close()


def ask(page: Page, question: str) -> None:
    page.locator("#question").fill(question)
    page.locator("#question").press("Enter")  # the keyboard sends it


def wait_done(page: Page) -> None:
    expect(page.locator("#conversation > li:last-child .answer")).to_have_attribute("data-state", "done", timeout=240_000)


def test_the_page_streams_a_cited_answer_keeps_the_conversation_and_takes_the_key_from_the_link(
    page: Page, web_mesh: WebMesh, tmp_path: Path
) -> None:
    # The key moved from the link into the tab's session storage, and out of the address bar.
    assert page.url == f"{web_mesh.url}/"
    assert page.evaluate("sessionStorage.getItem('askmesh-key')") == web_mesh.admin_key
    expect(page.locator("#kb")).to_have_value("default")
    expect(page.locator("#kb option")).to_have_count(1)  # the operator's tenant (default) only

    requests: list[dict[str, object]] = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.evaluate(WATCH_ANSWERS)
    ask(page, "How many days per year may I work from another country, and who approves it?")
    answer = page.locator("#conversation > li:last-child .answer")
    expect(answer).to_have_attribute("data-state", "streaming", timeout=180_000)
    # Mid-answer for the screenshot, or done already: how long an answer runs is the model's say.
    page.wait_for_function(
        "() => { const a = document.querySelector('#conversation > li:last-child .answer');"
        " return a.textContent.length > 60 || a.dataset.state !== 'streaming'; }",
        timeout=120_000,
    )
    screenshot = tmp_path / "chat-page.png"
    page.screenshot(path=str(screenshot))  # mid-answer
    if os.environ.get(SCREENSHOT_COPY_ENV):
        shutil.copy(screenshot, os.environ[SCREENSHOT_COPY_ENV])
    wait_done(page)

    states = page.evaluate("window.answerStates")
    streamed = [state.split("|", 1)[1] for state in states if state.startswith("streaming|")]
    growing = [text for text in streamed if text]
    assert len(growing) >= 3, f"the answer grew in fewer than three steps: {states}"
    assert all(later.startswith(earlier) and len(later) > len(earlier) for earlier, later in zip(growing, growing[1:]))
    assert states[-1].startswith("done|") and states[-1].split("|", 1)[1].startswith(growing[-1])

    # Citations: numbered, each opens its chunk (document, title, page or heading, score).
    sources = page.locator("#conversation > li:last-child .sources li")
    assert sources.count() >= 1
    expect(sources.first).to_contain_text("[1]")
    sources.first.locator("button").focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#source")
    expect(dialog).to_be_visible()
    expect(page.locator("#source-title")).to_contain_text("[1]")
    expect(page.locator("#source-facts")).to_contain_text("Document")
    expect(page.locator("#source-facts")).to_contain_text("Score")
    assert page.locator("#source-text").text_content()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # A follow-up carries the conversation so far.
    ask(page, "And how many days in a row?")
    wait_done(page)
    expect(page.locator("#conversation > li")).to_have_count(2)
    assert [m["role"] for m in requests[-1]["messages"]] == ["user", "assistant", "user"]  # type: ignore[index]
    assert requests[-1]["messages"][1]["content"] == page.locator("#conversation > li").first.locator(".answer").text_content()  # type: ignore[index]

    # Readable at a phone's width: nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(tmp_path / "chat-page-phone.png"))


def test_a_busy_mesh_shows_the_questions_place_in_line(page: Page, web_mesh: WebMesh) -> None:
    """One answer at a time in this mesh: a question asked while another is answered waits."""
    expect(page.locator("#kb")).to_have_value("default")
    generating = threading.Event()

    def long_answer() -> None:
        body = {"model": "default", "stream": True, "max_tokens": 160,
                "messages": [{"role": "user", "content": "Describe every rule of the travel policy."}]}
        headers = {"Authorization": f"Bearer {web_mesh.admin_key}"}
        with httpx2.stream("POST", f"{web_mesh.api_url}/chat/completions", json=body, headers=headers, timeout=240) as response:
            for data in response.iter_bytes():
                if b'"content":"' in data and b'"content":""' not in data:
                    generating.set()

    other = threading.Thread(target=long_answer)
    other.start()
    try:
        assert generating.wait(180), "the other answer never began"
        ask(page, "What is the hotel limit in Paris?")
        expect(page.locator("#queue")).to_contain_text("1st in line", timeout=60_000)
        wait_done(page)
        expect(page.locator("#queue")).to_be_hidden()
    finally:
        other.join(timeout=300)


def test_an_upload_shows_its_progress_to_success_and_can_then_be_asked_about(page: Page, tmp_path: Path) -> None:
    expect(page.locator("#kb")).to_have_value("default")
    document = tmp_path / "parking-policy.md"
    document.write_text(
        "# Parking policy\n\n## Spaces\n\nEvery employee may park in the blue garage on Elm Street. "
        "Visitors park on level two and register at the front desk.\n\n## Bicycles\n\n"
        "Bicycles go in the locked room behind the garage; the code changes every month.\n",
        encoding="utf-8",
    )
    page.locator("#upload-panel summary").click()
    page.evaluate(WATCH_UPLOAD)
    page.locator("#file").set_input_files(str(document))
    page.locator("#upload-form button").click()
    status = page.locator("#upload-status")
    expect(status).to_have_attribute("data-state", "succeeded", timeout=180_000)
    expect(page.locator("#upload-label")).to_contain_text("parking-policy.md is in default")
    assert page.locator("#upload-progress").evaluate("p => p.value") == 1
    states = [state.split("|", 1)[0] for state in page.evaluate("window.uploadStates")]
    assert states[0] == "sending" and states[-1] == "succeeded"
    assert {"queued", "running"} & set(states), f"no progress was shown before success: {states}"

    ask(page, "Where do visitors park?")
    wait_done(page)
    cited = page.locator("#conversation > li:last-child .sources li", has_text="Parking policy").first
    expect(cited).to_contain_text("Parking policy > ")  # an uploaded file's chunks know their heading
    cited.locator("button").click()
    expect(page.locator("#source-facts")).to_contain_text("HeadingParking policy > ")
    expect(page.locator("#source-text")).to_contain_text("park")
