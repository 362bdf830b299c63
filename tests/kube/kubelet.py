"""THE TEST KUBELET: test scaffolding that stands in for a kubelet (and the scheduler) in front of
the real kube-apiserver the pod and Helm tests use. It is not a kubelet and not a container runtime.

    python -m tests.kube.kubelet --config kubelet.json      (started by tests/kube/cluster.py)

What it does, through the apiserver like a kubelet (as the user system:node:<node>, so the real Node
authorizer and NodeRestriction admission judge it):
- registers its Node: InternalIP 127.0.0.1, its kubelet port, capacity, a Ready condition;
- schedules (as system:kube-scheduler): binds pending pods with no nodeName to its node when their
  nodeSelector matches, their requests fit and their PersistentVolumeClaims are Bound, else marks
  them Unschedulable, as the scheduler would;
- provisions (as its own admin identity, `provisioner_token`: a real external provisioner has its
  own service account, and a node may not create PVs) PersistentVolumeClaims of the storage class
  `sandgate-test-ext4` (TEST_STORAGE_CLASS, made at start): each gets a PV whose data is a sparse
  ext4 image of the requested size, loop-mounted by the kubelet (root only; cluster.py runs the
  kubelet in a private mount namespace, so its mounts end with it), so a claim's size is a real
  quota (ENOSPC). It binds them as the PV controller would (PV claimRef, PVC volumeName, both
  phases Bound); on the claim's delete it deletes the PV, unmounts and removes the image
  (reclaim policy Delete). It also stands in for kube-controller-manager's pvc-protection and
  pv-protection controllers: it drops their finalizers once no pod on the node uses the claim.
  A claim of another class stays Pending;
- runs each pod bound to it: init containers one after the other to completion, then the containers,
  each under bubblewrap (`bwrap`) in its own mount, PID (the command is PID 1), IPC and UTS
  namespaces, as the pod's runAsUser/runAsGroup (in a user namespace) or as root; env, command/args,
  workingDir, emptyDir/configMap/secret/persistentVolumeClaim volumes (fsGroup applied to a
  read-write claim's files, as a kubelet does), readOnlyRootFilesystem, capabilities drop ALL and
  allowPrivilegeEscalation=false (no_new_privs) are honoured;
- reports pod status (Pending, Running with container statuses and Ready, Succeeded or Failed when
  the containers end) and deletes pods when they are deleted: SIGTERM, then SIGKILL after the grace
  period, then the final delete, as a kubelet does;
- serves the kubelet API the apiserver proxies `pods/exec`, `pods/attach` and `pods/log` to, on HTTPS
  with a cert from the test CA, accepting only the apiserver's client cert.

Images. There are none: a container's "image" is the host's /usr, /etc and /var, read-only, on an
empty root (a tmpfs; read-only with readOnlyRootFilesystem), with a private /tmp; the host's /home,
/root, /work, /opt and /mnt are not there. The image name decides only two things:
- a name containing `sandgate-agent` adds what the agent image's Dockerfile adds: the repo's
  guest_agent and msgpack (plugins.common.agent_files, staged when the kubelet starts) read-only at
  /opt/sandgate, PYTHONPATH=/opt/sandgate, and `python3 -m guest_agent` as the default command;
- a name containing `does-not-exist` is refused like an image that cannot be pulled: the container
  waits with reason ImagePullBackOff and the pod stays Pending, so fail-fast tests are real.

Not done: no dynamic provisioning but for TEST_STORAGE_CLASS, no volume expansion, no image pulls,
no pod network (pods share the host's network namespace and report
podIP 127.0.0.1), no NetworkPolicy, no cgroups (resource limits are not enforced), no seccomp, no
probes (a container is Ready once started), no restarts (restartPolicy is not honoured: a pod ends
when its containers end), no TTYs, no port-forward. exec and attach speak WebSocket only
(v5/v4/v4.base64/base64/channel.k8s.io), which is what kubernetes_asyncio uses; kubectl 1.20 speaks
SPDY for them and gets a clear refusal.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import shutil
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
from aiohttp import web

AGENT_IMAGE_MARK = "sandgate-agent"
#: The storage class this kubelet provisions (an ext4 image per claim, loop-mounted).
TEST_STORAGE_CLASS = "sandgate-test-ext4"
PROVISIONER = "sandgate.test/ext4-image"
PVC_PROTECTION = "kubernetes.io/pvc-protection"
PV_PROTECTION = "kubernetes.io/pv-protection"
SYSTEM_PATH = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
REJECTED_IMAGE_MARK = "does-not-exist"
AGENT_MOUNT = "/opt/sandgate"
#: Host folders bound read-only into every container (the "image"); top-level symlinks (the merged
#: /usr's /bin, /lib, ...) are recreated as symlinks.
IMAGE_DIRS = ("usr", "etc", "var")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KUBELET_VERSION = "v1.20.2-sandgate-test-kubelet"
#: Sec-WebSocket-Protocol values served, preferred first (as kubelets and clients list them).
WS_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                "base64.channel.k8s.io", "channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{stamp} {message}", file=sys.stderr, flush=True)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:500]}")
        self.status = status


class Api:
    """The few REST calls the kubelet makes, as one identity (a bearer token)."""

    def __init__(self, session: aiohttp.ClientSession, server: str, token: str) -> None:
        self.session = session
        self.server = server
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    async def call(self, method: str, path: str, body: Any = None, *,
                   content_type: str = "application/json", params: dict[str, str] | None = None) -> Any:
        headers = {**self.headers, "Content-Type": content_type}
        data = None if body is None else json.dumps(body)
        async with self.session.request(method, self.server + path, data=data, headers=headers,
                                        params=params) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise ApiError(resp.status, text)
            return json.loads(text) if text else None

    async def watch(self, path: str, params: dict[str, str]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """LIST then WATCH `path` for ever: ("ADDED", obj) for what exists, then the events;
        a watch that ends or expires (410 Gone) starts over from a new LIST."""
        while True:
            listed = await self.call("GET", path, params=params)
            for item in listed["items"]:
                yield "ADDED", item
            version = listed["metadata"]["resourceVersion"]
            query = {**params, "watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
                     "timeoutSeconds": "600"}
            async with self.session.get(self.server + path, params=query, headers=self.headers,
                                        timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
                if resp.status >= 400:
                    raise ApiError(resp.status, await resp.text())
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event["type"] == "ERROR":  # typically 410 Gone: list again
                        break
                    if event["type"] != "BOOKMARK":
                        yield event["type"], event["object"]


# Running one container.


@dataclass
class Container:
    """One container's process: the outer bwrap, and the PID (as the host sees it) of the
    container's PID 1, which exec joins with nsenter."""

    name: str
    proc: asyncio.subprocess.Process
    pid: int
    uid: int
    gid: int
    userns: bool
    env: dict[str, str]
    no_new_privs: bool
    drop_all_caps: bool
    log_file: BinaryIO
    stdin_once: bool
    started_at: str = field(default_factory=now)
    attachers: set[Callable[[int, bytes], Any]] = field(default_factory=set)
    stderr_tail: bytearray = field(default_factory=bytearray)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    async def pump(self, stream: asyncio.StreamReader, channel: int) -> None:
        """Copy the container's stdout or stderr to its log and to every attached client."""
        while chunk := await stream.read(65536):
            self.log_file.write(chunk)
            self.log_file.flush()
            if channel == STDERR:
                self.stderr_tail = (self.stderr_tail + chunk)[-2048:]
            for send in list(self.attachers):
                with contextlib.suppress(Exception):  # a client that left; its handler cleans up
                    await send(channel, chunk)

    async def wait(self) -> int:
        code = await self.proc.wait()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        self.log_file.close()
        self.exit_code = 128 - code if code < 0 else code  # a signal, reported as shells and kubelets do
        self.done.set()
        return self.exit_code

    def signal(self, signum: int) -> None:
        # PID 1 of a PID namespace gets a signal from outside only if it handles it (SIGKILL always):
        # the same as a container runtime's kill.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def exec_argv(self, command: list[str]) -> list[str]:
        """The command run inside this container's namespaces, as its user."""
        argv = ["nsenter", "--target", str(self.pid), "--mount", "--pid", "--ipc", "--uts", "--root", "--wd"]
        if self.userns:
            argv += ["--user", "--setuid", str(self.uid), "--setgid", str(self.gid)]
        argv.append("--")
        if self.drop_all_caps or self.no_new_privs:
            argv += ["setpriv"]
            if self.drop_all_caps:
                argv += ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]
            if self.no_new_privs:
                argv += ["--no-new-privs"]
            argv.append("--")
        return argv + command


@dataclass
class _Plan:
    argv: list[str]
    command: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    userns: bool
    drop_all_caps: bool
    no_new_privs: bool
    as_user: dict[str, Any]
    log_file: BinaryIO


class PodError(Exception):
    """A pod that cannot start: (waiting reason, message), as a kubelet reports them."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Pod:
    """One pod bound to the node: its containers, their statuses, and its status in the API."""

    def __init__(self, kubelet: Kubelet, obj: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.obj = obj
        meta = obj["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.spec: dict[str, Any] = obj["spec"]
        self.dir = kubelet.state_dir / "pods" / self.uid
        self.containers: dict[str, Container] = {}
        self.statuses: dict[str, dict[str, Any]] = {}
        self.init_statuses: dict[str, dict[str, Any]] = {}
        self.phase = "Pending"
        self.started_at = now()
        self.initialized = False
        self.ready = False
        self.publish_lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None
        self.terminating: asyncio.Task[None] | None = None
        for c in self.spec.get("initContainers", []):
            self.init_statuses[c["name"]] = self._waiting(c, "PodInitializing")
        for c in self.spec["containers"]:
            self.statuses[c["name"]] = self._waiting(c, "ContainerCreating")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @staticmethod
    def _waiting(spec: dict[str, Any], reason: str, message: str | None = None) -> dict[str, Any]:
        state: dict[str, Any] = {"reason": reason}
        if message:
            state["message"] = message
        return {"name": spec["name"], "image": spec.get("image", ""), "imageID": "", "ready": False,
                "started": False, "restartCount": 0, "state": {"waiting": state}}

    # Status in the API.

    async def publish(self) -> None:
        """Send the whole status (a merge patch replaces the lists whole), one patch at a time."""
        def condition(kind: str, ok: bool, reason: str | None = None) -> dict[str, Any]:
            cond = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                    "lastTransitionTime": now()}
            if reason and not ok:
                cond["reason"] = reason
            return cond

        not_ready = "PodCompleted" if self.phase in ("Succeeded", "Failed") else "ContainersNotReady"
        status = {
            "phase": self.phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.started_at, "qosClass": self.obj.get("status", {}).get("qosClass", "BestEffort"),
            "conditions": [
                condition("Initialized", self.initialized, "ContainersNotInitialized"),
                condition("Ready", self.ready, not_ready),
                condition("ContainersReady", self.ready, not_ready),
                condition("PodScheduled", True),
            ],
            "containerStatuses": list(self.statuses.values()),
        }
        if self.init_statuses:
            status["initContainerStatuses"] = list(self.init_statuses.values())
        async with self.publish_lock:
            try:
                await self.kubelet.node_api.call(
                    "PATCH", f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status", {"status": status},
                    content_type="application/merge-patch+json")
            except ApiError as exc:
                if exc.status != 404:  # a pod deleted meanwhile has no status to keep
                    raise

    # The pod's life.

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except PodError as exc:
            log(f"{self.key}: cannot start: {exc.reason}: {exc.message}")
            await self.publish()
        except Exception as exc:  # a bug here must show in the pod, not only in the log
            log(f"{self.key}: the test kubelet failed: {exc!r}")
            self.phase = "Failed"
            await self.publish()

    def _fail_container(self, spec: dict[str, Any], reason: str, message: str, init: bool = False) -> PodError:
        table = self.init_statuses if init else self.statuses
        table[spec["name"]] = self._waiting(spec, reason, message)
        return PodError(reason, message)

    async def _run(self) -> None:
        for init, spec in self._all_specs():
            image = spec.get("image", "")
            if REJECTED_IMAGE_MARK in image:
                raise self._fail_container(
                    spec, "ImagePullBackOff",
                    f'Back-off pulling image "{image}": the test kubelet refuses images named '
                    f'"*{REJECTED_IMAGE_MARK}*" as unpullable', init)
        volumes = await self._prepare_volumes()
        await self.publish()
        for spec in self.spec.get("initContainers", []):
            container = await self._start(spec, volumes, init=True)
            self.init_statuses[spec["name"]] = self._running_status(spec, container, ready=False)
            await self.publish()
            code = await container.wait()
            self.init_statuses[spec["name"]] = self._terminated_status(spec, container)
            if code != 0:
                log(f"{self.key}: init container {spec['name']} exited {code}")
                self.phase = "Failed"
                await self.publish()
                return
        self.initialized = True
        started = [await self._start(spec, volumes, init=False) for spec in self.spec["containers"]]
        for spec, container in zip(self.spec["containers"], started, strict=True):
            self.statuses[spec["name"]] = self._running_status(spec, container, ready=True)
        self.phase, self.ready = "Running", True
        await self.publish()
        log(f"{self.key}: running")

        async def ended(spec: dict[str, Any], container: Container) -> int:
            code = await container.wait()
            self.statuses[spec["name"]] = self._terminated_status(spec, container)
            self.ready = False
            if self.terminating is None:
                await self.publish()
            return code

        codes = await asyncio.gather(*(ended(s, c) for s, c in zip(self.spec["containers"], started, strict=True)))
        if self.terminating is None:
            self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            await self.publish()
            log(f"{self.key}: {self.phase} (exit codes {codes})")

    def _all_specs(self) -> list[tuple[bool, dict[str, Any]]]:
        return [(True, s) for s in self.spec.get("initContainers", [])] + [(False, s) for s in self.spec["containers"]]

    @staticmethod
    def _running_status(spec: dict[str, Any], container: Container, *, ready: bool) -> dict[str, Any]:
        return {"name": spec["name"], "image": spec.get("image", ""), "imageID": f"test-kubelet://{spec.get('image')}",
                "containerID": f"bwrap://{container.pid}", "ready": ready, "started": True, "restartCount": 0,
                "state": {"running": {"startedAt": container.started_at}}}

    @staticmethod
    def _terminated_status(spec: dict[str, Any], container: Container) -> dict[str, Any]:
        code = container.exit_code
        terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                      "startedAt": container.started_at, "finishedAt": now(),
                                      "containerID": f"bwrap://{container.pid}"}
        if code != 0 and container.stderr_tail:  # as terminationMessagePolicy FallbackToLogsOnError
            terminated["message"] = container.stderr_tail.decode(errors="replace")
        return {"name": spec["name"], "image": spec.get("image", ""), "imageID": f"test-kubelet://{spec.get('image')}",
                "containerID": f"bwrap://{container.pid}", "ready": False, "started": False, "restartCount": 0,
                "state": {"terminated": terminated}}

    async def _prepare_volumes(self) -> dict[str, Path]:
        """Each volume as a host folder: emptyDir a fresh one, configMap and secret their keys as files."""
        volumes: dict[str, Path] = {}
        base = self.dir / "volumes"
        for volume in self.spec.get("volumes", []):
            name = volume["name"]
            path = volumes[name] = base / name
            path.mkdir(parents=True)
            if "emptyDir" in volume:
                path.chmod(0o777)  # as a kubelet makes it: any container user may write there
            elif "persistentVolumeClaim" in volume:
                path.rmdir()
                volumes[name] = await self._claim(volume)
            elif "configMap" in volume or "secret" in volume:
                kind, ref = ("configmaps", volume["configMap"]) if "configMap" in volume else \
                    ("secrets", volume["secret"])
                obj_name = ref.get("name") or ref.get("secretName")
                try:
                    obj = await self.kubelet.node_api.call(
                        "GET", f"/api/v1/namespaces/{self.namespace}/{kind}/{obj_name}")
                except ApiError as exc:
                    if ref.get("optional"):
                        obj = {}
                    else:
                        raise self._fail_container(self.spec["containers"][0], "CreateContainerConfigError",
                                                   f"volume {name}: {kind} {obj_name!r}: {exc}") from exc
                items = {**{k: v.encode() for k, v in obj.get("data", {}).items()}} if kind == "configmaps" else \
                    {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
                if kind == "configmaps":
                    items.update({k: base64.b64decode(v) for k, v in obj.get("binaryData", {}).items()})
                chosen = {i["key"]: i["path"] for i in ref.get("items", [])} or {k: k for k in items}
                for key, rel in chosen.items():
                    target = path / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(items.get(key, b""))
                    target.chmod(ref.get("defaultMode", 0o644) & 0o777)
                path.chmod(0o755)
            else:
                kinds = sorted(k for k in volume if k != "name")
                raise self._fail_container(self.spec["containers"][0], "CreateContainerConfigError",
                                           f"volume {name}: the test kubelet supports emptyDir, configMap, secret "
                                           f"and persistentVolumeClaim volumes, not {', '.join(kinds)}")
        return volumes

    async def _claim(self, volume: dict[str, Any]) -> Path:
        """A persistentVolumeClaim volume: its bound PV's folder (read as the node, which the Node
        authorizer allows for claims of pods bound here), with fsGroup applied to a read-write one."""
        ref = volume["persistentVolumeClaim"]
        api = self.kubelet.node_api
        try:
            claim = await api.call("GET", f"/api/v1/namespaces/{self.namespace}/persistentvolumeclaims/"
                                          f"{ref['claimName']}")
            if (claim.get("status") or {}).get("phase") != "Bound":
                raise ApiError(409, f"claim {ref['claimName']} is not Bound")
            pv = await api.call("GET", f"/api/v1/persistentvolumes/{claim['spec']['volumeName']}")
        except ApiError as exc:
            raise self._fail_container(self.spec["containers"][0], "CreateContainerConfigError",
                                       f"volume {volume['name']}: {exc}") from exc
        path = Path(((pv.get("spec") or {}).get("hostPath") or {}).get("path", ""))
        if not await asyncio.to_thread(path.is_dir):
            raise self._fail_container(self.spec["containers"][0], "CreateContainerConfigError",
                                       f"volume {volume['name']}: PV {pv['metadata']['name']} has no data here")
        group = (self.spec.get("securityContext") or {}).get("fsGroup")
        if group is not None and not ref.get("readOnly"):
            await asyncio.to_thread(_apply_fs_group, path, int(group))
        return path

    def claims(self) -> set[str]:
        """namespace/claim of every claim this pod mounts."""
        return {f"{self.namespace}/{v['persistentVolumeClaim']['claimName']}"
                for v in self.spec.get("volumes", []) if "persistentVolumeClaim" in v}

    def _plan(self, spec: dict[str, Any], volumes: dict[str, Path], *, init: bool) -> _Plan:
        """How to run one container: bwrap's arguments, the environment, the user."""
        pod_sc = self.spec.get("securityContext", {})
        sc = {**pod_sc, **spec.get("securityContext", {})}
        uid, gid = int(sc.get("runAsUser", 0)), int(sc.get("runAsGroup", 0))
        if sc.get("runAsNonRoot") and uid == 0:
            raise self._fail_container(spec, "CreateContainerConfigError",
                                       "container has runAsNonRoot and image will run as root", init)
        image = spec.get("image", "")
        agent_image = AGENT_IMAGE_MARK in image
        command = list(spec.get("command") or (["python3", "-m", "guest_agent"] if agent_image else []))
        command += list(spec.get("args", []))
        if not command:
            raise self._fail_container(spec, "CreateContainerConfigError",
                                       f"the test kubelet has no image config for {image!r}: give a command", init)
        env = {"PATH": DEFAULT_PATH, "HOSTNAME": self.name, "HOME": "/root" if uid == 0 else "/"}
        if agent_image:
            env["PYTHONPATH"] = AGENT_MOUNT
        for item in spec.get("env", []):
            if "value" in item or "valueFrom" not in item:
                env[item["name"]] = _expand(item.get("value", ""), env)
            else:
                raise self._fail_container(spec, "CreateContainerConfigError",
                                           f"env {item['name']}: the test kubelet supports only plain values", init)
        command = [_expand(arg, env) for arg in command]  # $(VAR) in command and args, as kubelets do
        caps = sc.get("capabilities", {})
        drop_all = "ALL" in caps.get("drop", [])
        no_new_privs = sc.get("allowPrivilegeEscalation") is False

        argv = [self.kubelet.bwrap, "--die-with-parent", "--unshare-pid", "--as-pid-1", "--unshare-ipc",
                "--unshare-uts", "--hostname", self.name[:63]]
        userns = uid != 0
        if userns:
            argv += ["--unshare-user", "--uid", str(uid), "--gid", str(gid)]
        elif drop_all:
            argv += ["--cap-drop", "ALL"]
        argv += self.kubelet.image_args
        if agent_image:
            argv += ["--ro-bind", str(self.kubelet.agent_dir), AGENT_MOUNT]
        for mount in spec.get("volumeMounts", []):
            source = volumes.get(mount["name"])
            if source is None:
                raise self._fail_container(spec, "CreateContainerConfigError",
                                           f"volumeMount {mount['name']}: no such volume", init)
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            target = mount["mountPath"]
            top = Path(target).parts[1] if len(Path(target).parts) > 1 else ""
            if top in IMAGE_DIRS and not Path(target).exists():
                raise self._fail_container(
                    spec, "CreateContainerConfigError",
                    f"mountPath {target}: the test kubelet's image is the host's read-only /{top}, which has "
                    f"no {target} to mount on", init)
            claim = next((v.get("persistentVolumeClaim") for v in self.spec.get("volumes", [])
                          if v["name"] == mount["name"]), None) or {}
            readonly = mount.get("readOnly") or claim.get("readOnly")
            argv += ["--ro-bind" if readonly else "--bind", str(source), target]
        if sc.get("readOnlyRootFilesystem"):
            argv += ["--remount-ro", "/"]
        workdir = spec.get("workingDir") or "/"
        argv += ["--chdir", workdir]
        if no_new_privs:
            command = ["setpriv", "--no-new-privs", "--", *command]
        log_path = self.dir / "logs" / f"{spec['name']}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Non-root containers: bwrap starts as that user and makes an unprivileged user namespace,
        # so the container's processes are that user on the host too (file ownership, signals).
        as_user: dict[str, Any] = {}
        if userns:
            groups = [int(g) for g in pod_sc.get("supplementalGroups", [])]
            if "fsGroup" in pod_sc:
                groups.append(int(pod_sc["fsGroup"]))
            as_user = {"user": uid, "group": gid, "extra_groups": groups}
        return _Plan(argv=argv, command=command, env=env, uid=uid, gid=gid, userns=userns, drop_all_caps=drop_all,
                     no_new_privs=no_new_privs, as_user=as_user, log_file=open(log_path, "ab"))

    async def _start(self, spec: dict[str, Any], volumes: dict[str, Path], *, init: bool) -> Container:
        plan = self._plan(spec, volumes, init=init)
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *plan.argv, "--info-fd", str(write_fd), "--", *plan.command,
                stdin=asyncio.subprocess.PIPE if spec.get("stdin") else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=plan.env, pass_fds=(write_fd,),
                **plan.as_user)
        finally:
            os.close(write_fd)
        info = await asyncio.to_thread(_read_json, read_fd)
        try:
            pid = int(info["child-pid"])
        except (ValueError, KeyError, TypeError) as exc:
            await proc.wait()
            assert proc.stderr is not None
            error = (await proc.stderr.read()).decode(errors="replace").strip()
            raise self._fail_container(spec, "RunContainerError", f"bwrap could not start the container: {error}",
                                       init) from exc
        await _until_executed(pid, plan.command[0])
        container = Container(name=spec["name"], proc=proc, pid=pid, uid=plan.uid, gid=plan.gid, userns=plan.userns,
                              env=plan.env, no_new_privs=plan.no_new_privs, drop_all_caps=plan.drop_all_caps,
                              log_file=plan.log_file,
                              stdin_once=bool(spec.get("stdinOnce")))
        assert proc.stdout is not None and proc.stderr is not None
        container.pumps = [asyncio.create_task(container.pump(proc.stdout, STDOUT)),
                           asyncio.create_task(container.pump(proc.stderr, STDERR))]
        self.containers[spec["name"]] = container
        log(f"{self.key}: started {'init ' if init else ''}container {spec['name']} (pid {pid}): {plan.command}")
        return container

    async def terminate(self, grace: float) -> None:
        """Stop every container: SIGTERM, then SIGKILL once `grace` seconds pass, then forget the pod."""
        running = [c for c in self.containers.values() if not c.done.is_set()]
        for container in running:
            container.signal(signal.SIGTERM)
        if running:
            _, late = await asyncio.wait([asyncio.create_task(c.done.wait()) for c in running], timeout=grace)
            for container in running:
                if not container.done.is_set():
                    container.signal(signal.SIGKILL)  # PID 1 of its namespace: takes every process there
            await asyncio.gather(*(c.done.wait() for c in running))
            for task in late:
                task.cancel()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        log(f"{self.key}: stopped")


async def _until_executed(pid: int, first: str) -> None:
    """Until bwrap's child has exec'd the container's command (and any setpriv wrapper its target),
    so "running" means the command runs, as with a container runtime. Linux offers no notice of
    another process's exec, so this looks at /proc/<pid>/exe, briefly (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    wrappers = _wrapper_exes(first)
    while loop.time() < deadline:
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:  # gone (the container exited at once) or a zombie: nothing to wait for
            return
        if exe not in wrappers:
            return
        await asyncio.sleep(0.002)


def _wrapper_exes(first: str) -> set[str]:
    exes = {os.path.realpath(shutil.which(name) or name) for name in ("bwrap", "setpriv")}
    exes.discard(os.path.realpath(shutil.which(first) or first))
    return exes


def _apply_fs_group(root: Path, gid: int) -> None:
    """fsGroup on a volume, as a kubelet applies it: every file's group becomes `gid`, group-writable
    (directories setgid, so new files keep the group)."""
    for folder, dirs, files in os.walk(root):
        for name in [folder, *(os.path.join(folder, f) for f in files + dirs)]:
            st = os.lstat(name)
            if os.path.islink(name):
                continue
            os.chown(name, st.st_uid, gid)
            extra = 0o2070 if os.path.isdir(name) else 0o060
            os.chmod(name, (st.st_mode & 0o7777) | extra)


async def _run_tool(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE, env=SYSTEM_PATH)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")


class Provisioner:
    """The storage half: ext4-image PVs for claims of TEST_STORAGE_CLASS, bound as the PV controller
    binds them, and the pvc/pv-protection finalizers dropped once no pod here uses a claim."""

    def __init__(self, kubelet: Kubelet, api: Api) -> None:
        self.kubelet = kubelet
        self.api = api
        self.dir = kubelet.state_dir / "pv"
        #: namespace/name of claims being deleted, waiting for their pods to go.
        self.deleting: dict[str, dict[str, Any]] = {}

    def in_use(self, key: str) -> bool:
        return any(key in pod.claims() for pod in self.kubelet.pods.values())

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o711)
        try:
            await self.api.call("POST", "/apis/storage.k8s.io/v1/storageclasses", {
                "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": TEST_STORAGE_CLASS},
                "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"})
        except ApiError as exc:
            if exc.status != 409:
                raise

    async def watch(self) -> None:
        async for kind, claim in self.api.watch("/api/v1/persistentvolumeclaims", {}):
            meta = claim["metadata"]
            key = f"{meta['namespace']}/{meta['name']}"
            try:
                if kind == "DELETED":
                    self.deleting.pop(key, None)
                    if claim["spec"].get("volumeName") and claim["spec"].get("storageClassName") == TEST_STORAGE_CLASS:
                        await self.remove_volume(claim["spec"]["volumeName"])
                elif meta.get("deletionTimestamp"):
                    self.deleting[key] = claim
                    await self.release(key)
                elif (claim["spec"].get("storageClassName") == TEST_STORAGE_CLASS
                      and not claim["spec"].get("volumeName")):
                    await self.provision(claim)
            except (ApiError, RuntimeError, OSError) as exc:
                log(f"provisioner: {key}: {exc}")

    async def release(self, key: str) -> None:
        """Drop a deleted claim's pvc-protection finalizer once no pod here mounts it."""
        claim = self.deleting.get(key)
        if claim is None or self.in_use(key):
            return
        meta = claim["metadata"]
        finalizers = [f for f in meta.get("finalizers") or [] if f != PVC_PROTECTION]
        try:
            await self.api.call("PATCH", f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/"
                                         f"{meta['name']}", {"metadata": {"finalizers": finalizers or None}},
                                content_type="application/merge-patch+json")
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def release_all(self) -> None:
        for key in list(self.deleting):
            await self.release(key)

    async def provision(self, claim: dict[str, Any]) -> None:
        meta, spec = claim["metadata"], claim["spec"]
        size = int(_quantity(spec["resources"]["requests"]["storage"]))
        name = f"pvc-{meta['uid']}"
        image, mountpoint = self.dir / f"{name}.ext4", self.dir / name
        if not mountpoint.is_dir():
            with image.open("wb") as f:
                f.truncate(size)
            await _run_tool("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                            str(image))
            mountpoint.mkdir(mode=0o755)
            await _run_tool("mount", "-o", "loop,nosuid,nodev", str(image), str(mountpoint))
        pv = {"apiVersion": "v1", "kind": "PersistentVolume",
              "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
              "spec": {"capacity": {"storage": spec["resources"]["requests"]["storage"]},
                       "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                       "persistentVolumeReclaimPolicy": "Delete", "storageClassName": TEST_STORAGE_CLASS,
                       "hostPath": {"path": str(mountpoint), "type": "Directory"},
                       "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                                    "namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]}}}
        try:
            await self.api.call("POST", "/api/v1/persistentvolumes", pv)
        except ApiError as exc:
            if exc.status != 409:
                raise
        await self.api.call("PATCH", f"/api/v1/persistentvolumes/{name}/status", {"status": {"phase": "Bound"}},
                            content_type="application/merge-patch+json")
        path = f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}"
        await self.api.call("PATCH", path, {"metadata": {"annotations": {
            "pv.kubernetes.io/bind-completed": "yes", "pv.kubernetes.io/bound-by-controller": "yes"}},
            "spec": {"volumeName": name}}, content_type="application/merge-patch+json")
        await self.api.call("PATCH", f"{path}/status", {"status": {
            "phase": "Bound", "accessModes": pv["spec"]["accessModes"], "capacity": pv["spec"]["capacity"]}},
            content_type="application/merge-patch+json")
        log(f"provisioner: {meta['namespace']}/{meta['name']} bound to {name} ({size} bytes)")
        self.kubelet.retry_unschedulable()

    async def remove_volume(self, name: str) -> None:
        """Reclaim policy Delete: the PV goes (its pv-protection finalizer with it), then its data."""
        try:
            await self.api.call("DELETE", f"/api/v1/persistentvolumes/{name}")
            await self.api.call("PATCH", f"/api/v1/persistentvolumes/{name}", {"metadata": {"finalizers": None}},
                                content_type="application/merge-patch+json")
        except ApiError as exc:
            if exc.status != 404:
                raise
        mountpoint = self.dir / name
        if mountpoint.is_dir():
            await _run_tool("umount", str(mountpoint))
            mountpoint.rmdir()
        (self.dir / f"{name}.ext4").unlink(missing_ok=True)
        log(f"provisioner: {name} deleted")


def _read_json(fd: int) -> Any:
    """The JSON object bwrap writes on --info-fd once the container's PID 1 exists; None when bwrap
    ends without writing it (it could not set the container up). Read up to the object's end, not
    EOF: the container may keep the pipe open."""
    data = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(4096):
            data += chunk
            try:
                return json.loads(data)
            except ValueError:
                continue
    return None


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references to earlier variables ($$ escapes)."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i) and ")" in value[i:]:
            end = value.index(")", i)
            name = value[i + 2:end]
            out.append(env.get(name, value[i:end + 1]))
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


# The node and its scheduler.


def _quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "64Mi", "1G", "2") as a number."""
    text = str(text)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)


def _requests(pod: dict[str, Any]) -> dict[str, float]:
    total = {"cpu": 0.0, "memory": 0.0}
    for c in pod["spec"]["containers"]:
        for resource, amount in c.get("resources", {}).get("requests", {}).items():
            if resource in total:
                total[resource] += _quantity(amount)
    return total


class Kubelet:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.node_name: str = config["node_name"]
        self.state_dir = Path(config["state_dir"])
        self.bwrap: str = config["bwrap"]
        self.agent_dir = self.state_dir / "agent"
        self.pods: dict[str, Pod] = {}
        self.unschedulable: dict[str, dict[str, Any]] = {}
        self.labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "sandgate.test/test-kubelet": "true"}
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{mem // 1024}Ki", "pods": "110",
                         "ephemeral-storage": "10Gi"}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.image_args = self._image_args()

    @staticmethod
    def _image_args() -> list[str]:
        """bwrap's arguments for the "image": the host's /usr, /etc, /var read-only on an empty root."""
        args = []
        for entry in sorted(Path("/").iterdir()):  # merged /usr: /bin -> usr/bin and so on
            if entry.is_symlink() and entry.name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
                args += ["--symlink", os.readlink(entry), f"/{entry.name}"]
        for name in IMAGE_DIRS:
            args += ["--ro-bind", f"/{name}", f"/{name}"]
        return [*args, "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--dir", "/run"]

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stage_agent(self) -> None:
        """The guest agent and msgpack, as the sandgate-agent image would carry them."""
        from plugins.common import agent_files

        for rel, source in agent_files().items():
            target = self.agent_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            shutil.copyfile(source, target)
            target.chmod(0o644)
        for folder in [self.agent_dir, *self.agent_dir.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)

    async def register_node(self, port: int) -> None:
        status = {
            "capacity": self.capacity, "allocatable": self.capacity,
            "conditions": [
                {"type": kind, "status": "False", "reason": f"KubeletHas{reason}", "lastHeartbeatTime": now(),
                 "lastTransitionTime": now()}
                for kind, reason in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                                     ("PIDPressure", "SufficientPID"))
            ] + [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                  "message": "the sandgate test kubelet is posting ready status", "lastHeartbeatTime": now(),
                  "lastTransitionTime": now()}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                         "osImage": "the host (sandgate test kubelet)", "containerRuntimeVersion": "bwrap://",
                         "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64"},
        }
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": self.labels},
                "status": status}
        try:
            await self.node_api.call("POST", "/api/v1/nodes", node)
        except ApiError as exc:
            if exc.status != 409:
                raise
            await self.node_api.call("PATCH", f"/api/v1/nodes/{self.node_name}/status", {"status": status},
                                     content_type="application/merge-patch+json")

    async def watch_node_pods(self) -> None:
        params = {"fieldSelector": f"spec.nodeName={self.node_name}"}
        async for kind, obj in self.node_api.watch("/api/v1/pods", params):
            uid = obj["metadata"]["uid"]
            pod = self.pods.get(uid)
            if kind == "DELETED":
                if pod is not None:  # deleted at once (grace 0 or force): stop it now
                    self.pods.pop(uid)
                    self.spawn(self._stopped(pod, 0))
                continue
            if obj["metadata"].get("deletionTimestamp"):
                if pod is None:
                    self.spawn(self._finish_delete(obj))
                elif pod.terminating is None:
                    grace = float(obj["metadata"].get("deletionGracePeriodSeconds") or 0)
                    pod.terminating = asyncio.create_task(self._graceful_delete(pod, grace))
                continue
            if pod is None and obj.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                pod = self.pods[uid] = Pod(self, obj)
                pod.task = asyncio.create_task(pod.run())

    async def _graceful_delete(self, pod: Pod, grace: float) -> None:
        log(f"{pod.key}: deleting (grace {grace:g}s)")
        await pod.terminate(grace)
        self.pods.pop(pod.uid, None)
        await self._finish_delete(pod.obj)
        self._retry_unschedulable()
        await self.provisioner.release_all()

    async def _stopped(self, pod: Pod, grace: float) -> None:
        await pod.terminate(grace)
        self._retry_unschedulable()
        await self.provisioner.release_all()

    async def _finish_delete(self, obj: dict[str, Any]) -> None:
        """The kubelet's last word on a pod: delete it for good, this very pod (uid) only."""
        meta = obj["metadata"]
        try:
            await self.node_api.call("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", {
                "apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}})
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    # Scheduling.

    async def watch_unscheduled(self) -> None:
        params = {"fieldSelector": "spec.nodeName=,status.phase!=Succeeded,status.phase!=Failed"}
        async for kind, obj in self.scheduler_api.watch("/api/v1/pods", params):
            key = obj["metadata"]["uid"]
            if kind == "DELETED" or obj["metadata"].get("deletionTimestamp") or obj["spec"].get("nodeName"):
                self.unschedulable.pop(key, None)
                continue
            if obj["spec"].get("schedulerName", "default-scheduler") == "default-scheduler":
                await self.schedule(obj)

    def _retry_unschedulable(self) -> None:
        for obj in list(self.unschedulable.values()):
            self.spawn(self.schedule(obj))

    def retry_unschedulable(self) -> None:
        """A claim was bound: pods waiting for it may fit now."""
        self._retry_unschedulable()

    async def _unbound_claims(self, pod: dict[str, Any]) -> str | None:
        """Why the pod's claims keep it off the node (the scheduler's VolumeBinding words), or None."""
        for volume in pod["spec"].get("volumes", []):
            ref = volume.get("persistentVolumeClaim")
            if ref is None:
                continue
            try:
                claim = await self.scheduler_api.call(
                    "GET", f"/api/v1/namespaces/{pod['metadata']['namespace']}/persistentvolumeclaims/"
                           f"{ref['claimName']}")
            except ApiError as exc:
                if exc.status == 404:
                    return f'persistentvolumeclaim "{ref["claimName"]}" not found'
                raise
            if (claim.get("status") or {}).get("phase") != "Bound":
                return "pod has unbound immediate PersistentVolumeClaims"
        return None

    def _fits(self, pod: dict[str, Any]) -> str | None:
        """Why the pod cannot go on this node (the scheduler's words), or None."""
        selector = pod["spec"].get("nodeSelector", {})
        if any(self.labels.get(k) != v for k, v in selector.items()):
            return "1 node(s) didn't match node selector"
        terms = (pod["spec"].get("affinity", {}).get("nodeAffinity", {})
                 .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms"))
        if terms and not any(all(_matches(e, self.labels) for e in t.get("matchExpressions", [])) for t in terms):
            return "1 node(s) didn't match node affinity"
        used = {"cpu": 0.0, "memory": 0.0}
        for other in self.pods.values():
            if other.phase not in ("Succeeded", "Failed"):
                for resource, amount in _requests(other.obj).items():
                    used[resource] += amount
        for resource, amount in _requests(pod).items():
            if amount and used[resource] + amount > _quantity(self.capacity[resource]):
                return f"1 Insufficient {resource}"
        return None

    async def schedule(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        why = self._fits(pod) or await self._unbound_claims(pod)
        try:
            if why is None:
                self.unschedulable.pop(meta["uid"], None)
                await self.scheduler_api.call("POST", f"{path}/binding", {
                    "apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"], "uid": meta["uid"]},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}})
                log(f"{meta['namespace']}/{meta['name']}: bound to {self.node_name}")
            else:
                self.unschedulable[meta["uid"]] = pod
                await self.scheduler_api.call("PATCH", f"{path}/status", {"status": {"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": f"0/1 nodes are available: {why}.", "lastProbeTime": None,
                    "lastTransitionTime": now()}]}}, content_type="application/strategic-merge-patch+json")
                log(f"{meta['namespace']}/{meta['name']}: unschedulable: {why}")
        except ApiError as exc:
            if exc.status not in (404, 409):  # gone, or bound meanwhile
                raise

    # The kubelet API.

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/exec/{namespace}/{pod}/{container}", self.handle_exec)
        app.router.add_route("*", "/attach/{namespace}/{pod}/{container}", self.handle_attach)
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self.handle_logs)
        app.router.add_get("/healthz", lambda _: web.Response(text="ok"))
        return app

    def _authorized(self, request: web.Request) -> None:
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        names = [value for rdn in (cert or {}).get("subject", ()) for key, value in rdn if key == "commonName"]
        if names != [self.config["client_cn"]]:
            raise web.HTTPForbidden(text="the test kubelet answers only the apiserver's client certificate")

    def _container(self, request: web.Request) -> tuple[Pod, Container]:
        ns, name, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        for pod in self.pods.values():
            if pod.namespace == ns and pod.name == name and container in pod.containers:
                found = pod.containers[container]
                if found.done.is_set():
                    raise web.HTTPBadRequest(text=f"container {container} is not running")
                return pod, found
        raise web.HTTPNotFound(text=f"container {container} of pod {ns}/{name} is not running on this node")

    @staticmethod
    def _refuse_spdy(request: web.Request) -> None:
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            # A Status body: clients (kubectl among them) show its message.
            message = ("the sandgate test kubelet serves exec and attach over WebSocket only "
                       "(v5/v4.channel.k8s.io); this client asked for "
                       f"{request.headers.get('Upgrade') or 'no upgrade'} (kubectl 1.20 uses SPDY): "
                       "use a WebSocket client such as kubernetes_asyncio's WsApiClient")
            raise web.HTTPBadRequest(content_type="application/json", text=json.dumps({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": "BadRequest", "code": 400}))

    @staticmethod
    def _flags(request: web.Request) -> tuple[bool, bool, bool]:
        def on(*names: str) -> bool:
            return any(request.query.get(n, "") in ("1", "true") for n in names)
        if on("tty"):
            raise web.HTTPBadRequest(text="the sandgate test kubelet has no TTY support")
        return on("input", "stdin"), on("output", "stdout"), on("error", "stderr")

    async def handle_exec(self, request: web.Request) -> web.StreamResponse:
        self._authorized(request)
        self._refuse_spdy(request)
        pod, container = self._container(request)
        want_in, want_out, want_err = self._flags(request)
        command = request.query.getall("command", [])
        if not command:
            raise web.HTTPBadRequest(text="exec: no command")
        stream = await _Stream.open(request)
        await stream.hello(want_out, want_err)
        log(f"{pod.key}/{container.name}: exec {command} ({stream.protocol})")
        try:
            proc = await asyncio.create_subprocess_exec(
                *container.exec_argv(command), env=container.env,
                stdin=asyncio.subprocess.PIPE if want_in else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if want_out else asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE if want_err else asyncio.subprocess.DEVNULL)
        except OSError as exc:
            await stream.finish(None, f"cannot start {command}: {exc}")
            return stream.ws

        async def copy_out(reader: asyncio.StreamReader | None, channel: int) -> None:
            while reader is not None and (chunk := await reader.read(65536)):
                with contextlib.suppress(ConnectionError):  # a client that left: the output goes nowhere
                    await stream.send(channel, chunk)

        reader = asyncio.create_task(stream.read_input(proc.stdin, close_stdin=True))
        try:
            await asyncio.gather(copy_out(proc.stdout, STDOUT), copy_out(proc.stderr, STDERR))
            code = await proc.wait()
        finally:
            reader.cancel()
        await stream.finish(128 - code if code < 0 else code, None, command)
        return stream.ws

    async def handle_attach(self, request: web.Request) -> web.StreamResponse:
        self._authorized(request)
        self._refuse_spdy(request)
        pod, container = self._container(request)
        want_in, want_out, want_err = self._flags(request)
        if want_in and container.proc.stdin is None:
            raise web.HTTPBadRequest(text=f"container {container.name} has no stdin (stdin: true in its spec)")
        stream = await _Stream.open(request)
        await stream.hello(want_out, want_err)
        log(f"{pod.key}/{container.name}: attach ({stream.protocol})")

        async def deliver(channel: int, chunk: bytes) -> None:
            if (channel == STDOUT and want_out) or (channel == STDERR and want_err):
                await stream.send(channel, chunk)

        container.attachers.add(deliver)
        reader = asyncio.create_task(stream.read_input(container.proc.stdin if want_in else None,
                                                       close_stdin=container.stdin_once))
        ended = asyncio.create_task(container.done.wait())
        try:
            await asyncio.wait({reader, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            container.attachers.discard(deliver)
            reader.cancel()
            ended.cancel()
        if container.done.is_set():
            await stream.finish(None, None)
        else:
            await stream.ws.close()
        return stream.ws

    async def handle_logs(self, request: web.Request) -> web.StreamResponse:
        self._authorized(request)
        ns, name, cname = (request.match_info[k] for k in ("namespace", "pod", "container"))
        for pod in self.pods.values():
            if pod.namespace == ns and pod.name == name and cname in pod.containers:
                return web.FileResponse(pod.containers[cname].log_file.name,
                                        headers={"Content-Type": "text/plain"})
        raise web.HTTPNotFound(text=f"no logs of {ns}/{name}/{cname} on this node")

    # Start and stop.

    async def main(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o711)
        self.stage_agent()
        client_ssl = ssl.create_default_context(cafile=self.config["ca_file"])
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.config["client_ca_file"])
        server_ssl.load_cert_chain(self.config["cert_file"], self.config["key_file"])
        server_ssl.verify_mode = ssl.CERT_REQUIRED
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl),
                                         read_bufsize=1 << 20) as session:
            self.node_api = Api(session, self.config["server"], self.config["node_token"])
            self.scheduler_api = Api(session, self.config["server"], self.config["scheduler_token"])
            self.provisioner = Provisioner(self, Api(session, self.config["server"], self.config["provisioner_token"]))
            await self.provisioner.start()
            runner = web.AppRunner(self.app(), handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl)
            await site.start()
            port = runner.addresses[0][1]
            await self.register_node(port)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            watchers = [asyncio.create_task(self.watch_node_pods()), asyncio.create_task(self.watch_unscheduled()),
                        asyncio.create_task(self.provisioner.watch())]
            log(f"node {self.node_name} registered; kubelet API on https://127.0.0.1:{port}")
            print(f"ready port={port}", flush=True)
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopped, *watchers], return_when=asyncio.FIRST_COMPLETED)
            for task in watchers:
                task.cancel()
            await asyncio.gather(*(p.terminate(0) for p in self.pods.values()), return_exceptions=True)
            for task in list(self.tasks):
                task.cancel()
            await runner.cleanup()
            for task in done:
                if task is not stopped:
                    task.result()  # a watcher that died: its error is the kubelet's exit reason


def _matches(expr: dict[str, Any], labels: dict[str, str]) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values", [])
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    return False  # Gt/Lt: no numeric labels here


class _Stream:
    """One exec or attach WebSocket in the kubelet's stream protocols: binary frames whose first
    byte is the channel, or (base64 protocols) text frames with the channel as a digit."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.protocol = ws.ws_protocol or "channel.k8s.io"  # no subprotocol: the original binary one
        self.base64 = "base64" in self.protocol

    @classmethod
    async def open(cls, request: web.Request) -> _Stream:
        ws = web.WebSocketResponse(protocols=WS_PROTOCOLS, max_msg_size=0, autoping=True)
        await ws.prepare(request)
        return cls(ws)

    async def send(self, channel: int, data: bytes) -> None:
        if self.base64:
            await self.ws.send_str(str(channel) + base64.b64encode(data).decode())
        else:
            await self.ws.send_bytes(bytes([channel]) + data)

    async def hello(self, out: bool, err: bool) -> None:
        # As a kubelet does: an empty frame on the first channel it will write, so the client
        # knows the stream is up before any output.
        await self.send(STDOUT if out else STDERR if err else ERROR, b"")

    async def read_input(self, stdin: asyncio.StreamWriter | None, close_stdin: bool) -> None:
        """Client frames to `stdin` until the client closes. Its end (or, on v5, its close of the
        stdin channel) closes `stdin` when `close_stdin` (exec; attach to a stdinOnce container)."""
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                frame: bytes = msg.data
            elif msg.type == aiohttp.WSMsgType.TEXT and self.base64 and msg.data:
                frame = bytes([int(msg.data[0])]) + base64.b64decode(msg.data[1:])
            else:
                continue
            if not frame:
                continue
            channel, data = frame[0], frame[1:]
            if channel == STDIN and stdin is not None and data:
                stdin.write(data)
                with contextlib.suppress(ConnectionError):
                    await stdin.drain()
            elif channel == CLOSE and self.protocol.startswith("v5") and data[:1] == bytes([STDIN]):
                if stdin is not None and close_stdin:
                    stdin.close()
                stdin = None
        if stdin is not None and close_stdin:
            stdin.close()

    async def finish(self, code: int | None, error: str | None, command: list[str] | None = None) -> None:
        """The status on the error channel, then the close."""
        if self.ws.closed:
            return
        if self.protocol in ("channel.k8s.io", "base64.channel.k8s.io"):
            text = error or (f"command terminated with non-zero exit code: exit status {code}" if code else "")
            if text:
                await self.send(ERROR, text.encode())
        elif error is None and not code:
            await self.send(ERROR, json.dumps({"metadata": {}, "status": "Success"}).encode())
        else:
            status = {"metadata": {}, "status": "Failure", "message": error or (
                f"command terminated with non-zero exit code: error executing command [{' '.join(command or [])}], "
                f"exit code {code}")}
            if code:
                status |= {"reason": "NonZeroExitCode",
                           "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
            else:
                status["reason"] = "InternalError"
            await self.send(ERROR, json.dumps(status).encode())
        await self.ws.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kube.kubelet", description="the sandgate TEST kubelet")
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args()
    kubelet = Kubelet(json.loads(args.config.read_text()))
    asyncio.run(kubelet.main())


if __name__ == "__main__":
    main()
