// Unit tests of the IDE's Python console (run by tests/gateway/test_js.py with `node --test`).
import assert from "node:assert/strict";
import { test } from "node:test";

import { needsMore, PythonConsole } from "../../gateway/web/static/pyconsole.js";

test("a simple statement is complete", () => {
  assert.equal(needsMore(["x = 1"]), false);
  assert.equal(needsMore(["print('a: b')"]), false, "a colon inside a string opens no block");
  assert.equal(needsMore(["x = 1  # note:"]), false, "nor does one in a comment");
});

test("blocks wait for their empty line", () => {
  assert.equal(needsMore(["for i in range(3):"]), true);
  assert.equal(needsMore(["for i in range(3):", "    print(i)"]), true);
  assert.equal(needsMore(["for i in range(3):", "    print(i)", ""]), false);
  assert.equal(needsMore(["@decorator"]), true);
});

test("open brackets, strings and backslashes continue", () => {
  assert.equal(needsMore(["xs = [1,"]), true);
  assert.equal(needsMore(["xs = [1,", " 2]"]), false);
  assert.equal(needsMore(['s = """start']), true);
  assert.equal(needsMore(['s = """start', 'end"""']), false);
  assert.equal(needsMore(["x = 1 + \\"]), true);
  assert.equal(needsMore(["s = ')'"]), false, "brackets inside strings do not count");
  assert.equal(needsMore(["s = 'unterminated"]), false, "Python reports that as a SyntaxError");
});

/** A console wired to a recording host; `execute` resolves when the test says so. */
function harness() {
  const host = { screen: "", ran: [], inputs: [], interrupts: 0, finish: null };
  const console_ = new PythonConsole({
    write: (text) => { host.screen += text; },
    execute: (source) => {
      host.ran.push(source);
      return new Promise((resolve) => { host.finish = resolve; });
    },
    input: (text) => host.inputs.push(text),
    interrupt: () => { host.interrupts++; },
  });
  console_.showPrompt();
  return { host, console: console_ };
}

test("a typed statement runs, its output is shown, the prompt comes back", async () => {
  const { host, console: c } = harness();
  c.handleData("6 * 7\r");
  assert.deepEqual(host.ran, ["6 * 7"]);
  assert.equal(c.busy, true);
  c.output("42\n");
  host.finish();
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(c.busy, false);
  assert.equal(host.screen, ">>> 6 * 7\r\n42\r\n>>> ");
});

test("a block is sent whole after its empty line", () => {
  const { host, console: c } = harness();
  c.handleData("for i in range(2):\r");
  c.handleData("\tprint(i)\r");
  assert.deepEqual(host.ran, []);
  assert.match(host.screen, /\.\.\.     print\(i\)/);
  c.handleData("\r");
  assert.deepEqual(host.ran, ["for i in range(2):\n    print(i)\n"]);
});

test("while code runs, lines go to its stdin and Ctrl-C interrupts it", () => {
  const { host, console: c } = harness();
  c.handleData("input()\r");
  c.handleData("Ada\r");
  c.handleData("\x03");
  assert.deepEqual(host.inputs, ["Ada\n"]);
  assert.equal(host.interrupts, 1);
});

test("backspace and history edit the line", async () => {
  const { host, console: c } = harness();
  c.handleData("x = 1\r");
  host.finish();
  await new Promise((resolve) => setImmediate(resolve));
  c.handleData("y€\x7f\x7f");
  assert.equal(c.line, "");
  c.handleData("\x1b[A");
  assert.equal(c.line, "x = 1");
});
