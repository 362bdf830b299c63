"""Look-ups of sandbox ids no pod has (issue 9): a made-up `sb_...` id must not cost a LIST on the API
server per request. Against the local test cluster (real kube-apiserver); LIST calls are counted by
the apiserver itself (its /metrics), and in-flight look-ups on the runtime's real request path."""

from __future__ import annotations

import asyncio
import re
import secrets
import ssl
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Settings
from gateway.web.app import MANAGER, create_app
from guest_agent.wire import ProtocolError
from plugins.pod import runtime as pod_runtime_module
from plugins.pod.runtime import PodRuntime
from tests.kube.cluster import KubeCluster
from tests.plugins.pod.test_pod_lifecycle import pod_runtime, spec_for

pytestmark = pytest.mark.pod

KEY = "pod-lookups-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: Namespaced LISTs of pods as the apiserver counts them (the test kubelet's own LIST is cluster-wide).
LIST_PODS = re.compile(r'^apiserver_request_total\{(?=[^}]*verb="LIST")(?=[^}]*resource="pods")'
                       r'(?=[^}]*scope="namespace")[^}]*\} (\S+)$', re.MULTILINE)


def namespaced_pod_lists(cluster: KubeCluster) -> float:
    context = ssl.create_default_context(cafile=str(cluster.ca_file))
    request = urllib.request.Request(cluster.server + "/metrics",
                                     headers={"Authorization": f"Bearer {cluster.admin_token}"})
    with urllib.request.urlopen(request, context=context, timeout=30) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in LIST_PODS.findall(text))


def made_up_id() -> str:
    return "sb_" + secrets.token_urlsafe(16)


class InFlight:
    """Wraps the runtime's real `Kube.call` and records how many pod LISTs run at once."""

    def __init__(self, runtime: PodRuntime) -> None:
        self.kube = runtime.kube
        self.real: Callable[..., Awaitable[dict[str, Any]]] = self.kube.call
        self.running = 0
        self.most = 0
        self.calls = 0

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if fn != self.kube.core.list_namespaced_pod:
            return await self.real(fn, *args, **kwargs)
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            return await self.real(fn, *args, **kwargs)
        finally:
            self.running -= 1

    def __enter__(self) -> InFlight:
        self.kube.call = self.call  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.kube.call = self.real  # type: ignore[method-assign]


async def test_a_made_up_id_is_listed_once_not_per_request(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], pod_config: dict[str, Any],
    kube_cluster: KubeCluster,
) -> None:
    settings = Settings(api_keys={KEY: "tenant-a"}, blocked_plugins=("wasm", "microvm"), default_runtime="pod",
                        reap_interval_s=3600.0, runtimes={"pod": {**pod_config, "sweep_interval_s": 3600.0}})
    client = await aiohttp_client(create_app(settings))
    sandbox_id = made_up_id()
    before = namespaced_pod_lists(kube_cluster)
    for _ in range(30):
        resp = await client.get(f"/v1/sandboxes/{sandbox_id}", headers=AUTH)
        assert resp.status == 404, await resp.text()
    # The WebSocket upgrade request, answered before any upgrade (a handshake error from ws_connect
    # would leave its connection for the garbage collector: an unclosed-socket warning later).
    upgrade = {**AUTH, "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    async with client.get(f"/v1/sandboxes/{sandbox_id}/ws", headers=upgrade) as resp:
        assert resp.status == 404, await resp.text()
    assert namespaced_pod_lists(kube_cluster) - before == 1, "31 requests for one made-up id: one LIST"
    runtime = client.app[MANAGER].runtimes["pod"]
    assert isinstance(runtime, PodRuntime)
    with InFlight(runtime) as spy:
        answers = await asyncio.gather(*(client.get(f"/v1/sandboxes/{made_up_id()}", headers=AUTH)
                                         for _ in range(40)))
    assert sorted({resp.status for resp in answers}) == [404]
    assert spy.calls == 40 and spy.most <= pod_runtime_module.MAX_FINDS_RUNNING, (spy.calls, spy.most)


async def test_look_ups_past_the_waiting_bound_are_refused_as_unavailable(pod_config: dict[str, Any]) -> None:
    running, waiting = pod_runtime_module.MAX_FINDS_RUNNING, pod_runtime_module.MAX_FINDS_WAITING
    async with pod_runtime(pod_config) as runtime:
        results = await asyncio.gather(*(runtime.find(made_up_id()) for _ in range(running + waiting + 20)),
                                       return_exceptions=True)
    refused = [r for r in results if isinstance(r, ProtocolError)]
    assert results.count(None) == running + waiting and len(refused) == 20, results
    assert {e.code for e in refused} == {"unavailable"} and all(e.kind.retryable for e in refused)


async def test_a_sandbox_this_gateway_creates_is_found_after_a_miss(pod_config: dict[str, Any]) -> None:
    sandbox_id = made_up_id()
    async with pod_runtime(pod_config) as runtime:
        with InFlight(runtime) as spy:
            assert await runtime.find(sandbox_id) is None
            assert await runtime.find(sandbox_id) is None
            assert spy.calls == 1, "the miss is remembered"
            backend = await runtime.create(spec_for(sandbox_id))
            try:
                found = await runtime.find(sandbox_id)
                assert found is not None and found["sandbox_id"] == sandbox_id, "the create forgot the miss"
            finally:
                await backend.destroy()


def test_the_miss_cache_is_bounded_and_expires() -> None:
    now = [0.0]
    cache = pod_runtime_module.MissCache(3, 10.0, clock=lambda: now[0])
    for key in "abcd":
        cache.add(key)
    assert len(cache) == 3 and not cache.holds("a") and cache.holds("d")
    now[0] = 10.0
    assert not cache.holds("d") and len(cache) == 2
