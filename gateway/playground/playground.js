// The chatserve playground: a chat with the served model over this gateway's own OpenAI API, and a live view of
// the server. No build step and nothing fetched from elsewhere: the page works where the machine has no internet.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: localStorage.getItem("chatserve.key") || "", history: [], controller: null, timer: null, last: null };

// ------------------------------------------------------------------------------------------------ helpers

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function errorMessage(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  if (response.status === 401) return `The API key was refused: ${message} Enter a valid key above.`;
  return message;
}

function showError(text) {
  const box = $("error");
  box.textContent = text || "";
  box.hidden = !text;
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Markdown enough for chat answers: fenced code, inline code, bold, italics, headings, lists, paragraphs. Everything
// is escaped first, so model output can never inject markup.
function inline(text) {
  return escapeHtml(text)
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
}

function markdown(text) {
  const out = [];
  const parts = text.split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const newline = part.indexOf("\n");
      const code = newline >= 0 ? part.slice(newline + 1) : part;
      out.push(`<pre><code>${escapeHtml(code.replace(/\n$/, ""))}</code></pre>`);
      return;
    }
    let list = null;
    const flush = () => { if (list) { out.push(`</${list}>`); list = null; } };
    for (const block of part.split(/\n{2,}/)) {
      for (const line of block.split("\n")) {
        const bullet = line.match(/^\s*[-*]\s+(.*)$/);
        const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
        const heading = line.match(/^(#{1,4})\s+(.*)$/);
        if (bullet || numbered) {
          const kind = bullet ? "ul" : "ol";
          if (list !== kind) { flush(); out.push(`<${kind}>`); list = kind; }
          out.push(`<li>${inline((bullet || numbered)[1])}</li>`);
        } else if (heading) {
          flush();
          out.push(`<h${heading[1].length + 2}>${inline(heading[2])}</h${heading[1].length + 2}>`);
        } else if (line.trim()) {
          flush();
          out.push(`<p>${inline(line)}</p>`);
        }
      }
      flush();
    }
  });
  return out.join("");
}

function addMessage(role, text) {
  const box = document.createElement("article");
  box.className = `msg ${role}`;
  box.innerHTML = `<div class="role">${role}</div><details class="reasoning" hidden><summary>Reasoning</summary>` +
    `<div class="reasoning-text"></div></details><div class="content"></div><div class="stats"></div>`;
  box.querySelector(".content").innerHTML = markdown(text);
  $("messages").appendChild(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

// ------------------------------------------------------------------------------------------------ models

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) { showError(await errorMessage(response)); return; }
    const models = (await response.json()).data || [];
    select.innerHTML = "";
    for (const m of models) {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      select.appendChild(option);
    }
    showError("");
  } catch (e) {
    showError(`Cannot reach the gateway: ${e}`);
  }
}

// ------------------------------------------------------------------------------------------------ chat

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = {
    model: $("model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value) || 256,
  };
  const mode = $("json-mode").value;
  if (mode === "json_object") body.response_format = { type: "json_object" };
  if (mode === "json_schema") {
    body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse($("json-schema").value) } };
  }
  return body;
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("prompt").disabled = on;
}

async function send(text) {
  showError("");
  let body;
  state.history.push({ role: "user", content: text });
  try {
    body = requestBody();
  } catch (e) {
    state.history.pop();
    showError(`The JSON schema is not valid JSON: ${e.message}`);
    return;
  }
  addMessage("user", text);
  const box = addMessage("assistant", "");
  const content = box.querySelector(".content");
  const reasoningBox = box.querySelector(".reasoning");
  const stats = box.querySelector(".stats");
  let answer = "", reasoning = "", finish = null, usage = null, first = null, chunks = 0;
  const started = performance.now();
  state.controller = new AbortController();
  busy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const delta = choice.delta || {};
            const thought = delta.reasoning_content || delta.reasoning;
            if (thought) { reasoning += thought; reasoningBox.hidden = false; }
            if (delta.content) {
              if (first === null) first = performance.now();
              answer += delta.content;
              chunks += 1;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
        reasoningBox.querySelector(".reasoning-text").innerHTML = markdown(reasoning);
        content.innerHTML = markdown(answer);
        content.dataset.text = answer;
        box.dataset.chunks = String(chunks);
        box.scrollIntoView({ block: "end" });
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      showError(e.message);
      finish = finish || "error";
    }
  } finally {
    busy(false);
    state.controller = null;
  }
  const ended = performance.now();
  const parts = [];
  if (first !== null) parts.push(`first token ${Math.round(first - started)} ms`);
  if (usage) {
    const seconds = first !== null ? (ended - first) / 1000 : 0;
    if (seconds > 0 && usage.completion_tokens > 1) parts.push(`${((usage.completion_tokens - 1) / seconds).toFixed(1)} tokens/s`);
    const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
    parts.push(`prompt ${usage.prompt_tokens} (cached ${cached}) · completion ${usage.completion_tokens} tokens`);
  }
  parts.push(`finish: ${finish || "none"}`);
  stats.textContent = parts.join(" · ");
  box.dataset.finish = finish || "";
  if (answer) state.history.push({ role: "assistant", content: answer });
}

// ------------------------------------------------------------------------------------------------ server view

function parseMetrics(text) {
  const sums = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!match) continue;
    const [, name, , labels, value] = match;
    sums[name] = (sums[name] || 0) + Number(value);
    if (labels && labels.includes('state="serving"')) sums[`${name}:serving`] = Number(value);
    if (name === "chatserve_gateway_requests_total" && labels && /route="(chat|completions|messages|responses)"/.test(labels)) {
      sums.generation_requests = (sums.generation_requests || 0) + Number(value);
    }
  }
  return sums;
}

async function refreshServer() {
  const now = performance.now();
  try {
    const health = await fetch("/health", { headers: headers() });
    $("s-health").textContent = health.ok ? "serving" : `not serving (${health.status})`;
    const models = await fetch("/v1/models", { headers: headers() });
    if (models.ok) {
      const m = ((await models.json()).data || [])[0];
      $("s-model").textContent = m ? m.id : "none";
      $("s-context").textContent = m ? `context ${m.max_model_len} tokens${m.engine ? ` · ${m.engine} engine` : ""}` : "";
    } else {
      $("s-model").textContent = "—";
      $("s-context").textContent = await errorMessage(models);
    }
    const metrics = await fetch("/metrics", { headers: headers() });
    if (metrics.ok) {
      const m = parseMetrics(await metrics.text());
      $("s-replicas").textContent = `${m["chatserve_gateway_backend_replicas:serving"] || 0} of ${m.chatserve_gateway_backend_replicas || 0}`;
      $("s-streams").textContent = String(m.chatserve_gateway_open_streams || 0);
      const prompt = m.chatserve_gateway_prompt_tokens_total || 0;
      const cached = m.chatserve_gateway_cached_prompt_tokens_total || 0;
      $("s-cache").textContent = prompt ? `${Math.round((100 * cached) / prompt)}%` : "—";
      if (state.last) {
        const seconds = (now - state.last.at) / 1000;
        const rate = (name) => Math.max(0, ((m[name] || 0) - (state.last.m[name] || 0)) / seconds);
        $("s-rps").textContent = rate("generation_requests").toFixed(2);
        $("s-tps").textContent = rate("chatserve_gateway_completion_tokens_total").toFixed(1);
      }
      state.last = { at: now, m };
    }
    $("s-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $("s-health").textContent = `unreachable (${e})`;
  }
}

function show(view) {
  const chat = view === "chat";
  $("view-chat").hidden = !chat;
  $("view-server").hidden = chat;
  $("tab-chat").setAttribute("aria-pressed", String(chat));
  $("tab-server").setAttribute("aria-pressed", String(!chat));
  clearInterval(state.timer);
  if (!chat) {
    refreshServer();
    state.timer = setInterval(refreshServer, 3000);
  }
}

// ------------------------------------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    localStorage.setItem("chatserve.key", state.key);
    loadModels();
  });
  for (const [input, output] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
    $(input).addEventListener("input", () => { $(output).textContent = $(input).value; });
  }
  $("json-mode").addEventListener("change", () => { $("json-schema").hidden = $("json-mode").value !== "json_schema"; });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("clear").addEventListener("click", () => { state.history = []; $("messages").innerHTML = ""; showError(""); });
  $("tab-chat").addEventListener("click", () => show("chat"));
  $("tab-server").addEventListener("click", () => show("server"));
  loadModels();
});
