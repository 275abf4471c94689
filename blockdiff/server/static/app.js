// blockdiff playground: plain JavaScript, no dependencies. It is an ordinary client of this server's
// OpenAI-compatible API: /v1/models, then /v1/chat/completions with stream + stream_drafts, whose draft events
// (the argmax canvas after every denoising step) drive the canvas view and the Sudoku board.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "blockdiff-api-key"; // sessionStorage: the key lives as long as the tab
const state = { model: null, busy: false, messages: [], sudoku: false, keyRequired: false, controller: null };

// ------------------------------------------------------------------ errors and the API key
function showError(msg) {
  const e = $("error");
  e.textContent = msg || "";
  e.hidden = !msg;
}

function authHeaders() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  // A header holds Latin-1 text only: fetch refuses any other character with a TypeError, before any request
  if (key && /[^\x20-\x7e\xa0-\xff]/.test(key)) {
    $("key-form").hidden = false;
    throw new Error("The API key holds characters a browser cannot send in a header (it takes Latin-1 text " +
                    "only): enter it again at the top right.");
  }
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// fetch, with a failure to connect named as such (the browser says only "Failed to fetch"); a fetch that Stop
// aborted stays an AbortError.
async function call(url, opts) {
  try {
    return await fetch(url, opts);
  } catch (e) {
    if (opts && opts.signal && opts.signal.aborted) throw e;
    throw new Error("cannot reach the server (is it still running?)");
  }
}

async function errorText(resp) {
  try {
    const j = await resp.json();
    return (j.error && j.error.message) || JSON.stringify(j);
  } catch (_) {
    return `HTTP ${resp.status}`;
  }
}

async function connect() {
  const resp = await call("/v1/models", { headers: authHeaders() });
  if (resp.status === 401) {
    $("key-form").hidden = false;
    $("model").textContent = "API key needed";
    showError(sessionStorage.getItem(KEY_STORE)
      ? "The server refused this API key: enter the right one at the top right."
      : "This server needs an API key: enter it at the top right (it stays in this tab only).");
    return false;
  }
  if (!resp.ok) {
    showError(await errorText(resp));
    return false;
  }
  const m = (await resp.json()).data[0];
  state.model = m.id;
  $("model").textContent = `${m.id} · canvas ${m.canvas_length} · context ${m.max_model_len}`;
  showError("");
  return true;
}

// Connect first when the page knows no model yet; false (the reason shown above the page) when that fails.
async function ready() {
  if (state.model) return true;
  try {
    return await connect();
  } catch (e) {
    showError(e.message);
    return false;
  }
}

// ------------------------------------------------------------------ settings: only the fields that are set
function numberSetting(id, name, integer) {
  // A number input the browser cannot read ("1e", "--2") has the value "": report it rather than send nothing.
  if ($(id).validity && $(id).validity.badInput) throw new Error(`${name}: enter ${integer ? "a whole number" : "a number"}`);
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const v = Number(raw);
  if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) {
    throw new Error(`${name}: enter ${integer ? "a whole number" : "a number"}, not ${JSON.stringify(raw)}`);
  }
  return v;
}

function requestFields(withSchema) {
  const f = {};
  const put = (k, v) => { if (v !== undefined) f[k] = v; };
  put("max_denoising_steps", numberSetting("set-steps", "max denoising steps", true));
  put("entropy_bound", numberSetting("set-entropy", "entropy bound", false));
  put("temperature", numberSetting("set-temperature", "temperature", false));
  put("seed", numberSetting("set-seed", "seed", true));
  put("max_tokens", numberSetting("set-max-tokens", "max tokens", true));
  const mode = $("set-mode").value;
  if (mode) f.fast = mode === "fast";
  const schema = $("set-schema").value.trim();
  if (withSchema && schema) {
    let parsed;
    try {
      parsed = JSON.parse(schema);
    } catch (e) {
      throw new Error(`JSON schema: not valid JSON (${e.message})`);
    }
    f.response_format = { type: "json_schema", json_schema: { name: "playground", schema: parsed } };
  }
  return f;
}

// ------------------------------------------------------------------ the stream
// POST a streamed chat completion and call on.draft / on.text / on.usage per event. A non-2xx answer or an
// error event in the stream becomes an Error with the server's message, and so does a stream that ends before
// its [DONE] (the connection dropped: what arrived is not the whole reply). ``signal`` aborts it (Stop).
async function streamChat(body, on, signal) {
  const resp = await call("/v1/chat/completions", { method: "POST", headers: authHeaders(),
                                                     body: JSON.stringify(body), signal });
  if (resp.status === 401) {
    $("key-form").hidden = false;
  }
  if (!resp.ok) throw new Error(await errorText(resp));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the connection to the server closed before the reply was complete");
    // Server-sent events may end lines with \r\n or \r (a proxy may rewrite them): read them all as \n. A \r at
    // the end of a chunk waits for the next one, which may start with its \n.
    buf = (buf + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n").replace(/\r(?!$)/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(line.startsWith("data: ") ? 6 : 5);  // the space after the colon is optional
        if (data === "[DONE]") return;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message || "the server reported an error");
        if (j.draft) on.draft(j.draft);
        const c = j.choices && j.choices[0];
        if (c && c.delta && c.delta.content) on.text(c.delta.content);
        if (c && c.finish_reason) on.finish(c.finish_reason);
        if (j.usage) on.usage(j.usage);
      }
    }
  }
}

// One generation with the canvas view and the statistics kept up to date; resolves to the reply text (so far,
// with ``stopped: true``, when Stop or Esc ended it: the server aborts a request whose connection closes).
async function generate(messages, extra, hooks) {
  const body = Object.assign({ model: state.model, messages, stream: true, stream_drafts: true,
                               stream_options: { include_usage: true } }, extra);
  const t0 = performance.now();
  let steps = 0, tokens = 0, text = "", finish = null;
  canvasView.reset();
  const stats = () => {
    const secs = (performance.now() - t0) / 1000;
    $("stat-steps").textContent = steps;
    $("stat-tokens").textContent = tokens;
    $("stat-rate").textContent = tokens && secs > 0 ? (tokens / secs).toFixed(1) : "–";
    $("stat-tpf").textContent = tokens && steps ? (tokens / steps).toFixed(2) : "–";
  };
  const controller = new AbortController();
  state.controller = controller;
  let stopped = false;
  try {
    await streamChat(body, {
      draft(d) { steps++; canvasView.update(d); if (hooks.draft) hooks.draft(d); stats(); },
      text(s) { text += s; if (hooks.text) hooks.text(text); },
      finish(reason) { finish = reason; if (hooks.finish) hooks.finish(reason); },
      usage(u) { tokens = u.completion_tokens; stats(); },
    }, controller.signal);
  } catch (e) {
    if (!controller.signal.aborted) throw e;
    stopped = true;
  } finally {
    state.controller = null;
  }
  stats();
  return { text, steps, tokens, stopped, finish, seconds: (performance.now() - t0) / 1000 };
}

// Stop (the buttons, or Esc): abort the fetch; the server sees the connection close and aborts the request.
function stopGeneration() {
  if (state.controller) state.controller.abort();
}

function setBusy(busy) {
  state.busy = busy;
  for (const id of ["chat-send", "sudoku-solve", "sudoku-new", "chat-clear"]) $(id).disabled = busy;
  for (const id of ["chat-stop", "sudoku-stop"]) $(id).disabled = !busy;
}

// ------------------------------------------------------------------ canvas view
const canvasView = {
  el: null, prev: null, canvas: -1, updates: 0,
  reset() { this.prev = null; this.canvas = -1; },
  update(d) {
    const el = this.el;
    const n = d.token_ids.length;
    if (d.canvas !== this.canvas) { this.canvas = d.canvas; this.prev = null; }
    while (el.children.length < n) el.appendChild(document.createElement("span"));
    while (el.children.length > n) el.removeChild(el.lastChild);
    for (let i = 0; i < n; i++) {
      const span = el.children[i];
      let t = d.tokens ? d.tokens[i] : String(d.token_ids[i]);
      t = t === "" ? "·" : t.replace(/\n/g, "↵");
      const accepted = d.accepted ? d.accepted[i] : false;
      const changed = this.prev === null || this.prev[i] !== d.token_ids[i];
      const conf = d.entropy ? Math.exp(-d.entropy[i]) : 0.5;
      span.textContent = t;
      span.className = "tok " + (accepted ? "acc" : changed ? "chg" : "set");
      span.style.backgroundColor = `rgba(47, 111, 222, ${(0.05 + 0.45 * conf).toFixed(3)})`;
      span.title = `position ${i} · token ${d.token_ids[i]} · confidence ${conf.toFixed(2)}`;
    }
    this.prev = d.token_ids;
    this.updates++;
    el.dataset.updates = String(this.updates);
    el.dataset.step = String(d.step);
    const acc = d.accepted ? d.accepted.filter(Boolean).length : 0;
    $("canvas-head").textContent = `canvas ${d.canvas + 1} · step ${d.step} · ${acc} of ${n} positions accepted this step`;
  },
};

// ------------------------------------------------------------------ chat
// Run fn, which grows the chat, keeping the chat's end in view when it was (a reader who scrolled up stays put).
function follow(fn) {
  const out = $("chat-output");
  const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
  fn();
  if (atEnd) out.scrollTop = out.scrollHeight;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dataset.role = role;
  div.textContent = text;
  $("chat-output").appendChild(div);
  $("chat-output").scrollTop = $("chat-output").scrollHeight;
  return div;
}

async function sendChat() {
  const text = $("chat-input").value.trim();
  if (!text || state.busy) return;
  showError("");
  let extra;
  try {
    extra = requestFields(true);
  } catch (e) {
    showError(e.message);
    return;
  }
  if (!(await ready())) return;
  $("chat-input").value = "";
  state.messages.push({ role: "user", content: text });
  const asked = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("live");
  setBusy(true);
  try {
    const r = await generate(state.messages, extra, { text(t) { follow(() => { reply.textContent = t; }); } });
    reply.classList.remove("live");
    state.messages.push({ role: "assistant", content: r.text });
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = r.stopped ? `stopped · ${r.steps} denoising steps` : `${r.tokens} tokens · ${r.steps} denoising steps · ${(r.tokens / Math.max(1, r.steps)).toFixed(2)} tokens/forward · ${(r.tokens / r.seconds).toFixed(1)} tok/s`;
    // cut by max tokens (a JSON answer may then be unfinished), or another reason than a natural end
    if (r.finish === "length") meta.textContent += " · cut at max tokens";
    else if (r.finish && r.finish !== "stop") meta.textContent += ` · finish: ${r.finish}`;
    follow(() => reply.appendChild(meta));
  } catch (e) {
    // refused or failed: the turn is taken back and the text returned to the input, to fix and resend
    state.messages.pop();
    reply.remove();
    asked.remove();
    if (!$("chat-input").value) $("chat-input").value = text;
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

// ------------------------------------------------------------------ Sudoku
const SEPARATORS = /[\s|+\-]/g;

function parsePuzzle(text) {
  const s = text.replace(SEPARATORS, "");
  if (s.length !== 81) throw new Error(`a puzzle has 81 characters (digits, '.' or '0' for blanks); this one has ${s.length}`);
  const bad = [...s].find((c) => !"0123456789.".includes(c));
  if (bad !== undefined) throw new Error(`a puzzle holds digits, '.' or '0'; found ${JSON.stringify(bad)}`);
  return [...s].map((c) => (c === "." ? 0 : Number(c)));
}

function buildBoard() {
  const board = $("sudoku-board");
  for (let i = 0; i < 81; i++) {
    const cell = document.createElement("div");
    const r = Math.floor(i / 9), c = i % 9;
    cell.className = "cell" + (c === 2 || c === 5 ? " br" : "") + (r === 2 || r === 5 ? " bb" : "");
    cell.setAttribute("data-testid", "cell");
    board.appendChild(cell);
  }
}

function cellBase(i) {
  const r = Math.floor(i / 9), c = i % 9;
  return "cell" + (c === 2 || c === 5 ? " br" : "") + (r === 2 || r === 5 ? " bb" : "");
}

function showPuzzle(grid) {
  const cells = $("sudoku-board").children;
  for (let i = 0; i < 81; i++) {
    cells[i].textContent = grid[i] ? String(grid[i]) : "";
    cells[i].className = cellBase(i) + (grid[i] ? " given" : "");
    cells[i].style.opacity = "";
  }
}

// Which cells break a rule: a repeated digit in a row, column or box, a changed given, or no digit.
function wrongCells(puzzle, sol) {
  const wrong = new Set();
  const units = [];
  for (let k = 0; k < 9; k++) {
    units.push([...Array(9).keys()].map((j) => k * 9 + j));
    units.push([...Array(9).keys()].map((j) => j * 9 + k));
    const r0 = Math.floor(k / 3) * 3, c0 = (k % 3) * 3;
    units.push([...Array(9).keys()].map((j) => (r0 + Math.floor(j / 3)) * 9 + c0 + (j % 3)));
  }
  for (const u of units) {
    const seen = new Map();
    for (const i of u) {
      if (seen.has(sol[i])) { wrong.add(i); wrong.add(seen.get(sol[i])); } else seen.set(sol[i], i);
    }
  }
  for (let i = 0; i < 81; i++) {
    if (!(sol[i] >= 1 && sol[i] <= 9) || (puzzle[i] && puzzle[i] !== sol[i])) wrong.add(i);
  }
  return wrong;
}

function setStatus(text, kind) {
  const s = $("sudoku-status");
  s.textContent = text;
  s.dataset.state = kind;
}

async function solveSudoku() {
  if (state.busy) return;
  showError("");
  let puzzle, extra;
  try {
    puzzle = parsePuzzle($("sudoku-input").value);
    extra = requestFields(false); // a schema is for chat: the Sudoku model's reply is always 81 digits
  } catch (e) {
    setStatus(e.message, "error");
    return;
  }
  if (!(await ready())) {
    setStatus($("error").textContent, "error");
    return;
  }
  showPuzzle(puzzle);
  setStatus("solving…", "running");
  const cells = $("sudoku-board").children;
  setBusy(true);
  try {
    const r = await generate([{ role: "user", content: puzzle.map((v) => v || ".").join("") }], extra, {
      draft(d) {
        const digits = d.tokens || d.text.split("");
        let prev = solveSudoku.prev;
        for (let i = 0; i < 81 && i < digits.length; i++) {
          if (puzzle[i]) continue;
          const cell = cells[i];
          const acc = d.accepted && d.accepted[i];
          const changed = !prev || prev[i] !== d.token_ids[i];
          cell.textContent = digits[i] === "." ? "" : digits[i];
          cell.className = cellBase(i) + (acc ? " acc" : changed ? " chg" : "");
          cell.style.opacity = d.entropy ? (0.35 + 0.65 * Math.exp(-d.entropy[i])).toFixed(2) : "";
        }
        solveSudoku.prev = d.token_ids;
        setStatus(`step ${d.step} · ${d.accepted ? d.accepted.filter(Boolean).length : 0} cells accepted`, "running");
      },
    });
    solveSudoku.prev = null;
    if (r.stopped) {  // the drafts were no answer: back to the puzzle
      showPuzzle(puzzle);
      setStatus(`Stopped after ${r.steps} denoising steps. Press Solve to try again.`, "stopped");
      return;
    }
    const sol = [...r.text.trim()].map((c) => (c === "." ? 0 : Number(c)));
    const wrong = sol.length === 81 ? wrongCells(puzzle, sol) : new Set([...Array(81).keys()]);
    for (let i = 0; i < 81; i++) {
      cells[i].style.opacity = "";
      cells[i].textContent = sol[i] ? String(sol[i]) : "";
      cells[i].className = cellBase(i) + (puzzle[i] ? " given" : " final") + (wrong.has(i) ? " wrong" : "");
    }
    if (wrong.size === 0) {
      setStatus(`Solved and verified ✓ every row, column and box holds 1-9, givens kept · ${r.steps} denoising steps · ${r.seconds.toFixed(2)} s`, "solved");
    } else {
      setStatus(`Not a valid solution: ${wrong.size} cells break a rule (marked) · ` +
                (state.sudoku ? "try another seed" : "this model is not the Sudoku model"), "failed");
    }
  } catch (e) {
    solveSudoku.prev = null;
    setStatus(e.message, "error");
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

async function newPuzzle() {
  try {
    const r = await call("/playground/puzzle");
    if (!r.ok) throw new Error(await errorText(r));
    $("sudoku-input").value = (await r.json()).puzzle;
    showPuzzle(parsePuzzle($("sudoku-input").value));
    setStatus("A new puzzle with one solution. Press Solve.", "idle");
  } catch (e) {
    showError(e.message);
  }
}

// ------------------------------------------------------------------ start
async function start() {
  canvasView.el = $("canvas-view");
  buildBoard();
  try { showPuzzle(parsePuzzle($("sudoku-input").value)); } catch (_) { /* an edited value: shown on Solve */ }
  $("sudoku-solve").addEventListener("click", solveSudoku);
  $("sudoku-new").addEventListener("click", newPuzzle);
  $("sudoku-stop").addEventListener("click", stopGeneration);
  $("chat-stop").addEventListener("click", stopGeneration);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.busy) stopGeneration(); });
  // Enter while an input method is composing (Japanese, Chinese...) picks a candidate: it must not send.
  const composing = (e) => e.isComposing || e.keyCode === 229;
  $("sudoku-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !composing(e)) solveSudoku(); });
  $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); sendChat(); });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !composing(e)) { e.preventDefault(); sendChat(); }
  });
  $("chat-clear").addEventListener("click", () => { state.messages = []; $("chat-output").textContent = ""; });
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    try {
      if (await connect()) $("key-form").hidden = true;
    } catch (err) {
      showError(err.message);
    }
  });
  const cfg = await (await call("/playground/config")).json();
  state.sudoku = cfg.sudoku;
  state.keyRequired = cfg.api_key_required;
  if (cfg.sudoku) {
    $("chat-hint").textContent = "this is the Sudoku model: send it an 81-character puzzle";
    $("chat-input").placeholder = "an 81-character puzzle, e.g. 53..7....6..195....98....6.8...";
  } else {
    $("sudoku-hint").textContent = "needs the Sudoku model (blockdiff demo --web serves it)";
    $("left").appendChild($("sudoku-card")); // chat first for a chat model
  }
  if (cfg.api_key_required && !sessionStorage.getItem(KEY_STORE)) {
    $("key-form").hidden = false;
    $("model").textContent = "API key needed";
    return;
  }
  await ready();
}

start().catch((e) => showError(e.message));
