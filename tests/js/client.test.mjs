// The JavaScript client against a real gateway (started by tests/gateway/test_js.py, which sets
// SANDGATE_TEST_URL and SANDGATE_TEST_KEY), through a TCP proxy that can stall its connections the
// way a dead network path does: no reset, no close, just silence.
import assert from "node:assert/strict";
import net from "node:net";
import { after, before, test } from "node:test";

import { Gateway } from "../../gateway/web/js/sandgate.js";

const url = process.env.SANDGATE_TEST_URL;
const apiKey = process.env.SANDGATE_TEST_KEY;
const skip = url && apiKey ? false : "needs a gateway: run through tests/gateway/test_js.py";

/** A proxy whose open connections `stall()` silences; new connections pass. */
function stallingProxy(target) {
  const pairs = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.hostname);
    const pair = { client, upstream, stalled: false };
    pairs.add(pair);
    client.on("data", (chunk) => { if (!pair.stalled) upstream.write(chunk); });
    upstream.on("data", (chunk) => { if (!pair.stalled) client.write(chunk); });
    const end = () => { client.destroy(); upstream.destroy(); pairs.delete(pair); };
    client.on("close", end).on("error", end);
    upstream.on("close", end).on("error", end);
  });
  return {
    server,
    listen: () => new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server.address().port))),
    stall() { for (const pair of pairs) pair.stalled = true; },
    close() {
      for (const pair of pairs) { pair.client.destroy(); pair.upstream.destroy(); }
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Resolves when `predicate()` holds, checked whenever `on` fires. */
function when(subscribe, predicate) {
  return new Promise((resolve) => {
    const off = subscribe(() => { if (predicate()) { off(); resolve(); } });
    if (predicate()) { off(); resolve(); }
  });
}

const PROGRAM = `
import sys
for i in range(50):
    print(f"line {i:04d}", flush=True)
sys.stdin.readline()
for i in range(50, 100):
    print(f"line {i:04d}", flush=True)
`;

let proxy;
let viaProxy;
let direct;

before(async () => {
  if (skip) return;
  proxy = stallingProxy(new URL(url));
  const port = await proxy.listen();
  // Short liveness settings, so a silent connection is found out in a fraction of a second.
  // Deadlines short too: Node's HTTP pool may try a stalled keep-alive connection first.
  viaProxy = new Gateway({ url: `http://127.0.0.1:${port}`, apiKey, pingInterval: 200, pingTimeout: 300,
                           connectTimeout: 1000, requestTimeout: 2000 });
  direct = new Gateway({ url, apiKey });
});

after(async () => {
  if (proxy) await proxy.close();
});

test("a silent connection is found out by its ping and the stream resumes", { skip }, async () => {
  const sandbox = await viaProxy.createSandbox({ runtime: "wasm" });
  const states = [];
  const changed = new Set();
  sandbox.on("state", (event) => { states.push(event); for (const fn of changed) fn(); });
  let text = "";
  const exec = sandbox.exec({ code: PROGRAM, stdinOpen: true }, {
    onData: (data) => { text += new TextDecoder().decode(data); for (const fn of changed) fn(); },
  });
  const subscribe = (fn) => { changed.add(fn); return () => changed.delete(fn); };
  await when(subscribe, () => text.includes("line 0049"));

  proxy.stall();
  await when(subscribe, () => states.some((s) => s.state === "reconnecting"));
  assert.match(states.find((s) => s.state === "reconnecting").reason, /ping unanswered/);
  // Released from another connection, so phase 2 is produced whether or not this one is back yet.
  const other = await direct.connect(sandbox.id);
  await other.request("exec.input", { exec_id: exec.execId, data: new TextEncoder().encode("\n") });
  other.close();

  const result = await exec.wait();
  assert.equal(result.exitCode, 0);
  const lines = text.trim().split("\n");
  assert.deepEqual(lines, Array.from({ length: 100 }, (_, i) => `line ${String(i).padStart(4, "0")}`));
  assert.equal(sandbox.reconnects, 1);
  await sandbox.destroy();
});

test("a sandbox destroyed while the client is cut off ends its streams, nothing hangs", { skip }, async () => {
  const sandbox = await viaProxy.createSandbox({ runtime: "wasm" });
  let started;
  const running = new Promise((resolve) => { started = resolve; });
  const exec = sandbox.exec({ code: "import sys; sys.stdin.readline()", stdinOpen: true }, { onStart: started });
  const closed = new Promise((resolve) => sandbox.on("state", (event) => { if (event.state === "closed") resolve(event); }));
  await running;
  proxy.stall(); // the gateway's 4404 close never arrives: the client must find out for itself
  await direct.destroySandbox(sandbox.id);
  const event = await closed; // the reconnect's REST check finds the sandbox gone
  assert.equal(event.error.code, "not_found");
  const result = await exec.wait();
  assert.equal(result.error.code, "not_found");
  await assert.rejects(sandbox.metrics(), { code: "not_found" });
});

test("a watch delivers every change once, in order, across a stalled connection", { skip }, async () => {
  const sandbox = await viaProxy.createSandbox({ runtime: "wasm" });
  const changes = [];
  const changed = new Set();
  const subscribe = (fn) => { changed.add(fn); return () => changed.delete(fn); };
  const states = [];
  sandbox.on("state", (event) => { states.push(event); for (const fn of changed) fn(); });
  const watch = sandbox.files.watch(".", { pollInterval: 0.05 }, {
    onChange: (change) => { changes.push(`${change.kind} ${change.path}`); for (const fn of changed) fn(); },
  });
  await watch.started();
  assert.equal(watch.backend, "poll");
  const other = await direct.connect(sandbox.id);
  const put = (path) => other.request("fs.write", { path, data: new TextEncoder().encode(path), truncate: true });
  await put("first.txt");
  await when(subscribe, () => changes.length === 1);
  proxy.stall();
  await when(subscribe, () => states.some((s) => s.state === "reconnecting"));
  const names = Array.from({ length: 10 }, (_, i) => `f${i}.txt`);
  for (const name of names) await put(name); // while this client is cut off; polls see them one by one
  await when(subscribe, () => changes.length === 11);
  assert.deepEqual(changes, ["created first.txt", ...names.map((name) => `created ${name}`)]);
  assert.equal(sandbox.reconnects, 1);
  await watch.stop();
  assert.deepEqual(await watch.wait(), { error: null });
  other.close();
  await sandbox.destroy();
});

test("bad input gets clear errors", { skip }, async () => {
  assert.throws(() => new Gateway({ url }), /apiKey/);
  assert.throws(() => new Gateway({ url, apiKey, wire: "xml" }), /wire must be/);
  await assert.rejects(new Gateway({ url, apiKey: "wrong" }).runtimes(), { code: "unauthorized", status: 401 });
  await assert.rejects(direct.connect("sb_missing"), { code: "not_found" });
  const sandbox = await direct.createSandbox({ runtime: "wasm" });
  assert.throws(() => sandbox.exec({ code: "1", command: ["true"] }), /exactly one/);
  await assert.rejects(sandbox.exec({ command: ["true"] }).wait(), { code: "unsupported" });
  await assert.rejects(sandbox.files.read("../etc/passwd"), { code: "path_escape" });
  await sandbox.destroy();
});

test("rich output arrives as display bundles, in order, on both wires", { skip }, async () => {
  for (const wire of ["json", "msgpack"]) {
    const sandbox = await new Gateway({ url, apiKey, wire }).createSandbox({ runtime: "wasm" });
    const order = [];
    const code = "class T:\n    def _repr_html_(self):\n        return '<i>t</i>'\n"
      + "print('a')\ndisplay(T())\ndisplay({'image/png': b'\\x89PNG'}, raw=True)\nprint('b')";
    const result = await sandbox.run({ code });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.equal(result.stdout, "a\nb\n");
    assert.equal(result.display.length, 2);
    assert.equal(result.display[0]["text/html"], "<i>t</i>");
    assert.match(result.display[0]["text/plain"], /<__main__\.T object at/);
    assert.equal(Buffer.from(result.display[1]["image/png"], "base64").toString("latin1"), "\x89PNG");
    await sandbox.exec({ code }, {
      onData: (data) => order.push(new TextDecoder().decode(data).trim()),
      onDisplay: (bundle) => order.push(Object.keys(bundle).sort().join(",")),
    }).wait();
    assert.deepEqual(order, ["a", "text/html,text/plain", "image/png,text/plain", "b"]);
    await sandbox.destroy();
  }
});

test("volumes and absolute paths over REST", { skip }, async () => {
  const volume = await direct.createVolume("js-notes", { quota_mb: 16 });
  assert.equal(volume.name, "js-notes");
  assert.deepEqual(await direct.uploadToVolume("js-notes", "seed.txt", "seeded"), { path: "seed.txt", bytes: 6 });
  const info = await direct.createSandbox({ runtime: "wasm", volumes: { "/notes": { name: "js-notes" } } });
  try {
    await direct.upload(info.id, "/notes/out.txt", "from js");
    await direct.upload(info.id, "/work/abs.txt", "absolute");
    assert.equal(await (await direct.download(info.id, "abs.txt")).text(), "absolute");
    assert.equal(await (await direct.download(info.id, "/notes/seed.txt")).text(), "seeded");
    await direct.removeFile(info.id, "/work/abs.txt");
    await assert.rejects(direct.download(info.id, "abs.txt"), { code: "not_found" });
    await assert.rejects(direct.deleteVolume("js-notes"), { code: "busy" });
  } finally {
    await direct.destroySandbox(info.id);
  }
  assert.equal(await (await direct.downloadFromVolume("js-notes", "out.txt")).text(), "from js");
  assert.deepEqual((await direct.listVolumes()).map((v) => v.name), ["js-notes"]);
  await direct.deleteVolume("js-notes");
  assert.deepEqual(await direct.listVolumes(), []);
});
