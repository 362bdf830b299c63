// @ts-check
/**
 * The browser IDE: log in with an API key, pick a runtime, start or attach a sandbox, then edit,
 * run, upload and download files, watch metrics, and use a terminal: a real PTY shell where the
 * runtime has `exec.pty`, a line-based Python console otherwise (WASM). Everything goes through the
 * JavaScript client (/static/sandgate.js), which reconnects and resumes output by itself.
 *
 * The key is typed by the user, kept in sessionStorage at most, and never put in a URL: the
 * WebSocket carries it as a bearer subprotocol, REST calls as an Authorization header.
 */
import { Gateway, SandgateError } from "/static/sandgate.js";
import { PythonConsole } from "/static/pyconsole.js";
import { renderBundle } from "/static/richoutput.js";

const STORE = { key: "sandgate.apiKey", wire: "sandgate.wire", sandbox: "sandgate.sandbox" };
const TERMINAL_TAG = "ide-terminal";
const RUN_TAG = "ide-run";
// A login shell: bash where the image has it, else sh.
const SHELL = "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi";
const METRICS_EVERY_MS = 2000;
// Rich output items kept in the output panel (the oldest go first): each may hold a large image.
const DISPLAY_KEEP = 50;

/** @param {string} id */
function $(id) {
  const element = document.getElementById(id);
  if (!element) throw new Error(`the page has no #${id}`);
  return /** @type {any} */ (element);
}

const ui = {
  login: $("login"), apiKey: $("api-key"), wire: $("wire"), remember: $("remember"),
  session: $("session"), runtime: $("runtime"), newSandbox: $("new-sandbox"), existing: $("existing"),
  sandboxId: $("sandbox-id"), destroy: $("destroy"), logout: $("logout"), conn: $("conn"),
  refresh: $("refresh"), upload: $("upload"), tree: $("tree"),
  path: $("path"), save: $("save"), runPython: $("run-python"), runJs: $("run-js"), stop: $("stop"),
  editor: $("editor"), terminal: $("terminal"), terminalTitle: $("terminal-title"),
  terminalNote: $("terminal-note"), status: $("status"), richOutput: $("rich-output"),
  richItems: $("rich-items"), richClear: $("rich-clear"),
  previewPort: $("preview-port"), previewOpen: $("preview-open"), previewTab: $("preview-tab"),
  previewClose: $("preview-close"), previewFrame: $("preview-frame"),
};

/** @type {Gateway | null} */
let gateway = null;
/** @type {import("/static/sandgate.js").Sandbox | null} */
let sandbox = null;
/** @type {TerminalLike} */
let term;
/**
 * What the terminal is bound to: a PTY exec, or the Python console (with the exec it runs now).
 * @type {{kind: "pty", exec: import("/static/sandgate.js").Exec} |
 *        {kind: "console", console: PythonConsole, running: import("/static/sandgate.js").Exec | null} | null}
 */
let mode = null;
let metricsTimer = 0;

// ------------------------------------------------------------------------------------------------
// Status line and connection badge
// ------------------------------------------------------------------------------------------------

/** @param {string} text @param {boolean} [error] */
function say(text, error = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", error);
}

/** @param {unknown} err */
function describe(err) {
  if (err instanceof SandgateError) return `${err.code}: ${err.detail}`;
  return err instanceof Error ? err.message : String(err);
}

/** @param {unknown} err */
function report(err) {
  say(describe(err), true);
}

/**
 * @param {string} state  the session's state, or "offline" with no session
 * @param {{attempt?: number, error?: SandgateError, reason?: string}} [detail]
 */
function showConnection(state, detail = {}) {
  const badge = state === "open" ? "online" : state;
  ui.conn.dataset.state = badge;
  ui.conn.dataset.reconnects = String(sandbox?.reconnects ?? 0);
  ui.conn.title = detail.reason ?? "";
  if (state === "reconnecting") ui.conn.textContent = `reconnecting${detail.attempt ? ` (attempt ${detail.attempt})` : ""}…`;
  else if (state === "closed") ui.conn.textContent = `closed${detail.error ? `: ${detail.error.code}` : ""}`;
  else if (state === "open" && sandbox?.reconnects) ui.conn.textContent = `online (reconnected ${sandbox.reconnects}×)`;
  else ui.conn.textContent = badge === "connecting" ? "connecting…" : badge;
  const usable = state === "open" || state === "reconnecting";
  for (const button of [ui.save, ui.runPython, ui.refresh, ui.upload, ui.destroy]) button.disabled = !usable;
  ui.runJs.disabled = !usable || !canRunJavaScript();
  ui.previewOpen.disabled = !usable || !canPublishPorts();
}

/** Whether the sandbox's runtime publishes ports (microVM, pod; WASM has no sockets). */
function canPublishPorts() {
  return (sandbox?.capabilities ?? new Set()).has("ports");
}

// ------------------------------------------------------------------------------------------------
// Preview of a published port
// ------------------------------------------------------------------------------------------------

/**
 * Publish the port in the field and show it: the frame opens the port's preview URL, whose
 * `?token=` the gateway turns into the port's cookie. The frame is sandboxed without
 * allow-same-origin (the page is the sandbox's, and must not reach this one's key), so the browser
 * sends that cookie with the frame's page but not with what the page loads itself; "new tab" opens
 * the page on its own, where its assets and scripts load as on a site.
 */
async function showPreview() {
  if (!sandbox) return;
  const port = Number(ui.previewPort.value);
  const published = await sandbox.ports.publish(port);
  ui.previewFrame.src = published.previewUrl;
  ui.previewTab.href = published.previewUrl;
  ui.previewFrame.hidden = ui.previewTab.hidden = ui.previewClose.hidden = false;
  say(`Port ${port} is published at ${published.url}`);
}

function hidePreview() {
  ui.previewFrame.removeAttribute("src");
  ui.previewFrame.hidden = ui.previewTab.hidden = ui.previewClose.hidden = true;
}

function canRunJavaScript() {
  const caps = sandbox?.capabilities ?? new Set();
  return caps.has("exec.javascript") || caps.has("exec.pty");
}

// ------------------------------------------------------------------------------------------------
// The terminal: xterm.js when `npm ci` installed it, a plain fallback otherwise
// ------------------------------------------------------------------------------------------------

/**
 * @typedef {object} TerminalLike
 * @property {(data: string | Uint8Array) => void} write
 * @property {() => void} reset
 * @property {number} rows
 * @property {number} cols
 * @property {() => string} text  everything in the buffer (for the tests and copy)
 * @property {() => void} focus
 * @property {() => boolean} settled  the terminal's size fits its box (no resize pending)
 */

async function loadTerminal() {
  try {
    const [{ Terminal }, { FitAddon }] = await Promise.all([
      import("/static/vendor/xterm/xterm.mjs"), import("/static/vendor/xterm-fit/addon-fit.mjs"),
    ]);
    const css = document.createElement("link");
    css.rel = "stylesheet";
    css.href = "/static/vendor/xterm/xterm.css";
    document.head.append(css);
    const xterm = new Terminal({
      scrollback: 10000, cursorBlink: true, fontSize: 13,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace', theme: { background: "#111216" },
    });
    const fit = new FitAddon();
    xterm.loadAddon(fit);
    xterm.open(ui.terminal);
    fit.fit();
    new ResizeObserver(() => fit.fit()).observe(ui.terminal);
    xterm.onData((/** @type {string} */ data) => onTerminalData(data));
    xterm.onResize((/** @type {{rows: number, cols: number}} */ size) => onTerminalResize(size.rows, size.cols));
    term = {
      write: (data) => xterm.write(data),
      reset: () => xterm.reset(),
      get rows() { return xterm.rows; },
      get cols() { return xterm.cols; },
      text: () => {
        const buffer = xterm.buffer.active;
        let out = "";
        for (let i = 0; i < buffer.length; i++) {
          const line = buffer.getLine(i);
          if (!line) continue;
          out += (i > 0 && !line.isWrapped ? "\n" : "") + line.translateToString(true);
        }
        return out;
      },
      focus: () => xterm.focus(),
      settled: () => {
        const proposed = fit.proposeDimensions();
        return !proposed || (proposed.rows === xterm.rows && proposed.cols === xterm.cols);
      },
    };
    ui.terminal.dataset.kind = "xterm";
  } catch (err) {
    term = plainTerminal(`The terminal needs xterm.js, which is not installed here: run \`npm ci\` in gateway/web `
      + `(bash .ci/setup does it). Files, the editor and runs work; this plain console stands in.`);
    ui.terminal.dataset.kind = "plain";
    console.warn("xterm.js did not load", err);
  }
}

/**
 * A stand-in terminal: output in a <pre> (escape sequences dropped), input a line at a time.
 * @param {string} notice
 * @returns {TerminalLike}
 */
function plainTerminal(notice) {
  const note = document.createElement("p");
  note.className = "notice";
  note.textContent = notice;
  const pre = document.createElement("pre");
  const input = document.createElement("input");
  input.setAttribute("aria-label", "terminal input");
  input.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    onTerminalData(input.value + "\r");
    input.value = "";
  });
  ui.terminal.replaceChildren(note, pre, input);
  const decoder = new TextDecoder();
  return {
    write(data) {
      const text = typeof data === "string" ? data : decoder.decode(data, { stream: true });
      // eslint-disable-next-line no-control-regex
      const plain = text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "").replace(/\r\n/g, "\n").replace(/\b \b/g, "");
      pre.textContent += plain.replace(/\r/g, "");
      pre.scrollTop = pre.scrollHeight;
    },
    reset() { pre.textContent = ""; },
    rows: 24,
    cols: 80,
    text: () => pre.textContent ?? "",
    focus: () => input.focus(),
    settled: () => true,
  };
}

/** @param {string} data */
function onTerminalData(data) {
  if (mode?.kind === "pty") mode.exec.write(data).catch(report);
  else if (mode?.kind === "console") mode.console.handleData(data);
}

/** @param {number} rows @param {number} cols */
function onTerminalResize(rows, cols) {
  if (mode?.kind === "pty" && mode.exec.running) mode.exec.resize(rows, cols).catch(report);
}

/** @param {import("/static/sandgate.js").Sandbox} sb */
async function startTerminal(sb) {
  term.reset();
  clearDisplay();
  const caps = sb.capabilities;
  if (caps.has("exec.pty")) {
    ui.terminalTitle.textContent = "Terminal";
    ui.terminalNote.textContent = "a shell on the sandbox's PTY";
    const { execs } = await sb.listExecs();
    const running = execs.find((e) => e.tag === TERMINAL_TAG && e.running);
    /** @type {import("/static/sandgate.js").ExecHandlers} */
    const handlers = {
      onData: (data) => term.write(data),
      onLost: ([first, last]) => term.write(`\r\n\x1b[33m[${last - first + 1} output events were lost]\x1b[0m\r\n`),
      onEnd: (result) => {
        term.write(`\r\n\x1b[2m[the shell ended: ${result.error ? result.error.message : `exit ${result.exitCode}`}]\x1b[0m\r\n`);
        mode = null;
      },
    };
    // A shell left running by an earlier page load is re-attached with its whole screen replayed.
    const exec = running
      ? sb.attach({ execId: running.exec_id, fromSeq: 0 }, handlers)
      : sb.exec({ command: SHELL, pty: { rows: term.rows, cols: term.cols }, tag: TERMINAL_TAG,
                  env: { TERM: "xterm-256color" } }, handlers);
    mode = { kind: "pty", exec };
    exec.wait().catch(report);
    if (running) exec.resize(term.rows, term.cols).catch(report);
  } else if (caps.has("exec.python")) {
    ui.terminalTitle.textContent = "Python console";
    ui.terminalNote.textContent = "no PTY on this runtime: each statement runs in the sandbox";
    const pyconsole = new PythonConsole({
      write: (text) => term.write(text),
      execute: (source) => runInConsole({ language: "python", code: source, stdinOpen: true }),
      input: (text) => {
        if (mode?.kind === "console") mode.running?.write(text).catch(report);
      },
      interrupt: () => stop(),
      busyChanged: (busy) => { ui.terminal.dataset.busy = busy ? "1" : "0"; },
    });
    ui.terminal.dataset.busy = "0";
    mode = { kind: "console", console: pyconsole, running: null };
    term.write(`\x1b[2mPython in sandbox ${sb.id}; the namespace persists between statements.\x1b[0m\r\n`);
    pyconsole.showPrompt();
  } else {
    mode = null;
    ui.terminalNote.textContent = "";
    term.write("This runtime offers neither a PTY nor Python.\r\n");
  }
  term.focus();
}

/**
 * Run one exec for the console (a statement, or a file from the Run buttons) and show its output.
 * @param {import("/static/sandgate.js").ExecRequest} request
 * @param {boolean} [showExit]
 */
async function runInConsole(request, showExit = false) {
  if (!sandbox || mode?.kind !== "console") return;
  const pyconsole = mode.console;
  /** @type {Record<string, TextDecoder>} */
  const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder(), pty: new TextDecoder() };
  const exec = sandbox.exec(request, {
    onData: (data, fd) => pyconsole.output(decoders[fd].decode(data, { stream: true }), fd === "stderr" ? "31" : ""),
    onDisplay: (bundle) => {
      showDisplay(bundle);
      pyconsole.output(`[${bundle["text/plain"]?.split("\n")[0] ?? "output"} → output panel]\n`, "36");
    },
    onLost: ([first, last]) => pyconsole.output(`[${last - first + 1} output events were lost]\n`, "33"),
  });
  mode.running = exec;
  ui.stop.disabled = false;
  try {
    const result = await exec.wait();
    if (result.error) pyconsole.output(`${result.error.code}: ${result.error.message}\n`, "31");
    else if (showExit) {
      const how = result.signal ? `signal ${result.signal}` : `exit ${result.exitCode}`;
      pyconsole.output(`[${how}, ${Math.round(result.durationMs ?? 0)} ms]\n`, "2");
    }
  } catch (err) {
    pyconsole.output(describe(err) + "\n", "31");
  } finally {
    if (mode?.kind === "console") mode.running = null;
    ui.stop.disabled = true;
    refreshTree();
  }
}

/**
 * Show one display bundle in the output panel (never in the page's own DOM: richoutput.js).
 * @param {Record<string, string>} bundle
 */
function showDisplay(bundle) {
  ui.richOutput.hidden = false;
  ui.richItems.append(renderBundle(bundle, document));
  while (ui.richItems.childElementCount > DISPLAY_KEEP) ui.richItems.firstElementChild?.remove();
  ui.richItems.lastElementChild?.scrollIntoView({ block: "nearest" });
}

function clearDisplay() {
  ui.richItems.replaceChildren();
  ui.richOutput.hidden = true;
}

function stop() {
  if (mode?.kind === "console") mode.running?.signal("SIGINT").catch(report);
  else if (mode?.kind === "pty") mode.exec.write("\x03").catch(report);
}

// ------------------------------------------------------------------------------------------------
// Login, runtimes, sandboxes
// ------------------------------------------------------------------------------------------------

/** @param {string} apiKey @param {string} wire @param {boolean} remember */
async function login(apiKey, wire, remember) {
  let msgpack;
  if (wire === "msgpack") {
    try {
      msgpack = await import("/static/vendor/msgpack/index.mjs");
    } catch {
      throw new Error("msgpack needs @msgpack/msgpack: run `npm ci` in gateway/web, or use JSON");
    }
  }
  const candidate = new Gateway({ apiKey, wire: /** @type {"json" | "msgpack"} */ (wire), msgpack });
  const { runtimes, unavailable } = await candidate.runtimes(); // a wrong key fails here: unauthorized
  gateway = candidate;
  ui.apiKey.value = "";
  if (remember) {
    sessionStorage.setItem(STORE.key, apiKey);
    sessionStorage.setItem(STORE.wire, wire);
  }
  ui.runtime.replaceChildren(
    ...runtimes.map((r) => new Option(r.id, r.id)),
    ...Object.entries(unavailable ?? {}).map(([id, why]) => {
      const option = new Option(`${id} (unavailable)`, id);
      option.disabled = true;
      option.title = String(why);
      return option;
    }),
  );
  for (const r of runtimes) ui.runtime.querySelector(`option[value="${CSS.escape(r.id)}"]`).title = r.description;
  ui.login.hidden = true;
  ui.session.hidden = false;
  say(`Logged in. ${runtimes.length} runtime(s): ${runtimes.map((r) => r.id).join(", ")}`);
  await refreshExisting();
  const previous = sessionStorage.getItem(STORE.sandbox);
  if (previous) {
    try {
      await attachSandbox(previous);
    } catch (err) {
      sessionStorage.removeItem(STORE.sandbox);
      say(`The previous sandbox is gone (${describe(err)}); start a new one.`);
    }
  }
}

function logout() {
  unbind();
  gateway = null;
  sessionStorage.clear();
  ui.session.hidden = true;
  ui.login.hidden = false;
  ui.tree.replaceChildren();
  term.reset();
  clearDisplay();
  say("Logged out.");
}

async function refreshExisting() {
  if (!gateway) return;
  const sandboxes = await gateway.listSandboxes();
  ui.existing.replaceChildren(new Option("attach to…", ""),
    ...sandboxes.map((s) => new Option(`${s.id} (${s.runtime}, ${s.state})`, s.id)));
}

async function newSandbox() {
  if (!gateway) return;
  const runtime = ui.runtime.value;
  unbind();
  showConnection("connecting");
  say(`Starting a ${runtime} sandbox…`);
  let sb;
  try {
    sb = await gateway.createSandbox({ runtime });
  } catch (err) {
    showConnection("offline");
    throw err;
  }
  await bind(sb);
  say(`Sandbox ${sb.id} is running on ${runtime}.`);
  refreshExisting().catch(report);
}

/** @param {string} id */
async function attachSandbox(id) {
  if (!gateway) return;
  unbind();
  showConnection("connecting");
  let sb;
  try {
    sb = await gateway.connect(id);
  } catch (err) {
    showConnection("offline");
    throw err;
  }
  await bind(sb);
  say(`Attached to sandbox ${id}.`);
}

/** @param {import("/static/sandgate.js").Sandbox} sb */
async function bind(sb) {
  sandbox = sb;
  sessionStorage.setItem(STORE.sandbox, sb.id);
  const info = sb.hello?.sandbox ?? {};
  ui.sandboxId.textContent = `${sb.id} · ${info.runtime ?? "?"}`;
  sb.on("state", (/** @type {any} */ event) => {
    if (sb !== sandbox) return;
    showConnection(event.state, event);
    if (event.state === "closed") onClosed(event.error);
  });
  sb.on("reconnected", (/** @type {any} */ event) => {
    say(`Reconnected; ${event.resumed} stream(s) resumed from their last sequence numbers.`);
    refreshTree();
  });
  showConnection(sb.state);
  await startTerminal(sb);
  await refreshTree();
  metricsTimer = window.setInterval(pollMetrics, METRICS_EVERY_MS);
  pollMetrics();
}

function unbind() {
  window.clearInterval(metricsTimer);
  hidePreview();
  mode = null;
  if (sandbox) {
    const old = sandbox;
    sandbox = null;
    old.close(); // the sandbox keeps running; another page can attach to it
  }
  ui.sandboxId.textContent = "";
  showConnection("offline");
}

/** @param {SandgateError | undefined} error */
function onClosed(error) {
  window.clearInterval(metricsTimer);
  mode = null;
  if (error?.code === "not_found") sessionStorage.removeItem(STORE.sandbox);
  say(`The session ended: ${error ? describe(error) : "closed"}. Start or attach a sandbox.`, true);
  term.write(`\r\n\x1b[31m[session ended: ${error ? describe(error) : "closed"}]\x1b[0m\r\n`);
  refreshExisting().catch(() => {});
}

async function destroySandbox() {
  if (!sandbox) return;
  const id = sandbox.id;
  await sandbox.destroy();
  sessionStorage.removeItem(STORE.sandbox);
  say(`Sandbox ${id} destroyed.`);
}

// ------------------------------------------------------------------------------------------------
// Files: tree, editor, upload, download
// ------------------------------------------------------------------------------------------------

/** @typedef {{name: string, path: string, type: string, size: number}} Entry */

async function refreshTree() {
  if (!sandbox || sandbox.state === "closed") return;
  let listing;
  try {
    listing = await sandbox.files.list(".", 16);
  } catch (err) {
    // WASM runs one thing at a time: the tree refreshes when the running code ends.
    if (err instanceof SandgateError && err.code === "busy") return;
    return report(err);
  }
  /** @type {Map<string, HTMLUListElement>} */
  const folders = new Map([["", document.createElement("ul")]]);
  const entries = /** @type {Entry[]} */ (listing.entries).sort((a, b) => a.path.localeCompare(b.path));
  for (const entry of entries) {
    const parent = folders.get(entry.path.split("/").slice(0, -1).join("/")) ?? folders.get("");
    const item = document.createElement("li");
    item.className = entry.type === "dir" ? "dir" : "file";
    item.append(treeRow(entry));
    if (entry.type === "dir") {
      const children = document.createElement("ul");
      item.append(children);
      folders.set(entry.path, children);
    }
    parent?.append(item);
  }
  const root = /** @type {HTMLUListElement} */ (folders.get(""));
  if (!entries.length) root.innerHTML = '<li class="empty">no files yet</li>';
  ui.tree.replaceChildren(...root.childNodes);
}

/** @param {Entry} entry */
function treeRow(entry) {
  const row = document.createElement("div");
  row.className = "entry";
  row.dataset.path = entry.path;
  row.classList.toggle("open", entry.path === ui.path.value);
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = entry.name;
  name.title = entry.type === "file" ? `${entry.path} (${formatBytes(entry.size)})` : entry.path;
  row.append(name);
  if (entry.type !== "file") return row;
  name.addEventListener("click", () => openFile(entry.path).catch(report));
  const download = document.createElement("button");
  download.type = "button";
  download.textContent = "⬇";
  download.title = `Download ${entry.path}`;
  download.setAttribute("aria-label", `download ${entry.path}`);
  download.addEventListener("click", () => downloadFile(entry.path).catch(report));
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "✕";
  remove.title = `Delete ${entry.path}`;
  remove.setAttribute("aria-label", `delete ${entry.path}`);
  remove.addEventListener("click", () => deleteFile(entry.path).catch(report));
  row.append(download, remove);
  return row;
}

/** @param {string} path */
async function openFile(path) {
  if (!sandbox) return;
  ui.editor.value = await sandbox.files.readText(path);
  ui.path.value = path;
  ui.editor.dataset.dirty = "";
  for (const row of ui.tree.querySelectorAll(".entry")) row.classList.toggle("open", row.dataset.path === path);
  say(`Opened ${path}.`);
}

async function saveFile() {
  if (!sandbox) return;
  const path = ui.path.value.trim();
  if (!path) throw new Error("give the file a path first");
  const { bytes } = await sandbox.files.write(path, ui.editor.value);
  ui.editor.dataset.dirty = "";
  say(`Saved ${path} (${formatBytes(bytes)}).`);
  await refreshTree();
  return path;
}

/** @param {string} path */
async function deleteFile(path) {
  if (!sandbox) return;
  await sandbox.files.remove(path);
  say(`Deleted ${path}.`);
  await refreshTree();
}

/** @param {string} path */
async function downloadFile(path) {
  if (!gateway || !sandbox) return;
  const blob = await gateway.download(sandbox.id, path);
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = path.split("/").pop() ?? "download";
  document.body.append(link);
  link.click();
  link.remove();
  // The browser has taken the blob once the click's task is over.
  setTimeout(() => URL.revokeObjectURL(url), 0);
  say(`Downloaded ${path} (${formatBytes(blob.size)}).`);
}

async function uploadFiles() {
  if (!gateway || !sandbox) return;
  const folder = ui.path.value.includes("/") ? ui.path.value.replace(/[^/]*$/, "") : "";
  const files = [...ui.upload.files];
  ui.upload.value = "";
  for (const file of files) {
    const { path, bytes } = await gateway.upload(sandbox.id, folder + file.name, file);
    say(`Uploaded ${path} (${formatBytes(bytes)}).`);
  }
  await refreshTree();
}

/** @param {"python" | "javascript"} language */
async function runFile(language) {
  if (!sandbox) return;
  const path = await saveFile();
  if (!path) return;
  if (mode?.kind === "pty") {
    // In a shell the file runs the way the user would run it, in the same terminal.
    const program = language === "python" ? "python3" : "node";
    await mode.exec.write(`${program} '${path.replace(/'/g, "'\\''")}'\r`);
  } else if (mode?.kind === "console") {
    const code = ui.editor.value;
    await mode.console.runExternal(
      () => runInConsole({ language, code, stdinOpen: language === "python", tag: RUN_TAG }, true),
      `\x1b[36m▶ ${language} ${path}\x1b[0m`);
  } else {
    throw new Error("this sandbox has no terminal to run in");
  }
  term.focus();
}

/** @param {number} bytes */
function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KiB", "MiB", "GiB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

// ------------------------------------------------------------------------------------------------
// Metrics
// ------------------------------------------------------------------------------------------------

let metricsInFlight = false;

async function pollMetrics() {
  if (!sandbox || sandbox.state !== "open" || metricsInFlight) return;
  metricsInFlight = true;
  try {
    const { guest = {}, host = {} } = await sandbox.metrics();
    /** @param {string} name @param {string} value */
    const show = (name, value) => {
      const cell = /** @type {HTMLElement} */ (document.querySelector(`[data-metric="${name}"]`));
      cell.textContent = value;
      cell.title = "";
    };
    const memory = host.rss_bytes ?? guest.memory_bytes;
    show("memory", memory == null ? "–" : formatBytes(memory));
    const cpu = host.cpu_s ?? guest.cpu_s;
    show("cpu", cpu == null ? "–" : `${cpu.toFixed(2)} s`);
    show("disk", guest.disk_bytes == null ? "–" : formatBytes(guest.disk_bytes));
    show("uptime", guest.uptime_s == null ? "–" : `${Math.round(guest.uptime_s)} s`);
    show("execs", String(guest.execs_running ?? "–"));
  } catch (err) {
    // A single-threaded guest answers busy while code runs: keep the last figures, say why.
    const why = err instanceof SandgateError && err.code === "busy" ? "busy: code is running" : describe(err);
    for (const cell of document.querySelectorAll("[data-metric]")) /** @type {HTMLElement} */ (cell).title = why;
  } finally {
    metricsInFlight = false;
  }
}

// ------------------------------------------------------------------------------------------------
// Editor behaviour: Tab indents, Enter keeps the indentation, Ctrl+S saves, Ctrl+Enter runs
// ------------------------------------------------------------------------------------------------

/** @param {KeyboardEvent} event */
function editorKeys(event) {
  const editor = /** @type {HTMLTextAreaElement} */ (ui.editor);
  const mod = event.ctrlKey || event.metaKey;
  if (mod && event.key === "s") {
    event.preventDefault();
    saveFile().catch(report);
  } else if (mod && event.key === "Enter") {
    event.preventDefault();
    runFile(/\.m?js$/.test(ui.path.value) ? "javascript" : "python").catch(report);
  } else if (event.key === "Tab" && !mod) {
    event.preventDefault();
    editor.setRangeText("    ", editor.selectionStart, editor.selectionEnd, "end");
    editor.dataset.dirty = "1";
  } else if (event.key === "Enter" && !event.shiftKey && !mod) {
    event.preventDefault();
    const before = editor.value.slice(0, editor.selectionStart);
    const line = before.slice(before.lastIndexOf("\n") + 1);
    const indent = (line.match(/^[ \t]*/) ?? [""])[0] + (/[:{[(]\s*$/.test(line) ? "    " : "");
    editor.setRangeText("\n" + indent, editor.selectionStart, editor.selectionEnd, "end");
    editor.dataset.dirty = "1";
  }
}

// ------------------------------------------------------------------------------------------------
// Wiring
// ------------------------------------------------------------------------------------------------

/** @param {() => Promise<unknown>} action */
function guarded(action) {
  return () => {
    action().catch(report);
  };
}

ui.login.addEventListener("submit", (/** @type {SubmitEvent} */ event) => {
  event.preventDefault();
  const key = ui.apiKey.value.trim();
  say("Logging in…");
  login(key, ui.wire.value, ui.remember.checked).catch(report);
});
ui.logout.addEventListener("click", logout);
ui.newSandbox.addEventListener("click", guarded(newSandbox));
ui.existing.addEventListener("change", guarded(async () => {
  if (ui.existing.value) await attachSandbox(ui.existing.value);
}));
ui.destroy.addEventListener("click", guarded(destroySandbox));
ui.refresh.addEventListener("click", guarded(refreshTree));
ui.upload.addEventListener("change", guarded(uploadFiles));
ui.save.addEventListener("click", guarded(saveFile));
ui.runPython.addEventListener("click", guarded(() => runFile("python")));
ui.runJs.addEventListener("click", guarded(() => runFile("javascript")));
ui.stop.addEventListener("click", stop);
ui.richClear.addEventListener("click", clearDisplay);
ui.previewOpen.addEventListener("click", guarded(showPreview));
ui.previewClose.addEventListener("click", hidePreview);
ui.editor.addEventListener("keydown", editorKeys);
ui.editor.addEventListener("input", () => { ui.editor.dataset.dirty = "1"; });

// For tests and for copying: everything the terminal holds, as text.
Object.assign(window, { sandgateIDE: { terminalText: () => term.text(), size: () => [term.rows, term.cols],
  settled: () => term.settled() } });

ui.editor.value = 'name = input("Your name? ")\nprint(f"Hello, {name}!")\n';
await loadTerminal();
term.write("\x1b[2mLog in and start a sandbox to get a terminal.\x1b[0m\r\n");
const savedKey = sessionStorage.getItem(STORE.key);
if (savedKey) {
  ui.wire.value = sessionStorage.getItem(STORE.wire) ?? "json";
  login(savedKey, ui.wire.value, true).catch((err) => {
    sessionStorage.removeItem(STORE.key);
    report(err);
  });
}
document.documentElement.dataset.ready = "1";
