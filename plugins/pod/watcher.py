"""One list-and-watch of this gateway's sandbox pods, shared by every wait, and what a pod's status
means for a sandbox.

Readiness, death and deletion are all read from watch events (never by polling): each change wakes
the waiters, which re-check the pod they care about. Pods that leave the selector (deleted, or
adopted by another gateway, which relabels them) are remembered for a while as `gone`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiohttp

from plugins.pod.kube import Kube, KubeError
from plugins.pod.manifests import AGENT_CONTAINER

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Waiting reasons after which the kubelet would only retry what already failed: fail the create
#: now with the reason rather than at the ready deadline.
FATAL_WAITING = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
    "CreateContainerError", "RunContainerError", "CrashLoopBackOff",
})
WATCH_TIMEOUT_S = 300
RELIST_BACKOFF_S = 1.0
GONE_KEPT = 2048


def _statuses(pod: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    return list((pod.get("status") or {}).get(key) or [])


def main_status(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    for status in _statuses(pod, "containerStatuses"):
        if status.get("name") == AGENT_CONTAINER:
            return status
    return None


def is_running(pod: Mapping[str, Any]) -> bool:
    """The sandbox container runs (what exec and attach need), and nobody is deleting the pod."""
    status = main_status(pod)
    return (status is not None and "running" in (status.get("state") or {})
            and not (pod.get("metadata") or {}).get("deletionTimestamp"))


def _terminated(status: Mapping[str, Any]) -> str | None:
    term = (status.get("state") or {}).get("terminated")
    if term is None:
        return None
    what = term.get("reason") or "Terminated"
    detail = f": {term['message'].strip()[:300]}" if term.get("message") else ""
    signal = f", signal {term['signal']}" if term.get("signal") else ""
    return f"{what}, exit code {term.get('exitCode')}{signal}{detail}"


def problem(pod: Mapping[str, Any], *, fail_unschedulable: bool = True) -> str | None:
    """Why this pod will not (or no longer) serve a sandbox, or None while it may."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if metadata.get("deletionTimestamp"):
        return "the pod is being deleted"
    for container in _statuses(pod, "initContainerStatuses"):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING:
            detail = f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
            return f"init container {container.get('name')}: {detail}"
        term = (container.get("state") or {}).get("terminated")
        if term is not None and term.get("exitCode") != 0:
            return f"init container {container.get('name')} failed: {_terminated(container)}"
    main = main_status(pod)
    if main is not None:
        waiting = (main.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING:
            return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
        ended = _terminated(main)
        if ended is not None:
            return f"the sandbox container terminated ({ended})"
    if status.get("phase") in ("Failed", "Succeeded"):
        reason = ": ".join(str(status[k]) for k in ("reason", "message") if status.get(k))
        return f"the pod {status['phase'].lower()}" + (f" ({reason})" if reason else "")
    if fail_unschedulable:
        for condition in status.get("conditions") or []:
            if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                    and condition.get("reason") == "Unschedulable"):
                return f"unschedulable: {condition.get('message', '')}".rstrip(": ")
    return None


def summary(pod: Mapping[str, Any] | None) -> str:
    """A one-line status for a deadline's error message."""
    if pod is None:
        return "the pod was never seen"
    status = pod.get("status") or {}
    parts = [f"phase {status.get('phase', '?')}"]
    for container in _statuses(pod, "initContainerStatuses") + _statuses(pod, "containerStatuses"):
        state = container.get("state") or {}
        for kind, detail in state.items():
            reason = (detail or {}).get("reason")
            parts.append(f"{container.get('name')} {kind}" + (f" ({reason})" if reason else ""))
    for condition in status.get("conditions") or []:
        if condition.get("status") == "False" and condition.get("reason"):
            parts.append(f"{condition['type']}=False ({condition['reason']})")
    return ", ".join(parts)


class PodWatcher:
    """Args:
    kube: the API client.
    selector: the label selector of the pods to follow (this gateway's sandbox pods).
    """

    def __init__(self, kube: Kube, selector: str) -> None:
        self.kube = kube
        self.selector = selector
        self.pods: dict[str, dict[str, Any]] = {}
        #: Pods that left the selector lately: name -> last known object.
        self.gone: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.synced = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """List, then follow changes in the background; returns once the first list is in."""
        self._task = asyncio.create_task(self._run(), name="pod-watch")
        waiter = asyncio.ensure_future(self.synced.wait())
        await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            self._task.result()  # the first list failed: raise its error

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, check: Callable[[PodWatcher], T | None], timeout: float | None) -> T:
        """Until `check(self)` returns something other than None (re-checked on every change).

        Raises:
            TimeoutError: `timeout` passed first.
        """
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                result = check(self)
                if result is not None:
                    return result
                await changed.wait()

    def find(self, name: str) -> dict[str, Any] | None:
        return self.pods.get(name)

    def find_labelled(self, key: str, value: str) -> dict[str, Any] | None:
        for pod in self.pods.values():
            if ((pod.get("metadata") or {}).get("labels") or {}).get(key) == value:
                return pod
        return None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _forget(self, name: str, pod: dict[str, Any]) -> None:
        self.pods.pop(name, None)
        self.gone[name] = pod
        self.gone.move_to_end(name)
        while len(self.gone) > GONE_KEPT:
            self.gone.popitem(last=False)

    async def _run(self) -> None:
        core = self.kube.core
        while True:
            try:
                listing = await self.kube.call(core.list_namespaced_pod, self.kube.namespace,
                                               label_selector=self.selector)
                fresh = {p["metadata"]["name"]: p for p in listing.get("items") or []}
                for name in set(self.pods) - set(fresh):
                    self._forget(name, self.pods[name])
                self.pods = fresh
                for name in fresh:
                    self.gone.pop(name, None)
                version = str(listing["metadata"]["resourceVersion"])
                self.synced.set()
                self._notify()
                while True:  # the server ends each watch after WATCH_TIMEOUT_S; go on from where it was
                    async for kind, pod in self.kube.watch(core.list_namespaced_pod, self.kube.namespace,
                                                           label_selector=self.selector,
                                                           resource_version=version, timeout_s=WATCH_TIMEOUT_S):
                        version = str((pod.get("metadata") or {}).get("resourceVersion") or version)
                        if kind == "BOOKMARK":
                            continue
                        name = pod["metadata"]["name"]
                        if kind == "DELETED":
                            self._forget(name, pod)
                        else:
                            self.pods[name] = pod
                            self.gone.pop(name, None)
                        self._notify()
            except asyncio.CancelledError:
                raise
            except (KubeError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                if not self.synced.is_set():
                    raise
                if not (isinstance(exc, KubeError) and exc.status == 410):  # 410: history compacted, relist
                    log.warning("pod watch interrupted (%s); listing again", exc)
                    await asyncio.sleep(RELIST_BACKOFF_S)  # an API server that is down must not spin us
