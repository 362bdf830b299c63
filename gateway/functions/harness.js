// sandgate's JavaScript harness: one invoke or test run, as the source of one exec.
// gateway/functions/harness.py puts the call's parameters in P below (as a JSON string
// literal), and the gateway reads the report this writes under the root's .sandgate/ folder.
// Runs under QuickJS (`qjs --std`: the std and os globals, no event loop) and Node (require, an
// event loop): the few things that differ are in `host`.
(function (globalEval) {
  "use strict";
  const P = JSON.parse(__PARAMS__);
  const isNode = typeof process === "object" && typeof require === "function";
  const PRIVATE = ".sandgate";
  const MAX_TRACKED = 10000;

  const host = isNode ? (() => {
    const fs = require("fs");
    return {
      // Node runs with the sandbox root as its working directory.
      root: process.cwd(),
      list(dir) { try { return fs.readdirSync(dir, { withFileTypes: true }).map((d) => [d.name, d.isDirectory(), d.isFile()]); } catch (e) { return []; } },
      stat(path) { try { const s = fs.lstatSync(path); return [s.size, s.mtimeMs]; } catch (e) { return null; } },
      write(path, text) {
        fs.mkdirSync(path.slice(0, path.lastIndexOf("/")), { recursive: true });
        fs.writeFileSync(path + ".tmp", text);
        fs.renameSync(path + ".tmp", path);
      },
      eventLoop: true,
    };
  })() : {
    // QuickJS is run by the WASM runtime, whose sandbox root is always /work (its cwd is "/").
    // Its WASI build has no lstat; WASI's stat does not follow a symlink's last component anyway.
    root: "/work",
    list(dir) {
      const [names, err] = os.readdir(dir);
      if (err) return [];
      return names.filter((n) => n !== "." && n !== "..").map((n) => {
        const [st, e] = os.stat(dir + "/" + n);
        const type = e ? 0 : st.mode & os.S_IFMT;
        return [n, type === os.S_IFDIR, type === os.S_IFREG];
      });
    },
    stat(path) { const [st, err] = os.stat(path); return err ? null : [st.size, st.mtime]; },
    write(path, text) {
      const dirs = path.split("/").slice(1, -1);
      let at = "";
      for (const d of dirs) { at += "/" + d; os.mkdir(at); }
      const f = std.open(path + ".tmp", "w");
      if (!f) throw new Error("cannot write the report " + path);
      f.puts(text);
      f.close();
      os.rename(path + ".tmp", path);
    },
    eventLoop: false,
  };

  function snapshot() {
    const files = new Map();
    const stack = [""];
    let truncated = false;
    while (stack.length && !truncated) {
      const rel = stack.pop();
      for (const [name, isDir, isFile] of host.list(rel ? host.root + "/" + rel : host.root)) {
        const path = rel ? rel + "/" + name : name;
        if (path === PRIVATE) continue;
        if (isDir) stack.push(path);
        else if (isFile) {
          const st = host.stat(host.root + "/" + path);
          if (st) files.set(path, st[0] + ":" + st[1]);
          if (files.size >= MAX_TRACKED) { truncated = true; break; }
        }
      }
    }
    return [files, truncated];
  }

  function changes(before, after) {
    const out = {
      created: [...after[0].keys()].filter((p) => !before[0].has(p)).sort(),
      modified: [...after[0].keys()].filter((p) => before[0].has(p) && before[0].get(p) !== after[0].get(p)).sort(),
      deleted: [...before[0].keys()].filter((p) => !after[0].has(p)).sort(),
    };
    if (before[1] || after[1]) out.truncated = true;
    return out;
  }

  function errorOf(e) {
    if (e instanceof Error) {
      return { type: e.name || (e.constructor && e.constructor.name) || "Error", message: String(e.message),
               traceback: String(e.stack || "") };
    }
    return { type: typeof e, message: String(e), traceback: "" };
  }

  function report(outcome) {
    host.write(host.root + "/" + P.report, JSON.stringify(outcome));
  }

  function isThenable(v) { return v !== null && (typeof v === "object" || typeof v === "function") && typeof v.then === "function"; }

  // Settles `value` (a plain value or a promise): `done(ok, valueOrError)`. Without an event loop
  // a promise never settles, which is said rather than waited for.
  function settle(value, done) {
    if (!isThenable(value)) return done(true, value);
    if (!host.eventLoop) {
      return done(false, { type: "Unsupported", traceback: "",
        message: "this runtime's JavaScript engine runs no event loop: async functions and promises cannot be awaited" });
    }
    value.then((v) => done(true, v), (e) => done(false, errorOf(e)));
  }

  // The user's code, evaluated at global scope (functions and vars it declares become globals);
  // `tail` is an expression whose value the evaluation returns.
  function load(tail) { return globalEval(P.code + "\n;" + tail); }

  function invoke() {
    const before = snapshot();
    const finish = (outcome) => { outcome.files = changes(before, snapshot()); report(outcome); };
    let fn;
    try {
      fn = load(`(typeof ${P.function} === "undefined" ? undefined : ${P.function})`);
    } catch (e) {
      return finish({ status: "error", result: null, error: errorOf(e) });
    }
    if (typeof fn !== "function") {
      const what = fn === undefined ? "is not defined by the code" : "is not a function";
      return finish({ status: "error", result: null, error: { type: "FunctionNotFound", traceback: "",
        message: `'${P.function}' ${what}` } });
    }
    const args = P.args.slice();
    if (Object.keys(P.kwargs).length) args.push(P.kwargs);
    let value;
    try {
      value = fn(...args);
    } catch (e) {
      return finish({ status: "error", result: null, error: errorOf(e) });
    }
    settle(value, (ok, v) => {
      if (!ok) return finish({ status: "error", result: null, error: v });
      let text;
      try {
        text = JSON.stringify(v === undefined ? null : v);
      } catch (e) {
        return finish({ status: "error", result: null, error: { type: "ResultNotSerializable", traceback: "",
          message: `the function returned a value that is not JSON-serialisable: ${e.message}` } });
      }
      finish({ status: "success", result: JSON.parse(text === undefined ? "null" : text), error: null });
    });
  }

  // -- test mode: `test(name, fn)` and `assert`, as globals of the code and its tests --------------

  class AssertionError extends Error {
    constructor(message) { super(message); this.name = "AssertionError"; }
  }
  const show = (v) => { try { return JSON.stringify(v); } catch (e) { return String(v); } };
  function deepEqual(a, b) {
    if (Object.is(a, b)) return true;
    if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
    if (Array.isArray(a) !== Array.isArray(b) || Object.getPrototypeOf(a) !== Object.getPrototypeOf(b)) return false;
    if (a instanceof Date) return a.getTime() === b.getTime();
    if (a instanceof Map || a instanceof Set) {
      if (a.size !== b.size) return false;
      return deepEqual([...a.entries()], [...b.entries()]);
    }
    const ka = Object.keys(a), kb = Object.keys(b);
    if (ka.length !== kb.length) return false;
    return ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && deepEqual(a[k], b[k]));
  }
  function check(pass, message, fallback) { if (!pass) throw new AssertionError(message || fallback); }
  const assert = (value, message) => check(!!value, message, `Expected ${show(value)} to be truthy`);
  assert.ok = assert;
  assert.is = (actual, expected, message) =>
    check(Object.is(actual, expected), message, `Expected ${show(actual)} to be ${show(expected)}`);
  assert.equal = (actual, expected, message) =>
    check(deepEqual(actual, expected), message, `Expected ${show(actual)} to deeply equal ${show(expected)}`);
  assert.not = (value, message) => check(!value, message, `Expected ${show(value)} to be falsy`);
  assert.not.ok = assert.not;
  assert.not.is = (actual, expected, message) =>
    check(!Object.is(actual, expected), message, `Expected ${show(actual)} not to be ${show(expected)}`);
  assert.not.equal = (actual, expected, message) =>
    check(!deepEqual(actual, expected), message, `Expected ${show(actual)} not to deeply equal ${show(expected)}`);
  assert.throws = (fn, expected, message) => {
    try {
      fn();
    } catch (e) {
      if (expected === undefined) return;
      if (expected instanceof RegExp) return check(expected.test(String(e && e.message)), message, `Expected the error message ${show(String(e && e.message))} to match ${expected}`);
      if (typeof expected === "function" && expected.prototype instanceof Error || expected === Error) return check(e instanceof expected, message, `Expected a ${expected.name}, got ${show(String(e))}`);
      if (typeof expected === "function") return check(!!expected(e), message, `The thrown ${show(String(e))} did not satisfy the check`);
      if (typeof expected === "string") return check(String(e && e.message).includes(expected), message, `Expected the error message to include ${show(expected)}`);
      return;
    }
    throw new AssertionError(message || "Expected the function to throw");
  };
  assert.AssertionError = AssertionError;

  function runTests() {
    const tests = [];
    globalThis.test = (name, fn) => { tests.push({ name: String(name), fn }); };
    globalThis.assert = assert;
    const results = [];
    const started = Date.now();
    const done = (error) => {
      const passed = results.filter((t) => t.passed).length;
      const failed = results.filter((t) => !t.passed && !t.skipped).length;
      const skipped = results.filter((t) => t.skipped).length;
      if (!error && !results.length) error = { type: "NoTests", traceback: "", message: "no test was found: define tests with test(name, fn)" };
      report({ success: !error && failed === 0 && results.length > 0, error: error || null,
               summary: { total: results.length, passed, failed, skipped }, tests: results,
               duration_ms: Date.now() - started });
    };
    try {
      globalEval(P.code + "\n;\n" + P.tests + "\n;undefined");
    } catch (e) {
      return done(errorOf(e));
    }
    const next = (i) => {
      if (i >= tests.length) return done(null);
      const t = tests[i];
      const begun = Date.now();
      const record = (ok, e) => {
        results.push({ name: t.name, passed: ok, skipped: false, duration_ms: Date.now() - begun,
                       error: ok ? null : (e && e.message !== undefined ? `${e.type || e.name}: ${e.message}` : String(e)) });
        next(i + 1);
      };
      let value;
      try {
        value = t.fn();
      } catch (e) {
        return record(false, errorOf(e));
      }
      settle(value, (ok, v) => record(ok, ok ? null : v));
    };
    next(0);
  }

  if (P.mode === "invoke") invoke();
  else runTests();
})(eval);
