// chatlm web chat: talks to this server's /v1/chat/completions with stream: true.
// Model output is untrusted: it is only ever inserted as text nodes (textContent), never as HTML,
// so a reply containing <script> or <img onerror=...> shows those characters and runs nothing.
"use strict";

const $ = (id) => document.getElementById(id);
const view = $("messages");
const input = $("input");

const chat = {
  model: null,
  messages: [],      // {role, content} as sent to the API
  controller: null,  // AbortController of the reply being streamed
  busy: false,
};

// ---------------------------------------------------------------------------------------------
// rendering (text nodes only)

// Inline Markdown: `code` and **bold**; everything else is literal text.
function appendInline(parent, text) {
  const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) parent.appendChild(document.createTextNode(text.slice(last, match.index)));
    const token = match[0];
    const el = document.createElement(token.startsWith("`") ? "code" : "strong");
    el.textContent = token.startsWith("`") ? token.slice(1, -1) : token.slice(2, -2);
    parent.appendChild(el);
    last = match.index + token.length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

// Markdown-safe rendering: fenced code blocks become <pre><code>, paragraphs <p>; all text is
// set through text nodes.
function renderMarkdown(el, text) {
  el.replaceChildren();
  const parts = text.split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/^[^\n]*\n/, (first) => (first.trim().includes(" ") ? first : ""));
      pre.appendChild(code);
      el.appendChild(pre);
      return;
    }
    part.split(/\n{2,}/).forEach((para) => {
      if (!para) return;
      const p = document.createElement("p");
      appendInline(p, para);
      el.appendChild(p);
    });
  });
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("div");
  meta.className = "meta";
  box.append(label, content, meta);
  renderMarkdown(content, text);
  view.appendChild(box);
  view.scrollTop = view.scrollHeight;
  return box;
}

function setState(state) {
  $("state").textContent = state;
}

function setBusy(busy) {
  chat.busy = busy;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("regenerate").disabled = busy || !chat.messages.some((m) => m.role === "user");
}

function settings() {
  const number = (id, parse) => {
    const value = parse($(id).value);
    return Number.isFinite(value) ? value : undefined;
  };
  return {
    temperature: number("temperature", parseFloat),
    top_k: number("top-k", (v) => parseInt(v, 10)),
    max_tokens: number("max-tokens", (v) => parseInt(v, 10)),
  };
}

// ---------------------------------------------------------------------------------------------
// talking to the server

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

// Stream one assistant reply to the conversation in chat.messages.
async function generate() {
  const box = addMessage("assistant", "");
  const content = box.querySelector(".content");
  const meta = box.querySelector(".meta");
  const reply = { role: "assistant", content: "" };
  chat.controller = new AbortController();
  setBusy(true);
  setState("streaming");
  $("speed").textContent = "";
  const body = {
    model: chat.model || undefined,
    messages: chat.messages,
    stream: true,
    stream_options: { include_usage: true },
    ...settings(),
  };
  let tokens = 0;
  let firstAt = null;
  let usage = null;
  let finish = null;
  const started = performance.now();
  const speed = () => {
    if (firstAt === null || tokens < 2) return;
    const seconds = (performance.now() - firstAt) / 1000;
    if (seconds > 0) $("speed").textContent = `${((tokens - 1) / seconds).toFixed(1)} tok/s`;
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: chat.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            tokens += 1;
            if (firstAt === null) firstAt = performance.now();
            reply.content += choice.delta.content;
            renderMarkdown(content, reply.content);
            view.scrollTop = view.scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        speed();
      }
    }
    const n = usage ? usage.completion_tokens : tokens;
    const seconds = (performance.now() - started) / 1000;
    meta.textContent = `${n} tokens, ${seconds.toFixed(2)} s${finish === "length" ? " (max tokens reached)" : ""}`;
    setState("done");
  } catch (e) {
    if (e.name === "AbortError") {
      meta.textContent = "stopped";
      setState("stopped");
    } else {
      box.classList.add("error");
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = `error: ${e.message}`;
      box.appendChild(err);
      setState("error");
    }
  } finally {
    if (reply.content) chat.messages.push(reply);
    chat.controller = null;
    setBusy(false);
  }
}

function send(text) {
  if (chat.busy || !text.trim()) return;
  chat.messages.push({ role: "user", content: text });
  addMessage("user", text);
  input.value = "";
  generate();
}

function stop() {
  if (chat.controller) chat.controller.abort();
}

function regenerate() {
  if (chat.busy) return;
  const boxes = view.querySelectorAll(".message");
  const last = boxes[boxes.length - 1];
  if (last && last.classList.contains("assistant")) {
    last.remove();
    if (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  }
  if (chat.messages.length && chat.messages[chat.messages.length - 1].role === "user") generate();
}

function newChat() {
  stop();
  chat.messages = [];
  view.replaceChildren();
  $("speed").textContent = "";
  setState("ready");
  setBusy(false);
  input.focus();
}

function exportJSON() {
  const record = {
    model: chat.model,
    settings: settings(),
    exported_at: new Date().toISOString(),
    messages: chat.messages,
  };
  const blob = new Blob([JSON.stringify(record, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `chatlm-conversation-${Date.now()}.json`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models");
    const body = await response.json();
    const card = body.data[0];
    chat.model = card.id;
    $("model").textContent = `${card.id} · context ${card.max_model_len}`;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send(input.value);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    send(input.value);
  }
});
$("stop").addEventListener("click", stop);
$("regenerate").addEventListener("click", regenerate);
$("new-chat").addEventListener("click", newChat);
$("export").addEventListener("click", exportJSON);
loadModel();
