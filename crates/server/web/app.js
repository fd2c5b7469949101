// moeserve's built-in page: a chat playground over /v1/chat/completions and a live
// dashboard over /ui/stats. Plain ES module, no dependencies and no build step; charts
// are drawn by hand on canvases (a line chart and a heatmap need a few dozen lines, less
// than any charting library would weigh).

const $ = (id) => document.getElementById(id);

// ---- API key: asked for when the server answers 401; kept in this tab's memory, or
// in localStorage when the user ticks "remember". Sent only as a Bearer header.
let apiKey = localStorage.getItem("moeserve-key") || "";
let keyWaiters = null;

function askForKey() {
  if (!keyWaiters) {
    keyWaiters = [];
    $("key-input").value = "";
    $("key-dialog").showModal();
  }
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", () => {
  apiKey = $("key-input").value.trim();
  if ($("key-remember").checked) localStorage.setItem("moeserve-key", apiKey);
  else localStorage.removeItem("moeserve-key");
  const waiters = keyWaiters || [];
  keyWaiters = null;
  waiters.forEach((w) => w());
});

async function api(path, options = {}) {
  for (;;) {
    const headers = { ...(options.headers || {}) };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    const r = await fetch(path, { ...options, headers });
    if (r.status !== 401) return r;
    await askForKey();
  }
}

// ---- Tabs.
for (const tab of document.querySelectorAll("nav button")) {
  tab.addEventListener("click", () => show(tab.dataset.view));
}

function show(view) {
  for (const tab of document.querySelectorAll("nav button")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === view));
  }
  $("view-chat").hidden = view !== "chat";
  $("view-dashboard").hidden = view !== "dashboard";
  if (view === "dashboard") startPolling();
  else stopPolling();
}

// ---- The served model.
let modelId = null;
async function loadModel() {
  try {
    const r = await api("/v1/models");
    const body = await r.json();
    modelId = body.data?.[0]?.id ?? null;
    $("model").textContent = modelId ?? "no model";
  } catch (e) {
    $("model").textContent = "unreachable";
  }
}

// ---- Chat.
let history = [];
let controller = null;

const WEATHER_TOOL = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city.",
    parameters: {
      type: "object",
      properties: { city: { type: "string" }, unit: { type: "string", enum: ["celsius", "fahrenheit"] } },
      required: ["city"],
    },
  },
};

function addMessage(role, text = "") {
  const li = document.createElement("li");
  li.className = role;
  const head = document.createElement("div");
  head.className = "role";
  const name = document.createElement("span");
  name.textContent = role;
  const copy = document.createElement("button");
  copy.className = "copy";
  copy.type = "button";
  copy.textContent = "copy";
  head.append(name, copy);
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  reasoning.hidden = true;
  const reasoningSummary = document.createElement("summary");
  reasoningSummary.textContent = "reasoning";
  const reasoningText = document.createElement("div");
  reasoning.append(reasoningSummary, reasoningText);
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text;
  const calls = document.createElement("div");
  const stats = document.createElement("div");
  stats.className = "stats";
  li.append(head, reasoning, body, calls, stats);
  copy.addEventListener("click", () => copyText(body.textContent));
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return { li, reasoning, reasoningText, body, calls, stats };
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard API off localhost over plain HTTP: select it for the user instead.
    const t = document.createElement("textarea");
    t.value = text;
    document.body.append(t);
    t.select();
    document.execCommand("copy");
    t.remove();
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    model: modelId,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value) || undefined,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
  if ($("tools-demo").checked) body.tools = [WEATHER_TOOL];
  const extra = $("extra").value.trim();
  if (extra) Object.assign(body, JSON.parse(extra)); // a bad one is shown as the error
  return body;
}

// One streamed answer into a new assistant message; returns the message it added to the
// history (or null when it failed or was stopped before any output).
async function streamAnswer() {
  const view = addMessage("assistant");
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first = null;
  let last = null;
  let content = "";
  let thought = "";
  let usage = null;
  let finish = null;
  const calls = [];
  try {
    const r = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error?.message || `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
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
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices?.[0];
          if (!choice) continue;
          const d = choice.delta || {};
          const now = performance.now();
          if (d.content || d.reasoning_content || d.tool_calls) {
            first ??= now;
            last = now;
          }
          if (d.reasoning_content) {
            thought += d.reasoning_content;
            view.reasoning.hidden = false;
            view.reasoningText.textContent = thought;
          }
          if (d.content) {
            content += d.content;
            view.body.textContent = content;
          }
          for (const tc of d.tool_calls || []) {
            const c = (calls[tc.index] ??= { id: tc.id, type: "function", function: { name: "", arguments: "" } });
            if (tc.id) c.id = tc.id;
            if (tc.function?.name) c.function.name += tc.function.name;
            if (tc.function?.arguments) c.function.arguments += tc.function.arguments;
            view.calls.innerHTML = "";
            for (const call of calls) {
              const div = document.createElement("div");
              div.className = "tool-call";
              div.textContent = `${call.function.name}(${call.function.arguments})`;
              view.calls.append(div);
            }
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      view.li.scrollIntoView({ block: "end" });
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      view.li.className = "error";
      view.body.textContent = (content ? content + "\n\n" : "") + `Error: ${e.message}`;
      setBusy(false);
      controller = null;
      return null;
    }
  }
  setBusy(false);
  controller = null;
  const parts = [];
  if (first !== null) parts.push(`TTFT ${Math.round(first - started)} ms`);
  const tokens = usage?.completion_tokens;
  if (tokens && first !== null && last > first && tokens > 1) {
    parts.push(`${((tokens - 1) / ((last - first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (tokens) parts.push(`${tokens} tokens`);
  if (finish) parts.push(finish);
  view.stats.textContent = parts.join(" · ");
  if (!content && !calls.length) return null;
  const message = { role: "assistant", content };
  if (calls.length) message.tool_calls = calls;
  return message;
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  history.push({ role: "user", content: text });
  addMessage("user", text);
  let answer = await streamAnswer();
  if (answer) history.push(answer);
  // The tools demo answers its own tool calls with made-up weather, once.
  if (answer?.tool_calls && $("tools-demo").checked) {
    for (const call of answer.tool_calls) {
      let city = "?";
      try {
        city = JSON.parse(call.function.arguments).city ?? "?";
      } catch {}
      const result = JSON.stringify({ city, temperature: 21, unit: "celsius", sky: "clear" });
      history.push({ role: "tool", tool_call_id: call.id, content: result });
      addMessage("tool", result);
    }
    answer = await streamAnswer();
    if (answer) history.push(answer);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && controller) controller.abort();
});
$("stop").addEventListener("click", () => controller?.abort());
$("clear").addEventListener("click", () => {
  controller?.abort();
  history = [];
  $("messages").innerHTML = "";
  $("prompt").focus();
});

// ---- Dashboard: /ui/stats once a second while it is shown; the page keeps the last
// minute of snapshots and computes rates and windows from their differences.
const WINDOW_S = 60;
let snapshots = [];
let timer = null;

function startPolling() {
  if (timer) return;
  poll();
  timer = setInterval(poll, 1000);
}

function stopPolling() {
  clearInterval(timer);
  timer = null;
}

async function poll() {
  let s;
  try {
    const r = await api("/ui/stats");
    if (!r.ok) return;
    s = await r.json();
  } catch {
    return;
  }
  s.t = performance.now() / 1000;
  snapshots.push(s);
  while (snapshots.length > 1 && s.t - snapshots[0].t > WINDOW_S + 0.5) snapshots.shift();
  render();
}

// The value of histogram quantile q from bucket counts (upper bounds `le`, counts per
// bucket), interpolating within a bucket as Prometheus' histogram_quantile does.
function quantile(q, le, counts) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (!total) return null;
  const rank = q * total;
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    if (seen + counts[i] >= rank) {
      const lo = i === 0 ? 0 : le[i - 1];
      const hi = le[i] ?? lo;
      return counts[i] ? lo + (hi - lo) * ((rank - seen) / counts[i]) : hi;
    }
    seen += counts[i];
  }
  return le[le.length - 1];
}

function perBucket(cumulative) {
  return cumulative.map((c, i) => c - (i ? cumulative[i - 1] : 0));
}

const fmtMs = (s) => (s === null ? "–" : `${Math.round(s * 1000)}`);

function render() {
  const now = snapshots[snapshots.length - 1];
  const old = snapshots[0];
  const prev = snapshots[snapshots.length - 2] || now;
  if (now.model) $("model").textContent = now.model;
  const dt = now.t - prev.t;
  const tps = dt > 0 ? (now.generation_tokens - prev.generation_tokens) / dt : 0;
  $("d-tps").textContent = tps.toFixed(1);
  $("d-seqs").textContent = `${now.running} / ${now.waiting}`;
  $("d-kv").textContent = now.kv_blocks_total
    ? `${((100 * now.kv_blocks_used) / now.kv_blocks_total).toFixed(1)}%`
    : "–";
  const prompt = now.prompt_tokens - old.prompt_tokens;
  const hits = now.prefix_cache_hit_tokens - old.prefix_cache_hit_tokens;
  $("d-prefix").textContent = prompt > 0 ? `${((100 * hits) / prompt).toFixed(1)}%` : "–";
  const counts = perBucket(now.ttft.cumulative).map(
    (c, i) => c - (perBucket(old.ttft.cumulative)[i] || 0),
  );
  const qs = [0.5, 0.9, 0.99].map((q) => fmtMs(quantile(q, now.ttft.le, counts)));
  $("d-ttft").textContent = qs.some((q) => q !== "–") ? `${qs.join(" / ")} ms` : "–";

  const series = snapshots.slice(1).map((s, i) => {
    const p = snapshots[i];
    return { t: s.t, tps: s.t > p.t ? (s.generation_tokens - p.generation_tokens) / (s.t - p.t) : 0, run: s.running, wait: s.waiting };
  });
  lineChart($("c-tps"), series, [{ key: "tps", color: "#1f5fbf" }], now.t);
  lineChart($("c-seqs"), series, [{ key: "run", color: "#1f5fbf" }, { key: "wait", color: "#e07b00" }], now.t);
  heatmap(now, old);
}

function lineChart(canvas, series, lines, tNow) {
  const ctx = canvas.getContext("2d");
  const { width: w, height: h } = canvas;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...series.flatMap((p) => lines.map((l) => p[l.key])));
  ctx.fillStyle = "#6b6b70";
  ctx.font = "11px system-ui";
  ctx.fillText(max.toFixed(max < 10 ? 1 : 0), 4, 12);
  for (const l of lines) {
    ctx.strokeStyle = l.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    series.forEach((p, i) => {
      const x = w - ((tNow - p.t) / WINDOW_S) * w;
      const y = h - 4 - (p[l.key] / max) * (h - 20);
      if (i) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
    });
    ctx.stroke();
  }
}

function heatmap(now, old) {
  const canvas = $("heatmap");
  const rows = [];
  now.experts.forEach((row, layer) => {
    if (!row.length) return;
    const base = $("heat-window").value === "minute" ? old.experts[layer] || [] : [];
    rows.push({ layer, counts: row.map((c, e) => c - (base[e] || 0)) });
  });
  const ctx = canvas.getContext("2d");
  if (!rows.length) {
    $("heat-note").textContent = "This model is dense: it has no experts, so there is no routing to show.";
    canvas.hidden = true;
    $("hottest").innerHTML = "";
    return;
  }
  canvas.hidden = false;
  const experts = Math.max(...rows.map((r) => r.counts.length));
  const cell = Math.max(4, Math.min(32, Math.floor(900 / experts)));
  const left = 28;
  const rowH = Math.max(4, Math.min(24, Math.floor(480 / rows.length)));
  canvas.dataset.cells = `${rows.length}x${experts}`;
  // Drawn at the screen's pixel density, shown at its size in CSS pixels.
  const dpr = window.devicePixelRatio || 1;
  const cssW = left + experts * cell;
  const cssH = rows.length * rowH + 14;
  canvas.width = cssW * dpr;
  canvas.height = cssH * dpr;
  canvas.style.width = `${cssW}px`;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const shares = rows.map((r) => {
    const total = r.counts.reduce((a, b) => a + b, 0);
    return r.counts.map((c) => (total ? c / total : 0));
  });
  const maxShare = Math.max(1e-9, ...shares.flat());
  const tokens = rows.reduce((a, r) => a + r.counts.reduce((x, y) => x + y, 0), 0);
  $("heat-note").textContent = `${rows.length} MoE layers × ${experts} experts; ${tokens} routed tokens in this window.`;
  ctx.font = "10px system-ui";
  rows.forEach((r, i) => {
    ctx.fillStyle = "#6b6b70";
    if (rows.length <= 32 || i % 4 === 0) ctx.fillText(String(r.layer), 2, i * rowH + rowH - 3);
    shares[i].forEach((s, e) => {
      // White (no tokens) to dark red (the largest share in the map).
      const v = s / maxShare;
      const g = Math.round(255 * (1 - v));
      ctx.fillStyle = `rgb(${Math.round(255 - 90 * v)}, ${g}, ${g})`;
      ctx.fillRect(left + e * cell, i * rowH, cell - 1, rowH - 1);
    });
  });
  ctx.fillStyle = "#6b6b70";
  ctx.fillText("expert →", left, cssH - 2);
  const hot = rows
    .flatMap((r, i) => r.counts.map((c, e) => ({ layer: r.layer, expert: e, count: c, share: shares[i][e] })))
    .filter((x) => x.count > 0)
    .sort((a, b) => b.share - a.share)
    .slice(0, 5);
  $("hottest").innerHTML = "";
  for (const h of hot) {
    const li = document.createElement("li");
    li.textContent = `layer ${h.layer}, expert ${h.expert}: ${(100 * h.share).toFixed(1)}% of the layer's tokens (${h.count})`;
    $("hottest").append(li);
  }
}
$("heat-window").addEventListener("change", () => snapshots.length && render());

loadModel();
$("prompt").focus();
