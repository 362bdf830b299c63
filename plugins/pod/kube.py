"""The few Kubernetes API calls the pod runtime makes, through kubernetes_asyncio, as JSON dicts.

kubernetes_asyncio is generated from the same OpenAPI spec as the official client, runs on aiohttp
(the gateway's own loop, no threads), and its WsApiClient gives the raw WebSocket of exec/attach:
full duplex and binary safe. Answers are taken raw (`_preload_content=False`) and decoded as JSON:
the runtime reads labels, annotations and conditions, which are dicts anyway, and skipping the
generated models saves their deserialisation on every watch event. Imported only at runtime start
(it costs ~1 s to import).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.stream import WsApiClient

#: A plain API call's deadline; watches use their own (server-side timeout plus slack).
CALL_TIMEOUT_S = 30.0
ApiCall = Callable[..., Awaitable[Any]]


class KubeError(Exception):
    """The API server refused a request (or a watch ended with an error event)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class Kube:
    """API groups bound to one authenticated client (and a WebSocket twin for exec/attach)."""

    def __init__(self, api: client.ApiClient, ws: WsApiClient, namespace: str) -> None:
        self.api = api
        self.ws = ws
        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.networking = client.NetworkingV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.core_ws = client.CoreV1Api(ws)

    @classmethod
    async def connect(cls, kubeconfig: str | None, context: str | None, namespace: str) -> Kube:
        """In-cluster credentials when running in a pod and no kubeconfig is named; otherwise the
        kubeconfig (`kubeconfig`, else $KUBECONFIG, else ~/.kube/config)."""
        configuration = client.Configuration()
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(config_file=kubeconfig, context=context,
                                          client_configuration=configuration, persist_config=False)
        return cls(client.ApiClient(configuration), WsApiClient(configuration), namespace)

    async def close(self) -> None:
        await self.api.close()
        await self.ws.close()

    async def call(self, fn: ApiCall, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One request; its JSON answer.

        Raises:
            KubeError: a non-2xx answer, with the Status's reason and message.
            aiohttp.ClientError, TimeoutError: the API server could not be reached in time.
        """
        resp = await fn(*args, _preload_content=False, _request_timeout=CALL_TIMEOUT_S, **kwargs)
        async with resp:
            body = await resp.read()
            if not 200 <= resp.status < 300:
                raise _error(resp.status, body)
        answer: dict[str, Any] = json.loads(body) if body else {}
        return answer

    async def watch(self, fn: ApiCall, *args: Any, resource_version: str, timeout_s: int,
                    **kwargs: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """`(type, object)` watch events from `resource_version` on, until the server ends the
        watch after `timeout_s`. A 410 (history compacted) and other error events raise KubeError:
        the caller lists again."""
        resp = await fn(*args, watch=True, resource_version=resource_version, timeout_seconds=timeout_s,
                        allow_watch_bookmarks=True, _preload_content=False,
                        _request_timeout=aiohttp.ClientTimeout(sock_connect=CALL_TIMEOUT_S,
                                                               sock_read=timeout_s + CALL_TIMEOUT_S),
                        **kwargs)
        async with resp:
            if resp.status != 200:
                raise _error(resp.status, await resp.read())
            ended = False
            try:
                while line := await resp.content.readline():
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        raise KubeError(int(obj.get("code", 500)), str(obj.get("reason", "")),
                                        str(obj.get("message", "")))
                    yield str(event.get("type")), obj
                ended = True
            finally:
                if not ended:  # left mid-stream: stopped, cancelled, an error event, a bad line
                    await _drop(resp)

    async def open_stream(self, fn: ApiCall, *args: Any, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        """An exec/attach WebSocket (v4.channel.k8s.io), open. A refused upgrade raises KubeError."""
        connecting = await fn(*args, _preload_content=False, **kwargs)  # the call hands back ws_connect()
        try:
            ws: aiohttp.ClientWebSocketResponse = await connecting
        except aiohttp.WSServerHandshakeError as exc:
            raise KubeError(exc.status, "Upgrade refused", exc.message) from None
        return ws


async def _drop(resp: aiohttp.ClientResponse) -> None:
    """Close a response's connection at once, mid-stream, and wait until it is closed.

    Released half-read, aiohttp would close it gracefully: a TLS close_notify, then a wait for the
    apiserver's (up to asyncio's 30 s) that nothing awaits; the connector no longer holds the
    connection, so `close` neither aborts it nor waits for it. A stopping runtime (`PodWatcher.stop`,
    then `close`) would return with that socket open, and an event loop that ends before the
    apiserver answers leaves it open for the garbage collector (ResourceWarning: unclosed transport).
    Nothing is lost by aborting: the stream is abandoned either way."""
    connection = resp.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is None or protocol.transport is None:
        return
    closed = protocol.closed  # done once the socket is closed (connection_lost)
    protocol.abort()
    if closed is not None:
        with contextlib.suppress(aiohttp.ClientConnectionError):  # it broke meanwhile: closed too
            await closed


def _error(status: int, body: bytes) -> KubeError:
    with contextlib.suppress(ValueError):
        status_obj = json.loads(body)
        if isinstance(status_obj, dict):
            return KubeError(status, str(status_obj.get("reason", "")), str(status_obj.get("message", "")))
    return KubeError(status, "", body[:300].decode("utf-8", "replace"))
