// The JavaScript client's serverless calls against a real gateway, started by tests/gateway/test_js.py
// (SANDGATE_TEST_URL, SANDGATE_TEST_KEY, SANDGATE_TEST_OTHER_KEY, SANDGATE_TEST_RUNTIME). On the
// example runtime (the guest agent as a host process) a call can wait for a file this test creates
// in SANDGATE_TEST_FLAGS, so a full queue and a running execution are produced without timing; on
// WASM the same calls run in real sandboxes, JavaScript included.
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { before, test } from "node:test";

import { Gateway, SandgateError } from "../../gateway/web/js/sandgate.js";

const url = process.env.SANDGATE_TEST_URL;
const apiKey = process.env.SANDGATE_TEST_KEY;
const runtime = process.env.SANDGATE_TEST_RUNTIME;
const flags = process.env.SANDGATE_TEST_FLAGS;
const skip = url && apiKey && runtime ? false : "needs a gateway: run through tests/gateway/test_js.py";
const hostFiles = flags ? false : "needs the example runtime (its calls see the host's files)";
const javascript = runtime === "wasm" ? false : "needs a runtime that runs JavaScript";

const ADD = "def add(a, b=0):\n    print('adding', a, b)\n    return a + b\n";
/** Python that blocks until `flag` exists (a host path: the example runtime's guest is a host process). */
const gate = (flag) => `import os, time\nprint('waiting', flush=True)\nwhile not os.path.exists(${JSON.stringify(flag)}):\n    time.sleep(0.01)\nprint('released', flush=True)\n`;
const GATE_FUNCTION = "import os, time\n\ndef gate(flag, answer=None):\n    while not os.path.exists(flag):\n        time.sleep(0.01)\n    return answer\n";

let gateway;
let other;

before(() => {
  if (skip) return;
  gateway = new Gateway({ url, apiKey });
  other = new Gateway({ url, apiKey: process.env.SANDGATE_TEST_OTHER_KEY });
});

/** Until `predicate(value)` holds for `poll()`'s answer (each poll is a request: no sleeping). */
async function until(poll, predicate) {
  for (;;) {
    const value = await poll();
    if (predicate(value)) return value;
  }
}

test("invoke over REST and over the session: typed statuses, files, kwargs", { skip }, async () => {
  const sandbox = await gateway.createSandbox({ runtime });
  try {
    const code = ADD + "\ndef write(name, text):\n    open(name, 'w').write(text)\n    return len(text)\n";
    const done = await gateway.invokeIn(sandbox.id, { function: "add", code, args: [2], kwargs: { b: 3 } });
    assert.equal(done.status, "success");
    assert.equal(done.result, 5);
    assert.equal(done.stdout, "adding 2 3\n");
    const wrote = await sandbox.invoke({ function: "write", code, args: ["out.txt", "hey"],
      files: { "in/blob.bin": new Uint8Array([0, 255]), "in/note.txt": "text" } });
    assert.equal(wrote.status, "success");
    assert.deepEqual(wrote.files, { created: ["out.txt"], modified: [], deleted: [] });
    assert.deepEqual(await sandbox.files.read("in/blob.bin"), new Uint8Array([0, 255]));
    const raised = await sandbox.invoke({ function: "f", code: "def f(x):\n    return x / 0\n", args: [1] });
    assert.equal(raised.status, "error");
    assert.equal(raised.error.type, "ZeroDivisionError");
    const late = await gateway.invokeIn(sandbox.id, { function: "f", timeout: 1,
      code: "def f():\n    while True:\n        pass\n" });
    assert.equal(late.status, "timeout");
    await assert.rejects(sandbox.invoke({ function: "not a name", code: ADD }), { code: "bad_request" });
    await assert.rejects(gateway.invokeIn(sandbox.id, { function: "add" }), { code: "bad_request", status: 400 });
    await assert.rejects(other.invokeIn(sandbox.id, { function: "add", code: ADD }), { code: "not_found", status: 404 });
  } finally {
    await sandbox.destroy();
  }
});

test("JavaScript functions and test mode, over REST and the session", { skip: skip || javascript }, async () => {
  const sandbox = await gateway.createSandbox({ runtime });
  try {
    const greet = "function greet(name, opts) { return {hello: name, loud: !!(opts && opts.loud)}; }";
    const done = await sandbox.invoke({ language: "javascript", function: "greet", code: greet, args: ["ada"],
      kwargs: { loud: true } });
    assert.deepEqual(done.result, { hello: "ada", loud: true });
    const body = { language: "javascript", code: "function add(a, b) { return a + b; }",
      tests: "test('adds', () => { assert.is(add(1, 2), 3); });\ntest('wrong', () => { assert.is(add(1, 1), 3); });" };
    for (const report of [await sandbox.runTests(body), await gateway.runTests(sandbox.id, body)]) {
      assert.equal(report.success, false);
      assert.deepEqual(report.summary, { total: 2, passed: 1, failed: 1, skipped: 0 });
      assert.match(report.tests.find((t) => t.name === "wrong").error, /Expected 2 to be 3/);
    }
  } finally {
    await sandbox.destroy();
  }
});

test("ephemeral invoke and execute leave nothing behind", { skip }, async () => {
  const before = await gateway.listSandboxes();
  const done = await gateway.invoke({ runtime, function: "add", code: ADD, args: [1, 2] });
  assert.equal(done.result, 3);
  const ran = await gateway.execute({ runtime, code: "import sys\nprint(sys.stdin.read()[::-1])", stdin: "olleh" });
  assert.equal(ran.exit_code, 0);
  assert.equal(ran.stdout, "hello\n");
  const late = await gateway.execute({ runtime, code: "while True: pass", timeout: 1 });
  assert.equal(late.error.code, "timeout");
  await assert.rejects(gateway.invoke({ runtime, function: "f" }), { code: "bad_request" });
  assert.deepEqual(await gateway.listSandboxes(), before);
});

test("deployed functions: warm instances, redeploy, tenancy, delete", { skip }, async () => {
  const counter = "calls = 0\n\ndef count(step=1):\n    global calls\n    calls += step\n    return calls\n";
  const deployed = await gateway.deployFunction("counter", { runtime, code: counter, function: "count" });
  assert.equal(deployed.name, "counter");
  assert.ok(deployed.version);
  const first = await gateway.invokeFunction("counter");
  const second = await gateway.invokeFunction("counter", { kwargs: { step: 10 } });
  assert.deepEqual([first.result, first.cold, second.result, second.cold], [1, true, 11, false]);
  assert.equal(first.instance, second.instance);
  assert.deepEqual((await gateway.listFunctions()).map((f) => f.name), ["counter"]);
  assert.equal((await gateway.getFunction("counter")).instances[0].id, first.instance);
  const again = await gateway.deployFunction("counter", { runtime, function: "count",
    code: counter.replace("calls += step", "calls += 2 * step") });
  assert.notEqual(again.version, deployed.version);
  assert.equal((await gateway.invokeFunction("counter")).result, 2);
  await assert.rejects(other.invokeFunction("counter"), { code: "not_found" });
  await gateway.deleteFunction("counter");
  await assert.rejects(gateway.getFunction("counter"), { code: "not_found", status: 404 });
});

test("a full queue rejects with quota_exceeded, 429 and retryAfter", { skip: skip || hostFiles }, async () => {
  const flag = path.join(flags, "queue-go");
  await gateway.deployFunction("gate", { runtime, code: GATE_FUNCTION, function: "gate", max_instances: 1 });
  const calls = [0, 1].map((n) => gateway.invokeFunction("gate", { args: [flag, n] }));
  // One call holds (or is making) the instance, one waits in the queue (queue_per_instance = 1) ...
  await until(() => gateway.getFunction("gate"), (info) => info.queued === 1);
  // ... so the next is refused at once.
  const refused = await gateway.invokeFunction("gate", { args: [flag] }).catch((err) => err);
  assert.ok(refused instanceof SandgateError, String(refused));
  assert.equal(refused.code, "quota_exceeded");
  assert.equal(refused.status, 429);
  assert.equal(refused.retryable, true);
  assert.equal(refused.retryAfter, 1);
  fs.writeFileSync(flag, "");
  const done = await Promise.all(calls);
  assert.deepEqual(done.map((d) => d.result).sort(), [0, 1]);
  await gateway.deleteFunction("gate");
});

test("background executions: follow without loss, wait, list, cancel", { skip }, async () => {
  const sandbox = await gateway.createSandbox({ runtime });
  try {
    const flag = flags ? path.join(flags, "execution-go") : null;
    const code = flag ? gate(flag) : "print('waiting', flush=True)\nprint('released', flush=True)";
    const started = await gateway.startExecution(sandbox.id, { code, tag: "job" });
    assert.ok(["pending", "running"].includes(started.state));
    let stdout = "";
    let last;
    for await (last of gateway.followExecution(sandbox.id, started.id, { interval: 0.2 })) {
      stdout += last.stdout;
      if (flag && stdout.includes("waiting") && !fs.existsSync(flag)) {
        assert.equal(last.state, "running");
        fs.writeFileSync(flag, "");
      }
    }
    assert.equal(stdout, "waiting\nreleased\n");
    assert.equal(last.state, "completed");
    const whole = await gateway.waitExecution(sandbox.id, started.id);
    assert.equal(whole.stdout, stdout);
    assert.equal((await gateway.getExecution(sandbox.id, started.id, { outputOffset: whole.output_offset })).stdout, "");
    // An execution is an exec like any other: the session attaches to it.
    let attached = "";
    await sandbox.attach({ execId: started.id }, { onData: (data) => { attached += new TextDecoder().decode(data); } }).wait();
    assert.equal(attached, stdout);

    const spin = await gateway.startExecution(sandbox.id, { code: "while True: pass" });
    await assert.rejects(gateway.waitExecution(sandbox.id, spin.id, { timeout: 0.2 }), { code: "timeout" });
    assert.deepEqual((await gateway.listExecutions(sandbox.id, { state: "running" })).map((e) => e.id), [spin.id]);
    assert.equal((await gateway.cancelExecution(sandbox.id, spin.id)).state, "cancelled");
    assert.deepEqual((await gateway.listExecutions(sandbox.id, { limit: 1 })).map((e) => e.state), ["cancelled"]);
    await assert.rejects(gateway.getExecution(sandbox.id, "e-nope"), { code: "not_found" });
    await assert.rejects(other.getExecution(sandbox.id, started.id), { code: "not_found" });
  } finally {
    await sandbox.destroy();
  }
});

test("the code cache and codeRef", { skip }, async () => {
  const code = ADD + "# cached\n";
  const sandbox = await gateway.createSandbox({ runtime });
  try {
    await sandbox.invoke({ function: "add", code, args: [1] });
    const entry = (await gateway.cacheEntries()).find((e) => e.bytes === code.length && e.language === "python");
    assert.ok(entry, "the invoke's code was cached");
    assert.equal((await sandbox.invoke({ function: "add", code_ref: entry.hash, args: [4] })).result, 4);
    assert.equal((await sandbox.run({ codeRef: entry.hash })).exitCode, 0);
    assert.throws(() => sandbox.exec({ code, codeRef: entry.hash }), /exactly one/);
    assert.ok(!(await other.cacheEntries()).some((e) => e.hash === entry.hash));
    await gateway.deleteCacheEntry(entry.hash);
    await assert.rejects(gateway.deleteCacheEntry(entry.hash), { code: "not_found" });
    await assert.rejects(sandbox.invoke({ function: "add", code_ref: entry.hash }), { code: "not_found" });
    await gateway.clearCache();
    assert.deepEqual(await gateway.cacheEntries(), []);
  } finally {
    await sandbox.destroy();
  }
});
