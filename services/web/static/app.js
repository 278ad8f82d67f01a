// askmesh's chat page: plain JavaScript over the web tier's HTTP API (no framework, no build).
// It asks through the OpenAI-compatible endpoint (POST /v1/chat/completions, streamed), lists the
// knowledge bases from GET /v1/models, and uploads through the page's own JSON endpoints
// (POST /api/knowledge-bases/{kb}/files, GET /api/tasks/{id}/events).
"use strict";

const KEY_STORAGE = "askmesh-key";
const $ = (id) => document.getElementById(id);
const state = { history: [], busy: false };

// -- the key: from the link's fragment (never sent to the server), kept for this tab only -----
function takeKeyFromFragment() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const key = fragment.get("key");
  if (key) {
    sessionStorage.setItem(KEY_STORAGE, key);
    history.replaceState(null, "", location.pathname + location.search); // out of the address bar
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// -- Server-Sent Events over fetch (EventSource cannot send an Authorization header) ----------
async function* sseBlocks(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      yield buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
    }
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function notice(text) {
  const status = $("kb-status");
  status.textContent = text || "";
  status.hidden = !text;
}

// -- knowledge bases ---------------------------------------------------------------------------
async function loadKnowledgeBases() {
  const select = $("kb");
  const response = await fetch("/v1/models", { headers: authHeaders() });
  if (!response.ok) {
    notice(await errorMessage(response));
    if (response.status === 401) $("key-panel").open = true;
    return;
  }
  notice("");
  const previous = select.value;
  const models = (await response.json()).data.map((model) => model.id).sort();
  select.replaceChildren(...models.map((id) => new Option(id, id)));
  select.value = models.includes(previous) ? previous : models.includes("default") ? "default" : models[0] || "";
  if (!models.length) notice("This key's tenant has no knowledge base yet.");
}

// -- one turn of the conversation -----------------------------------------------------------------
function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function ordinal(n) {
  const suffix = n % 100 >= 11 && n % 100 <= 13 ? "th" : { 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th";
  return `${n}${suffix}`;
}

function openSource(source) {
  $("source-title").textContent = `[${source.number}] ${source.title || source.document_id}`;
  const facts = [["Document", source.document_id]];
  const meta = source.metadata || {};
  if (meta.page !== undefined) facts.push(["Page", String(meta.page)]);
  if (meta.section) facts.push(["Heading", meta.section]);
  facts.push(["Score", Number(source.score).toFixed(3)]);
  facts.push(["In the prompt", source.in_prompt ? "yes" : "no (retrieved, but over the context budget)"]);
  $("source-facts").replaceChildren(...facts.flatMap(([term, detail]) => [element("dt", "", term), element("dd", "", detail)]));
  $("source-text").textContent = source.text;
  $("source").showModal();
}

function citeButton(source) {
  const button = element("button", "cite", `[${source.number}]`);
  button.type = "button";
  button.title = source.title || source.document_id;
  button.setAttribute("aria-label", `Source ${source.number}: ${button.title}`);
  button.addEventListener("click", () => openSource(source));
  return button;
}

// The answer's text with each [n] that names a source as a button that opens it.
function renderAnswer(node, text, sources) {
  const byNumber = new Map(sources.map((source) => [source.number, source]));
  const parts = [];
  let last = 0;
  for (const match of text.matchAll(/\[(\d+)\]/g)) {
    const source = byNumber.get(Number(match[1]));
    if (!source) continue;
    parts.push(document.createTextNode(text.slice(last, match.index)), citeButton(source));
    last = match.index + match[0].length;
  }
  parts.push(document.createTextNode(text.slice(last)));
  node.replaceChildren(...parts);
}

function renderSources(list, sources) {
  list.replaceChildren(
    ...sources.map((source) => {
      const item = element("li");
      const button = citeButton(source);
      button.textContent = `[${source.number}] ${source.title || source.document_id}`;
      const meta = source.metadata || {};
      const where = meta.page !== undefined ? `page ${meta.page}` : meta.section || "";
      item.append(button, element("span", "where", [where, `score ${Number(source.score).toFixed(2)}`].filter(Boolean).join(" · ")));
      if (!source.in_prompt) item.classList.add("unused");
      return item;
    }),
  );
}

function showQueue(text) {
  $("queue").textContent = text || "";
  $("queue").hidden = !text;
}

async function ask(question) {
  const model = $("kb").value;
  const turn = element("li", "turn");
  const answer = element("div", "answer");
  answer.dataset.state = "waiting";
  const sources = element("ol", "sources");
  sources.setAttribute("aria-label", "Sources");
  const meta = element("p", "meta");
  turn.append(element("p", "question", question), answer, sources, meta);
  $("conversation").append(turn);
  $("empty").hidden = true;
  turn.scrollIntoView({ block: "end" });

  const messages = [...state.history, { role: "user", content: question }];
  let text = "";
  let cited = [];
  let finished = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true } }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const block of sseBlocks(response)) {
      if (block.startsWith(": queued ")) {
        const where = JSON.parse(block.slice(": queued ".length));
        showQueue(`Waiting: ${ordinal(where.position)} in line, about ${Math.max(1, Math.round(where.estimated_wait_ms / 1000))} s`);
        continue;
      }
      if (!block.startsWith("data: ")) continue; // other comments
      const data = block.slice("data: ".length);
      if (data === "[DONE]") { finished = true; break; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.sources) {
        cited = chunk.sources;
        renderSources(sources, cited);
        showQueue("");
        answer.dataset.state = "streaming";
      }
      const choice = chunk.choices[0];
      if (choice?.delta?.content) {
        text += choice.delta.content;
        renderAnswer(answer, text, cited);
      }
      if (choice?.finish_reason) meta.textContent = choice.finish_reason === "length" ? "Stopped at the length limit." : "";
      if (chunk.usage) {
        const cached = chunk.usage.prompt_tokens_details?.cached_tokens;
        meta.textContent = [meta.textContent, `${chunk.usage.completion_tokens} tokens written, ${chunk.usage.prompt_tokens} read${cached ? ` (${cached} cached)` : ""}`].filter(Boolean).join(" ");
      }
    }
    if (!finished) throw new Error("The answer was cut off before it finished.");
    answer.dataset.state = "done";
    state.history.push({ role: "user", content: question }, { role: "assistant", content: text });
  } catch (error) {
    answer.dataset.state = "failed";
    const failure = element("p", "error", error.message);
    failure.setAttribute("role", "alert");
    turn.append(failure);
    if (!text) answer.remove();
  } finally {
    showQueue("");
  }
}

// -- uploads -------------------------------------------------------------------------------------
function describeTask(task) {
  const p = task.progress;
  if (task.state === "succeeded") return `${task.file_name} is in ${task.knowledge_base}: ${p.chunks_stored} chunks stored.`;
  if (task.state === "failed") return `${task.file_name} could not be added: ${task.error}`;
  if (task.state === "cancelled") return `${task.file_name}: cancelled.`;
  const counts = p.chunks_total ? ` (${p.chunks_stored} of ${p.chunks_total} chunks)` : "";
  return `${task.file_name}: ${task.state}, ${task.stage}${counts}…`;
}

function showTask(task) {
  $("upload-label").textContent = describeTask(task);
  const progress = $("upload-progress");
  progress.value = task.state === "succeeded" ? 1 : task.progress.chunks_total ? task.progress.chunks_stored / task.progress.chunks_total : 0;
  $("upload-status").dataset.state = task.state;
}

async function upload(file) {
  const status = $("upload-status");
  status.hidden = false;
  status.dataset.state = "sending";
  $("upload-label").textContent = `Sending ${file.name}…`;
  $("upload-progress").removeAttribute("value"); // indeterminate while the bytes go
  const kb = encodeURIComponent($("kb").value);
  const response = await fetch(`/api/knowledge-bases/${kb}/files?name=${encodeURIComponent(file.name)}`, {
    method: "POST",
    headers: { "Content-Type": file.type || "application/octet-stream", ...authHeaders() },
    body: file,
  });
  if (!response.ok) {
    status.dataset.state = "failed";
    $("upload-label").textContent = await errorMessage(response);
    return;
  }
  let { task } = await response.json();
  showTask(task);
  const events = await fetch(`/api/tasks/${encodeURIComponent(task.id)}/events`, { headers: authHeaders() });
  if (!events.ok) {
    $("upload-label").textContent = await errorMessage(events);
    return;
  }
  for await (const block of sseBlocks(events)) {
    if (!block.startsWith("data: ")) continue;
    const data = JSON.parse(block.slice("data: ".length));
    if (data.error) { $("upload-label").textContent = data.error.message; status.dataset.state = "failed"; return; }
    task = data.task;
    showTask(task);
  }
  if (task.state === "succeeded") loadKnowledgeBases();
}

// -- wiring --------------------------------------------------------------------------------------
function setBusy(busy) {
  state.busy = busy;
  $("ask").disabled = busy;
  $("ask").textContent = busy ? "Answering…" : "Ask";
}

function wire() {
  $("ask-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!question || state.busy || !$("kb").value) return;
    $("question").value = "";
    setBusy(true);
    try {
      await ask(question);
    } finally {
      setBusy(false);
      $("question").focus();
    }
  });
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  $("new-chat").addEventListener("click", () => {
    state.history = [];
    $("conversation").replaceChildren();
    $("empty").hidden = false;
    $("question").focus();
  });
  $("kb").addEventListener("change", () => $("new-chat").click()); // a conversation is about one knowledge base
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    $("key").value = "";
    $("key-panel").open = false;
    loadKnowledgeBases();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    loadKnowledgeBases();
  });
  $("upload-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = $("file").files[0];
    if (file) await upload(file);
  });
}

takeKeyFromFragment();
wire();
loadKnowledgeBases();
