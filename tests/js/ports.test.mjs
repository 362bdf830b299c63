// The JavaScript client's published ports (`sandbox.ports`) against a real gateway started by
// tests/gateway/test_js.py (SANDGATE_TEST_URL, SANDGATE_TEST_KEY, SANDGATE_TEST_PORT: a server the
// sandbox's agent, a host process there, reaches on its loopback).
import assert from "node:assert/strict";
import { test } from "node:test";

import { Gateway, SandgateError } from "../../gateway/web/js/sandgate.js";

const url = process.env.SANDGATE_TEST_URL;
const apiKey = process.env.SANDGATE_TEST_KEY;
const port = Number(process.env.SANDGATE_TEST_PORT);
const skip = url && apiKey && port ? false : "needs a gateway: run through tests/gateway/test_js.py";

test("publish, open the preview without the key, list, unpublish", { skip }, async () => {
  const gateway = new Gateway({ url, apiKey });
  const sandbox = await gateway.createSandbox();
  try {
    const published = await sandbox.ports.publish(port);
    assert.equal(published.url, `${url}/v1/sandboxes/${sandbox.id}/ports/${port}/`);
    assert.equal((await sandbox.ports.publish(port)).token, published.token);
    // The preview URL: a redirect that sets the port's cookie, then the page with the cookie alone.
    const exchange = await fetch(published.previewUrl, { redirect: "manual" });
    assert.equal(exchange.status, 303);
    const cookie = exchange.headers.get("set-cookie").split(";")[0];
    const page = await fetch(new URL(exchange.headers.get("location"), url), { headers: { cookie } });
    assert.equal(await page.text(), "served /");
    assert.deepEqual((await sandbox.ports.list()).map((p) => p.port), [port]);
    await sandbox.ports.unpublish(port);
    assert.deepEqual(await sandbox.ports.list(), []);
    await assert.rejects(sandbox.ports.unpublish(port), (err) => err instanceof SandgateError && err.code === "not_found");
    assert.equal((await fetch(published.previewUrl, { redirect: "manual" })).status, 401);
  } finally {
    await sandbox.destroy();
  }
});
