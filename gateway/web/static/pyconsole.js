// @ts-check
/**
 * A line-based Python console over a terminal, for runtimes without a PTY (WASM): the browser does
 * the line editing (echo, backspace, history), and each complete statement becomes one
 * `exec.start` in the sandbox's persistent namespace, which prints a trailing expression's value the
 * way Python's REPL does. While an exec runs, typed lines go to its stdin (so `input()` works) and
 * Ctrl-C interrupts it. No DOM here: the IDE wires it to xterm.js, the unit tests to a string.
 */

const PROMPT = ">>> ";
const MORE = "... ";

/**
 * Whether `source` needs more lines before it can run, by Python's rules as the REPL applies them:
 * an open bracket, string or backslash continuation always does; a compound statement (a line ending
 * with `:` or starting with `@`) runs only once an empty line follows it.
 * @param {string[]} lines
 */
export function needsMore(lines) {
  let depth = 0;
  /** @type {string | null} */
  let quote = null; // ', ", ''' or """ while inside a string
  let lastLine = "";
  for (const line of lines) {
    let code = ""; // the line without comments and string contents
    for (let i = 0; i < line.length; i++) {
      const ch = line[i];
      if (quote) {
        if (ch === "\\") i++;
        else if (line.startsWith(quote, i)) {
          i += quote.length - 1;
          quote = null;
          code += "s";
        }
        continue;
      }
      if (ch === "#") break;
      if (ch === "'" || ch === '"') {
        quote = line.startsWith(ch.repeat(3), i) ? ch.repeat(3) : ch;
        i += quote.length - 1;
        continue;
      }
      if ("([{".includes(ch)) depth++;
      else if (")]}".includes(ch)) depth = Math.max(0, depth - 1);
      code += ch;
    }
    if (quote && quote.length === 1 && !line.endsWith("\\")) quote = null; // unterminated: a SyntaxError to report
    lastLine = code.trimEnd();
  }
  if (quote || depth > 0 || lastLine.endsWith("\\")) return true;
  const first = lines[0].trim();
  const compound = lines.some((line) => stripComment(line).trimEnd().endsWith(":")) || first.startsWith("@");
  if (!compound) return false;
  return lines[lines.length - 1].trim() !== "";
}

/** @param {string} line */
function stripComment(line) {
  // Good enough for the `:` test: a `#` inside a string only makes a block wait for its empty line.
  const at = line.indexOf("#");
  return at < 0 ? line : line.slice(0, at);
}

/**
 * @typedef {object} ConsoleHost
 * @property {(text: string) => void} write  writes to the terminal (text uses \r\n)
 * @property {(source: string) => Promise<void>} execute  runs a statement; resolves when its exec ended
 * @property {(text: string) => void} input  sends a line to the running exec's stdin
 * @property {() => void} interrupt  Ctrl-C while an exec runs
 * @property {(busy: boolean) => void} [busyChanged]  an exec started (true) or ended and the prompt is back
 */

export class PythonConsole {
  /** @type {string[]} */
  history = [];
  /** @type {string[]} lines of the statement being typed */
  pending = [];
  line = "";
  #busy = false;
  #historyAt = 0;
  #atLineStart = true;
  #host;

  /** @param {ConsoleHost} host */
  constructor(host) {
    this.#host = host;
  }

  /** While an exec runs, typed lines go to its stdin, as in a terminal. */
  get busy() {
    return this.#busy;
  }

  set busy(value) {
    this.#busy = value;
    this.#host.busyChanged?.(value);
  }

  get prompt() {
    if (this.busy) return "";
    return this.pending.length ? MORE : PROMPT;
  }

  /** Print the prompt on a fresh line. */
  showPrompt() {
    this.#host.write(this.prompt + this.line);
  }

  /**
   * Run `source` as if typed (the IDE's Run button); `banner` is printed first.
   * @param {() => Promise<void>} start  starts the exec and resolves when it ended
   * @param {string} banner
   */
  async runExternal(start, banner) {
    if (this.busy) throw new Error("the console is busy: stop the running code first");
    this.#host.write(`\r\x1b[K${banner}\r\n`);
    this.#atLineStart = true;
    this.busy = true;
    try {
      await start();
    } finally {
      this.#done();
    }
  }

  #done() {
    this.#busy = false;
    this.pending = [];
    this.line = "";
    if (!this.#atLineStart) this.#host.write("\r\n");
    this.#atLineStart = true;
    this.showPrompt();
    this.#host.busyChanged?.(false);
  }

  /**
   * Output of the running exec (decoded text): written with \r\n line ends, and `style` (an SGR
   * code such as "31" for red) around it.
   * @param {string} text
   * @param {string} [style]
   */
  output(text, style = "") {
    if (!text) return;
    const body = text.replace(/\r?\n/g, "\r\n");
    this.#host.write(style ? `\x1b[${style}m${body}\x1b[0m` : body);
    this.#atLineStart = text.endsWith("\n");
  }

  /**
   * Keystrokes from the terminal (one key, an escape sequence, or pasted text).
   * @param {string} data
   */
  handleData(data) {
    if (data.startsWith("\x1b[")) return this.#escape(data);
    for (const ch of data) {
      if (ch === "\r" || ch === "\n") this.#enter();
      else if (ch === "\x7f" || ch === "\b") this.#backspace();
      else if (ch === "\x03") this.#interrupt();
      else if (ch === "\x0c") {
        this.#host.write("\x1b[2J\x1b[H");
        this.showPrompt();
      } else if (ch >= " " || ch === "\t") {
        const text = ch === "\t" ? "    " : ch;
        this.line += text;
        this.#host.write(text);
        this.#atLineStart = false;
      }
    }
  }

  /** @param {string} seq */
  #escape(seq) {
    if (this.busy || (seq !== "\x1b[A" && seq !== "\x1b[B")) return;
    const step = seq === "\x1b[A" ? -1 : 1;
    this.#historyAt = Math.min(this.history.length, Math.max(0, this.#historyAt + step));
    this.line = this.history[this.#historyAt] ?? "";
    this.#host.write(`\r\x1b[K${this.prompt}${this.line}`);
  }

  #backspace() {
    if (!this.line) return;
    // Tabs were typed as four spaces; erase by code points so a non-ASCII character goes whole.
    this.line = [...this.line].slice(0, -1).join("");
    this.#host.write("\b \b");
  }

  #interrupt() {
    if (this.busy) {
      this.#host.write("^C");
      this.#host.interrupt();
      return;
    }
    this.pending = [];
    this.line = "";
    this.#host.write("^C\r\nKeyboardInterrupt\r\n");
    this.showPrompt();
  }

  #enter() {
    const line = this.line;
    this.line = "";
    this.#host.write("\r\n");
    this.#atLineStart = true;
    if (this.busy) {
      this.#host.input(line + "\n");
      return;
    }
    if (!this.pending.length && !line.trim()) return this.showPrompt();
    this.pending.push(line);
    if (needsMore(this.pending)) return this.showPrompt();
    const source = this.pending.join("\n");
    // Only one-line statements are recalled: a block recalled line by line would not run as typed.
    if (!source.trimEnd().includes("\n")) {
      this.history.push(source.trimEnd());
      this.#historyAt = this.history.length;
    }
    this.busy = true;
    this.#atLineStart = true;
    this.#host.execute(source).finally(() => this.#done());
  }
}
