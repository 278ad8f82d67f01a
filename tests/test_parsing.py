"""Document parsing: real small files of every format, made here (PDF with reportlab, DOCX with
python-docx, the text formats as strings), parsed from bytes; and the parser's sandbox (a child
process under time and memory limits) against real hostile files."""

from __future__ import annotations

import asyncio
import functools
import io
import os
import random
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import docx
import pytest
from reportlab.lib import pdfencrypt
from reportlab.pdfgen import canvas

from services.ingestor import parse_worker
from services.ingestor.chunking import SectionChunk, chunk_sections
from services.ingestor.parse_worker import ParseLimits, parse_file
from services.ingestor.parsing import (
    SUPPORTED_CONTENT_TYPES,
    ParsedDocument,
    ParseError,
    Section,
    detect_format,
    parse_document,
)

DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


# ----------------------------------------------------------------------------- file makers


def make_pdf(pages: list[str | None], title: str | None = None, encrypt: object = None) -> bytes:
    """One page per entry; None makes a page with only a drawing (no text), like a scan."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, encrypt=encrypt)
    if title is not None:
        pdf.setTitle(title)
    for text in pages:
        if text is None:
            pdf.rect(100, 100, 200, 300, fill=1)
        else:
            y = 720
            for line in text.split("\n"):
                pdf.drawString(72, y, line)
                y -= 16
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def make_docx(core_title: str = "Travel policy") -> bytes:
    document = docx.Document()
    document.core_properties.title = core_title
    document.add_paragraph("Read this before you book.")
    document.add_heading("Booking", level=1)
    document.add_paragraph("Book through the portal.")
    document.add_heading("Hotels", level=2)
    document.add_paragraph("The hotel limit is 200 EUR a night.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "City"
    table.cell(0, 1).text = "Limit"
    table.cell(1, 0).text = "Paris"
    table.cell(1, 1).text = "250 EUR"
    document.add_heading("Trains", level=2)
    document.add_paragraph("First class above 4 hours.")
    document.add_heading("Expenses", level=1)
    document.add_paragraph("Keep every receipt.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


MARKDOWN = """---
title: front matter is not content
---
Preamble before any heading.

# Travel *Policy*

Read the [booking guide](https://example.com/guide) and **always** use `the portal`.

## Booking

- first item
- second *item*

### Hotels

| City | Limit |
|------|-------|
| Paris | 250 EUR |

```python
# keep code as text
limit = 200
```

<div class="note">Inline <b>HTML</b> note</div>

## Meals

Lunch is covered.
"""

HTML = """<!DOCTYPE html>
<html><head><title>Travel handbook</title>
<style>body { color: red }</style><script>var tracking = "secret";</script></head>
<body>
<nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<h1>Travel <em>policy</em></h1>
<p>Use the <a href="/portal">booking portal</a>.<!-- a comment --></p>
<h2>Hotels</h2>
<p>The limit is <strong>200&nbsp;EUR</strong>.</p>
<ul><li>Paris: 250</li><li>London: 230</li></ul>
<h3>Payments</h3>
<table><tr><th>Card</th><th>Allowed</th></tr><tr><td>Corporate</td><td>yes</td></tr></table>
<h2>Trains</h2>
<pre>line one
  line two</pre>
<footer>Copyright 2025</footer>
<script>alert("no")</script>
</body></html>
"""


# ----------------------------------------------------------------------------- detect_format


@pytest.mark.parametrize(
    ("file_name", "content_type", "expected"),
    [
        ("report.pdf", "", "pdf"),
        ("REPORT.PDF", "", "pdf"),
        ("letter.docx", "", "docx"),
        ("notes.md", "", "markdown"),
        ("notes.markdown", "", "markdown"),
        ("page.html", "", "html"),
        ("page.htm", "", "html"),
        ("readme.txt", "", "text"),
        ("readme.text", "", "text"),
        ("dir.v2/notes.md", "", "markdown"),
        ("no-extension", "application/pdf", "pdf"),
        ("notes.txt", "application/pdf", "pdf"),  # a known content type wins over the extension
        ("page.txt", "text/html; charset=utf-8", "html"),  # parameters are ignored
        ("x", "Text/Markdown", "markdown"),
        ("x", DOCX_TYPE, "docx"),
        ("notes.md", "application/octet-stream", "markdown"),  # unknown type: extension decides
    ],
)
def test_detect_format(file_name: str, content_type: str, expected: str) -> None:
    assert detect_format(file_name, content_type) == expected


def test_every_supported_content_type_maps_to_a_parsed_format() -> None:
    assert set(SUPPORTED_CONTENT_TYPES.values()) == {"pdf", "docx", "markdown", "html", "text"}


@pytest.mark.parametrize(("file_name", "content_type"), [("photo.png", "image/png"), ("archive", ""), ("a.doc", "")])
def test_unsupported_types_are_named_in_the_error(file_name: str, content_type: str) -> None:
    with pytest.raises(ParseError, match="unsupported file type") as caught:
        detect_format(file_name, content_type)
    assert file_name in str(caught.value)
    assert content_type in str(caught.value)
    with pytest.raises(ParseError, match="unsupported file type"):
        parse_document(b"some bytes", file_name, content_type)


# ----------------------------------------------------------------------------- PDF


def test_pdf_pages_are_numbered_from_one_and_keep_the_metadata_title() -> None:
    parsed = parse_document(make_pdf(["Hotels cost 200 EUR.", "Trains are second class."], title="Travel policy"), "p.pdf")
    assert parsed.format == "pdf"
    assert parsed.title == "Travel policy"
    assert parsed.sections == [
        Section("Hotels cost 200 EUR.", page=1),
        Section("Trains are second class.", page=2),
    ]


def test_pdf_pages_without_text_are_skipped_but_keep_numbering() -> None:
    parsed = parse_document(make_pdf(["First page.", None, "Third page."]), "p.pdf")
    assert [(s.page, s.text) for s in parsed.sections] == [(1, "First page."), (3, "Third page.")]
    assert parsed.title is None  # reportlab writes "untitled": a placeholder, not a title


def test_pdf_keeps_lines_of_a_page() -> None:
    parsed = parse_document(make_pdf(["Line one.\nLine two."]), "p.pdf")
    assert parsed.sections[0].text == "Line one.\nLine two."


def test_pdf_without_text_is_reported_as_probably_scanned() -> None:
    with pytest.raises(ParseError, match=r"'scan\.pdf' has no extractable text \(scanned PDF\?\)"):
        parse_document(make_pdf([None, None]), "scan.pdf")


def test_pdf_with_a_user_password_is_refused() -> None:
    with pytest.raises(ParseError, match="password-protected"):
        parse_document(make_pdf(["Secret."], encrypt="s3cret"), "locked.pdf")


def test_pdf_with_only_an_owner_password_opens() -> None:
    encryption = pdfencrypt.StandardEncryption("", ownerPassword="owner", canPrint=0)
    parsed = parse_document(make_pdf(["Readable by anyone."], encrypt=encryption), "restricted.pdf")
    assert [s.text for s in parsed.sections] == ["Readable by anyone."]


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_pdf_is_a_parse_error(cut: float) -> None:
    data = make_pdf(["Page one.", "Page two."])
    with pytest.raises(ParseError, match="damaged or truncated"):
        parse_document(data[: int(len(data) * cut)], "cut.pdf")


def test_garbage_named_pdf_is_a_parse_error() -> None:
    garbage = random.Random(1).randbytes(4000)
    with pytest.raises(ParseError, match="not a PDF"):
        parse_document(garbage, "fake.pdf")
    with pytest.raises(ParseError, match="damaged or truncated"):
        parse_document(b"%PDF-1.7\n" + garbage, "fake.pdf")


# ----------------------------------------------------------------------------- DOCX


def test_docx_groups_paragraphs_under_heading_paths_and_includes_tables() -> None:
    parsed = parse_document(make_docx(), "policy.docx")
    assert parsed.format == "docx"
    assert parsed.title == "Travel policy"
    assert parsed.sections == [
        Section("Read this before you book.", heading=None),
        Section("Book through the portal.", heading="Booking"),
        Section("The hotel limit is 200 EUR a night.\n\nCity | Limit\n\nParis | 250 EUR", heading="Booking > Hotels"),
        Section("First class above 4 hours.", heading="Booking > Trains"),
        Section("Keep every receipt.", heading="Expenses"),
    ]


def test_docx_title_style_is_the_title_when_core_title_is_empty() -> None:
    document = docx.Document()
    document.add_heading("Expense guide", level=0)  # style "Title"
    document.add_paragraph("Keep receipts.")
    document.add_heading("Meals", level=1)
    document.add_paragraph("Lunch is covered.")
    buffer = io.BytesIO()
    document.save(buffer)
    parsed = parse_document(buffer.getvalue(), "guide.docx")
    assert parsed.title == "Expense guide"
    assert [(s.heading, s.text) for s in parsed.sections] == [
        ("Expense guide", "Keep receipts."),
        ("Expense guide > Meals", "Lunch is covered."),
    ]


def test_corrupt_docx_is_a_parse_error() -> None:
    data = make_docx()
    with pytest.raises(ParseError, match="not a readable Word"):
        parse_document(data[: len(data) // 2], "cut.docx")
    with pytest.raises(ParseError, match="not a Word"):
        parse_document(random.Random(2).randbytes(3000), "fake.docx")
    with pytest.raises(ParseError, match=r"old Word \(\.doc\)"):
        parse_document(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(500), "old.docx")


def test_a_zip_that_is_not_a_word_document_is_a_parse_error() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "hello")
    with pytest.raises(ParseError, match="not a readable Word"):
        parse_document(buffer.getvalue(), "zip.docx")


# ----------------------------------------------------------------------------- Markdown


def test_markdown_sections_follow_headings_and_markup_is_stripped() -> None:
    parsed = parse_document(MARKDOWN.encode(), "policy.md")
    assert parsed.format == "markdown"
    assert parsed.title == "Travel Policy"
    assert [s.heading for s in parsed.sections] == [
        None,
        "Travel Policy",
        "Travel Policy > Booking",
        "Travel Policy > Booking > Hotels",
        "Travel Policy > Meals",
    ]
    by_heading = {s.heading: s.text for s in parsed.sections}
    assert by_heading[None] == "Preamble before any heading."
    assert by_heading["Travel Policy"] == "Read the booking guide and always use the portal."
    assert by_heading["Travel Policy > Booking"] == "- first item\n\n- second item"
    hotels = by_heading["Travel Policy > Booking > Hotels"]
    assert "City | Limit\n\nParis | 250 EUR" in hotels
    assert "# keep code as text\nlimit = 200" in hotels
    assert "Inline HTML note" in hotels
    everything = "\n".join(s.text for s in parsed.sections)
    for markup in ("**", "](", "`", "<b>", "front matter", "|---", "https://example.com"):
        assert markup not in everything
    assert all(s.page is None for s in parsed.sections)


def test_markdown_title_is_the_first_h1_only() -> None:
    parsed = parse_document(b"## Not a title\n\ntext\n\n# Real title\n\nmore", "n.md")
    assert parsed.title == "Real title"
    assert parse_document(b"just text", "n.md").title is None


def test_ordered_list_items_keep_their_numbers() -> None:
    parsed = parse_document(b"1. first\n2. second\n", "n.md")
    assert parsed.sections[0].text == "1. first\n\n2. second"


# ----------------------------------------------------------------------------- HTML


def test_html_drops_chrome_and_splits_at_headings() -> None:
    parsed = parse_document(HTML.encode(), "handbook.html")
    assert parsed.format == "html"
    assert parsed.title == "Travel handbook"
    assert parsed.sections == [
        Section("Use the booking portal.", heading="Travel policy"),
        Section("The limit is 200 EUR.\n\n- Paris: 250\n\n- London: 230", heading="Travel policy > Hotels"),
        Section("Card | Allowed\n\nCorporate | yes", heading="Travel policy > Hotels > Payments"),
        Section("line one\n  line two", heading="Travel policy > Trains"),
    ]
    everything = "\n".join(s.text for s in parsed.sections)
    for dropped in ("tracking", "color", "Home", "Copyright", "alert", "a comment", "<"):
        assert dropped not in everything


def test_html_title_falls_back_to_first_h1() -> None:
    parsed = parse_document(b"<body><h2>Sub</h2><p>x</p><h1>Main</h1><p>y</p></body>", "p.htm")
    assert parsed.title == "Main"


def test_html_honours_a_declared_legacy_charset() -> None:
    data = '<meta charset="windows-1252"><p>Caf\u00e9 cr\u00e8me</p>'.encode("cp1252")
    assert parse_document(data, "p.html").sections[0].text == "Caf\u00e9 cr\u00e8me"


# ----------------------------------------------------------------------------- plain text


def test_text_is_decoded_with_bom_and_line_endings_normalised() -> None:
    parsed = parse_document("\ufeffHello\r\nworld.\r\n\r\n\r\n\r\nBye.\r\n".encode(), "a.txt")
    assert parsed == ParsedDocument(format="text", title=None, sections=[Section("Hello\nworld.\n\nBye.")])


def test_text_falls_back_to_cp1252_and_reads_utf16_with_bom() -> None:
    assert parse_document("na\u00efve \u20ac5".encode("cp1252"), "a.txt").sections[0].text == "na\u00efve \u20ac5"
    assert parse_document("\u00fcber".encode("utf-16"), "a.txt").sections[0].text == "\u00fcber"


def test_binary_named_txt_is_refused() -> None:
    with pytest.raises(ParseError, match="'blob.txt' looks binary"):
        parse_document(b"abc\x00def", "blob.txt")
    with pytest.raises(ParseError, match="looks binary"):
        parse_document(bytes(range(1, 32)) * 20, "blob.txt")  # control characters, no NUL


def test_whitespace_only_text_has_no_text() -> None:
    with pytest.raises(ParseError, match="has no text"):
        parse_document(b"  \n\n \t\n", "blank.txt")


# ----------------------------------------------------------------------------- every format


FORMATS = [("x.pdf", ""), ("x.docx", ""), ("x.md", ""), ("x.html", ""), ("x.txt", ""), ("x", "application/pdf")]


@pytest.mark.parametrize(("file_name", "content_type"), FORMATS)
def test_empty_files_are_refused_by_name(file_name: str, content_type: str) -> None:
    with pytest.raises(ParseError, match=f"'{file_name}' is empty"):
        parse_document(b"", file_name, content_type)


@pytest.mark.parametrize(("file_name", "content_type"), FORMATS)
@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_always_a_parse_error(file_name: str, content_type: str, seed: int) -> None:
    garbage = random.Random(seed).randbytes(2048)
    with pytest.raises(ParseError):
        parse_document(garbage, file_name, content_type)


def test_file_name_is_only_a_label() -> None:
    parsed = parse_document(b"# T\n\nbody", "/no/such/dir/notes.md")
    assert parsed.title == "T"
    assert parsed.sections == [Section("body", heading="T")]


# ----------------------------------------------------------------------------- chunk_sections


def test_chunk_sections_keeps_page_and_heading_and_never_merges_sections() -> None:
    sections = [
        Section("Short page one.", page=1),
        Section(" ".join(f"Sentence {i} on page two." for i in range(12)), page=2),
        Section("", page=3),
        Section("Under a heading.", heading="Booking > Hotels"),
    ]
    chunks = chunk_sections(sections, size=80, overlap=20)
    assert chunks[0] == SectionChunk("Short page one.", 1, None)  # not merged with page 2
    page_two = [c for c in chunks if c.page == 2]
    assert len(page_two) > 2
    assert all(len(c.text) <= 80 and c.heading is None for c in page_two)
    assert all(c.page != 3 for c in chunks)
    assert chunks[-1] == SectionChunk("Under a heading.", None, "Booking > Hotels")
    assert len(chunks) == 1 + len(page_two) + 1


def test_chunk_sections_on_a_parsed_pdf() -> None:
    parsed = parse_document(make_pdf(["Alpha fact.", "Beta fact."]), "p.pdf")
    assert chunk_sections(parsed.sections, size=200, overlap=20) == [
        SectionChunk("Alpha fact.", 1, None),
        SectionChunk("Beta fact.", 2, None),
    ]


def test_chunk_sections_rejects_overlap_not_smaller_than_size() -> None:
    with pytest.raises(ValueError, match="overlap"):
        chunk_sections([], size=50, overlap=50)


# ----------------------------------------------------------------------------- hostile files


@functools.cache
def docx_zip_bomb(inflated_mib: int = 512) -> bytes:
    """A real Word document whose document.xml inflates from about 1 KB per MiB to
    `inflated_mib` MiB of one paragraph's text: python-docx reads the whole part into memory."""
    document = docx.Document()
    document.add_paragraph("hello")
    buffer = io.BytesIO()
    document.save(buffer)
    original = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        for item in original.infolist():
            if item.filename != "word/document.xml":
                archive.writestr(item, original.read(item.filename))
                continue
            with archive.open("word/document.xml", "w", force_zip64=True) as part:
                part.write(
                    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document xmlns:w='
                    b'"http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r><w:t>'
                )
                block = b"a" * (1 << 20)
                for _ in range(inflated_mib):
                    part.write(block)
                part.write(b"</w:t></w:r></w:p></w:body></w:document>")
    return bomb.getvalue()


def html_memory_hog(tags: int = 250_000) -> bytes:
    """2 MB of HTML that BeautifulSoup turns into a quarter of a million tag objects (over 300 MB)."""
    return b"<html><body>" + b"<b>x</b>" * tags + b"</body></html>"


@functools.cache
def slow_pdf(pages: int = 400) -> bytes:
    """A valid PDF of 400 full pages: pypdf takes some seconds to extract its text."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer)
    for page in range(pages):
        for line in range(50):
            pdf.drawString(40, 800 - line * 15, f"Page {page} line {line}: the travel policy explains hotels and trains.")
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the sandbox

SANDBOX = ParseLimits(timeout_s=60, max_memory_bytes=256 * 1024 * 1024, max_chars=10_000_000)


async def sandboxed(tmp_path: Path, data: bytes, file_name: str, **limits: object) -> ParsedDocument:
    path = tmp_path / "spooled.upload"
    path.write_bytes(data)
    return await parse_file(path, file_name, "", replace(SANDBOX, **limits))  # type: ignore[arg-type]


async def test_the_sandbox_parses_every_format_as_the_parser_does(tmp_path: Path) -> None:
    for name, data in (("t.docx", make_docx()), ("t.pdf", make_pdf(["One.", "Two."], title="Two pages")),
                       ("t.md", b"# Title\n\nBody text."), ("t.html", b"<h1>Gym</h1><p>Kettlebells.</p>")):  # fmt: skip
        assert await sandboxed(tmp_path, data, name) == parse_document(data, name), name


async def test_a_file_that_cannot_be_read_fails_with_the_parsers_reason(tmp_path: Path) -> None:
    with pytest.raises(ParseError, match="^'broken.pdf' is not a PDF file"):
        await sandboxed(tmp_path, b"not a pdf at all", "broken.pdf")
    with pytest.raises(ParseError, match="^the upload of 'gone.txt' is gone from the spool$"):
        await parse_file(tmp_path / "missing.upload", "gone.txt", "", SANDBOX)


async def test_a_docx_zip_bomb_fails_on_the_memory_limit(tmp_path: Path) -> None:
    bomb = docx_zip_bomb()
    assert len(bomb) < 2_000_000  # a small upload ...
    with pytest.raises(ParseError) as raised:  # ... that would need over 512 MiB
        await sandboxed(tmp_path, bomb, "bomb.docx")
    assert str(raised.value) == "'bomb.docx' needs more memory to parse than the limit of 256 MiB (parse_max_memory_bytes)"


async def test_a_file_that_makes_the_parser_use_too_much_memory_fails_on_the_limit(tmp_path: Path) -> None:
    with pytest.raises(ParseError, match=r"^'tags.html' needs more memory to parse than the limit of 128 MiB"):
        await sandboxed(tmp_path, html_memory_hog(), "tags.html", max_memory_bytes=128 * 1024 * 1024)


async def test_a_file_that_parses_longer_than_the_limit_is_stopped_at_the_limit(tmp_path: Path) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(ParseError) as raised:
        await sandboxed(tmp_path, slow_pdf(), "slow.pdf", timeout_s=1.0)
    assert str(raised.value) == "'slow.pdf' took longer to parse than the limit of 1 s (parse_timeout_s)"
    assert asyncio.get_running_loop().time() - started < 30  # stopped there, not when it finished


async def test_text_beyond_what_a_task_may_store_never_leaves_the_child(tmp_path: Path) -> None:
    with pytest.raises(ParseError) as raised:
        await sandboxed(tmp_path, b"word " * 1000, "long.txt", max_chars=500, max_chars_meaning="5 chunks of 100 characters")
    assert str(raised.value) == "'long.txt' has 4999 characters of text, more than one task may store (5 chunks of 100 characters)"


@pytest.mark.parametrize(
    ("child", "message"),
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "the parser was ended by SIGSEGV while reading 'x.pdf'"),
        ("import sys; sys.exit(7)", "the parser stopped with exit status 7 while reading 'x.pdf'"),
        ("print('no json here')", "the parser gave no readable result for 'x.pdf'"),
        # A child its gateway did not stop: its own CPU limit (here a 1 s one) ends it.
        ("import resource; resource.setrlimit(resource.RLIMIT_CPU, (1, 2))\nwhile True: pass",
         "'x.pdf' needs more CPU time to parse than the limit of 60 s (parse_timeout_s)"),
    ],
)  # fmt: skip
async def test_a_child_that_crashes_or_misbehaves_fails_with_a_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, child: str, message: str
) -> None:
    monkeypatch.setattr(parse_worker, "WORKER_COMMAND", [sys.executable, "-c", child])
    with pytest.raises(ParseError) as raised:
        await sandboxed(tmp_path, b"%PDF-1.4", "x.pdf")
    assert str(raised.value) == message


async def test_a_cancelled_parse_kills_its_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    monkeypatch.setattr(parse_worker, "WORKER_COMMAND", [sys.executable, "-c", child])
    parsing = asyncio.create_task(sandboxed(tmp_path, b"text", "x.txt"))
    for _ in range(600):  # the child has started once it wrote its pid
        if pid_file.exists() and pid_file.read_text():
            break
        await asyncio.sleep(0.05)
    pid = int(pid_file.read_text())
    parsing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await parsing
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


async def test_the_event_loop_stays_free_while_a_hostile_file_is_parsed(tmp_path: Path) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(ParseError, match="took longer to parse"):
            await sandboxed(tmp_path, slow_pdf(), "slow.pdf", timeout_s=1.0)
    finally:
        ticker.cancel()
    assert ticks >= 20  # at 10 ms a tick, about a second of parsing left the loop running
