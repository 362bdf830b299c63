"""Named volumes: the tenant-scoped registry, and the backend ABC each store implements.

A volume is a tenant's named, size-limited file system that outlives the sandboxes that mount it
and the gateway (docs/storage.md). The registry here keeps the records (one JSON file per volume,
so a restarted gateway finds them) and who mounts what; it never touches a volume's bytes: a
`VolumeBackend` does, per *store*: "local" (an ext4 image per volume on this host, mounted by the
wasm and microvm runtimes) or "kubernetes" (a PersistentVolumeClaim, mounted by pods). A runtime
names its store in `Runtime.volume_store`; a volume can be mounted only by runtimes of its store.

Mount rule: one sandbox mounts a volume read-write, or any number mount it read-only, never both
at once (an ext4 image written by one VM while another reads it would show the reader a corrupt
file system; so would a PVC's block device). The registry decides this in memory, under no lock
but the event loop's: acquiring all of a create's volumes happens in one synchronous step.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from gateway.config import Storage
from guest_agent.wire import ProtocolError

#: A volume's name: what a DNS label allows, plus `.` and `_`, so it also fits a PVC's name part.
NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
#: Where a volume may be mounted: an absolute path, not the root nor the sandbox's working folder,
#: nor under the system's own folders (a volume over /proc or /usr would break the guest).
RESERVED_MOUNT_PREFIXES = ("/proc", "/sys", "/dev", "/sandgate", "/usr", "/bin", "/sbin", "/lib", "/lib64",
                           "/etc", "/boot", "/run", "/opt/sandgate", "/mnt/sandgate-agent")


@dataclass(frozen=True)
class Volume:
    """One volume's record (what `GET /v1/volumes` lists, less the live figures)."""

    id: str
    tenant: str
    name: str
    quota_mb: int
    store: str
    created_at: float

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "quota_mb": self.quota_mb, "store": self.store, "created_at": self.created_at}


@dataclass(frozen=True)
class VolumeMount:
    """A volume as a runtime mounts it (`SandboxSpec.volumes`)."""

    #: The absolute path inside the sandbox.
    path: str
    name: str
    readonly: bool
    quota_mb: int
    #: What the store's backend gave to mount: the ext4 image's path ("local"), the PVC's name
    #: ("kubernetes").
    source: str
    volume_id: str


class VolumeBackend(ABC):
    """Where the volumes of one store keep their bytes. Made by the gateway ("local") or by a
    runtime (`Runtime.volume_backend`); called by `VolumeRegistry` and the volume REST routes."""

    store: ClassVar[str]

    @abstractmethod
    async def create(self, volume: Volume) -> None:
        """Make the volume's empty file system of `quota_mb`. Called once, by `VolumeRegistry.create`."""

    @abstractmethod
    async def delete(self, volume: Volume) -> None:
        """Remove the volume's bytes; the volume is not mounted. Called by `VolumeRegistry.delete`."""

    @abstractmethod
    def source(self, volume: Volume) -> str:
        """What a runtime of this store mounts (`VolumeMount.source`)."""

    @abstractmethod
    async def used_bytes(self, volume: Volume) -> int | None:
        """Bytes in use, read where the guest cannot forge it; None when unknown right now."""

    @abstractmethod
    def read_file(self, volume: Volume, path: str) -> AsyncGenerator[bytes, None]:
        """The file's bytes, for `GET /v1/volumes/{name}/files/{path}` (the volume is not mounted
        read-write). Raises ProtocolError (`not_found`, `is_a_directory`) before the first chunk."""

    @abstractmethod
    async def write_file(self, volume: Volume, path: str, chunks: AsyncIterator[bytes]) -> int:
        """Replace the file with `chunks` (parents made), all or nothing; the bytes written. The
        volume is not mounted. Raises ProtocolError(`disk_quota`) past the volume's size."""

    async def settle(self, volume: Volume) -> None:
        """Make the volume's bytes consistent after a read-write mount ended, before anyone mounts
        it again (a guest killed without unmounting leaves a journal to replay). Called by
        `VolumeRegistry.release`; the default does nothing."""

    async def close(self) -> None:
        """Release what the backend holds (mounts kept for reading). Called at gateway shutdown."""


#: Overrides the folder sandgate keeps data in that must outlive it (volumes).
DATA_ENV = "SANDGATE_DATA_DIR"


def default_dir() -> Path:
    """For `[storage] dir = ""`: `$SANDGATE_DATA_DIR/volumes`, else the user data folder's
    (`~/.local/share/sandgate/volumes`, platformdirs' rule)."""
    data = os.environ.get(DATA_ENV)
    if data:
        return Path(data) / "volumes"
    import platformdirs

    return Path(platformdirs.user_data_dir("sandgate")) / "volumes"


def check_mount_path(path: Any, where: str) -> str:
    """A volume's (or host mount's) path inside the sandbox, checked; ProtocolError otherwise."""
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 1024:
        raise ProtocolError("bad_request", f"{where}: a mount path is absolute, like /data")
    normal = os.path.normpath(path)
    if ".." in path.split("/") or "\0" in path or any(ord(c) < 0x20 for c in path):
        raise ProtocolError("path_escape", f"{where}: {path!r:.100} is not a plain absolute path")
    if normal in ("/", "/work", "/tmp") or any(normal == p or normal.startswith(p + "/")
                                               for p in RESERVED_MOUNT_PREFIXES):
        raise ProtocolError("bad_request", f"{where}: cannot mount over {normal} (choose a path like /data or "
                                           f"/work/data)")
    return normal


class VolumeRegistry:
    """Every tenant's volumes: records on disk, mounts in memory."""

    def __init__(self, settings: Storage, backends: Mapping[str, VolumeBackend]) -> None:
        self.settings = settings
        self.dir = Path(settings.dir) if settings.dir else default_dir()
        self.backends = dict(backends)
        self._volumes: dict[str, Volume] = {}
        #: volume id -> the sandbox that mounts it read-write (or "api" during an upload).
        self._writer: dict[str, str] = {}
        #: volume id -> the sandboxes that mount it read-only.
        self._readers: dict[str, set[str]] = {}
        self._by_sandbox: dict[str, list[str]] = {}

    # -- records -----------------------------------------------------------------------------

    def load(self) -> None:
        """Read every record; called once at gateway start. A record that cannot be read is
        skipped with its file left in place."""
        records = self.dir / "records"
        for item in sorted(records.glob("*.json")) if records.is_dir() else ():
            try:
                volume = Volume(**json.loads(item.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            self._volumes[volume.id] = volume

    def _save(self, volume: Volume) -> None:
        path = self.dir / "records" / f"{volume.id}.json"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(asdict(volume)))
        os.replace(temp, path)

    def list_for(self, tenant: str) -> list[Volume]:
        return sorted((v for v in self._volumes.values() if v.tenant == tenant), key=lambda v: v.name)

    def get(self, tenant: str, name: str) -> Volume:
        """The tenant's volume; another tenant's answers exactly like a missing one."""
        for volume in self._volumes.values():
            if volume.tenant == tenant and volume.name == name:
                return volume
        raise ProtocolError("not_found", f"no volume named {name!r:.80}")

    def backend(self, volume: Volume) -> VolumeBackend:
        backend = self.backends.get(volume.store)
        if backend is None:
            raise ProtocolError("unavailable", f"volume {volume.name!r} lives in the {volume.store!r} store, which "
                                               f"this gateway does not run now")
        return backend

    async def create(self, tenant: str, body: Mapping[str, Any], store: str) -> Volume:
        """Make a volume from a `POST /v1/volumes` body in `store` (the runtime's)."""
        unknown = sorted(set(body) - {"name", "quota_mb", "runtime"})
        if unknown:
            raise ProtocolError("bad_request", f"unknown fields: {unknown}")
        name = body.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ProtocolError("bad_request", "'name' is 1-63 lowercase letters, digits, '.', '_' or '-', starting "
                                               "and ending with a letter or digit")
        quota = body.get("quota_mb", self.settings.quota_mb)
        if isinstance(quota, bool) or not isinstance(quota, int) or not 1 <= quota <= self.settings.max_quota_mb:
            raise ProtocolError("bad_request", f"'quota_mb' is an integer from 1 to {self.settings.max_quota_mb}")
        if store not in self.backends:
            raise ProtocolError("unsupported", f"volumes of store {store!r} are not available on this gateway")
        mine = self.list_for(tenant)
        if any(v.name == name for v in mine):
            raise ProtocolError("exists", f"a volume named {name!r} exists")
        if len(mine) >= self.settings.max_volumes:
            raise ProtocolError("quota_exceeded", f"a tenant may have {self.settings.max_volumes} volumes")
        total = sum(v.quota_mb for v in mine)
        if total + quota > self.settings.max_tenant_mb:
            raise ProtocolError("quota_exceeded", f"the tenant's volumes would hold {total + quota} MB, above the "
                                                  f"{self.settings.max_tenant_mb} MB allowed")
        volume = Volume(id="vol_" + secrets.token_hex(10), tenant=tenant, name=name, quota_mb=quota, store=store,
                        created_at=time.time())
        self._volumes[volume.id] = volume  # taken now: a concurrent create of the same name gets `exists`
        try:
            await self.backends[store].create(volume)
            self._save(volume)
        except BaseException:
            del self._volumes[volume.id]
            raise
        return volume

    async def delete(self, tenant: str, name: str) -> None:
        volume = self.get(tenant, name)
        self._check_unmounted(volume, "deleted")
        del self._volumes[volume.id]
        try:
            (self.dir / "records" / f"{volume.id}.json").unlink(missing_ok=True)
            await self.backend(volume).delete(volume)
        except BaseException:
            self._volumes[volume.id] = volume
            self._save(volume)
            raise

    def _check_unmounted(self, volume: Volume, doing: str) -> None:
        users = self.users(volume)
        if users:
            raise ProtocolError("busy", f"volume {volume.name!r} cannot be {doing} while mounted by "
                                        f"{', '.join(sorted(users))}")

    # -- mounts ------------------------------------------------------------------------------

    def users(self, volume: Volume) -> dict[str, str]:
        """Who mounts the volume: sandbox id -> "rw" or "ro" ("api" for an upload)."""
        users = {sid: "ro" for sid in self._readers.get(volume.id, ())}
        writer = self._writer.get(volume.id)
        if writer is not None:
            users[writer] = "rw"
        return users

    def acquire(self, tenant: str, sandbox_id: str, store: str | None,
                wanted: Mapping[str, Any]) -> tuple[VolumeMount, ...]:
        """Mount the tenant's volumes for a new sandbox of a runtime of `store` (None: a runtime
        without volumes). `wanted` is the create body's `volumes`: {path: {"name", "readonly"}}.
        All or nothing; `release(sandbox_id)` gives them back."""
        if not wanted:
            return ()
        if not isinstance(wanted, Mapping):
            raise ProtocolError("bad_request", "'volumes' maps a path to {\"name\": ..., \"readonly\": false}")
        if store is None:
            raise ProtocolError("unsupported", "this runtime does not mount volumes")
        plan: list[tuple[str, Volume, bool]] = []
        seen: set[str] = set()
        for raw_path, item in wanted.items():
            path = check_mount_path(raw_path, "volumes")
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, Mapping) or set(item) - {"name", "readonly"}:
                raise ProtocolError("bad_request", f"volumes[{path!r}] is {{\"name\": ..., \"readonly\": false}}")
            readonly = item.get("readonly", False)
            if not isinstance(readonly, bool):
                raise ProtocolError("bad_request", f"volumes[{path!r}].readonly is true or false")
            volume = self.get(tenant, str(item.get("name")))
            if volume.id in seen:
                raise ProtocolError("bad_request", f"volume {volume.name!r} is mounted twice")
            seen.add(volume.id)
            if volume.store != store:
                raise ProtocolError("bad_request", f"volume {volume.name!r} lives in the {volume.store!r} store; "
                                                   f"this runtime mounts volumes of the {store!r} store")
            if volume.id in self._writer or (not readonly and self._readers.get(volume.id)):
                mode = "read-only" if readonly else "read-write"
                raise ProtocolError("busy", f"volume {volume.name!r} cannot be mounted {mode} now: mounted by "
                                            f"{', '.join(sorted(self.users(volume)))}")
            plan.append((path, volume, readonly))
        paths = sorted(p for p, _, _ in plan)
        for a, b in itertools.pairwise(paths):
            if b.startswith(a + "/"):
                raise ProtocolError("bad_request", f"volume mounts {a} and {b} nest")
        mounts = []
        for path, volume, readonly in plan:
            if readonly:
                self._readers.setdefault(volume.id, set()).add(sandbox_id)
            else:
                self._writer[volume.id] = sandbox_id
            self._by_sandbox.setdefault(sandbox_id, []).append(volume.id)
            mounts.append(VolumeMount(path=path, name=volume.name, readonly=readonly, quota_mb=volume.quota_mb,
                                      source=self.backend(volume).source(volume), volume_id=volume.id))
        return tuple(mounts)

    async def release(self, sandbox_id: str) -> None:
        """Give back every volume `sandbox_id` mounted (its sandbox is gone, or never came). A
        volume it wrote is settled by its backend first (`VolumeBackend.settle`), and stays taken
        until then: nobody mounts a file system mid-repair."""
        for volume_id in self._by_sandbox.pop(sandbox_id, ()):
            if self._writer.get(volume_id) == sandbox_id:
                volume = self._volumes.get(volume_id)
                try:
                    if volume is not None and volume.store in self.backends:
                        await asyncio.shield(self.backends[volume.store].settle(volume))
                finally:
                    del self._writer[volume_id]
            readers = self._readers.get(volume_id)
            if readers is not None:
                readers.discard(sandbox_id)
                if not readers:
                    del self._readers[volume_id]

    def adopt(self, sandbox_id: str, mounts: Iterable[VolumeMount]) -> None:
        """Record the mounts of a sandbox a restarted gateway adopted (a pod)."""
        for mount in mounts:
            if mount.volume_id not in self._volumes:
                continue
            if mount.readonly:
                self._readers.setdefault(mount.volume_id, set()).add(sandbox_id)
            else:
                self._writer[mount.volume_id] = sandbox_id
            self._by_sandbox.setdefault(sandbox_id, []).append(mount.volume_id)

    def for_upload(self, tenant: str, name: str) -> Volume:
        """The volume, taken read-write by the API for an upload (`release("api:<id>")` after);
        `busy` while any sandbox mounts it."""
        volume = self.get(tenant, name)
        self._check_unmounted(volume, "written through the API")
        holder = f"api:{volume.id}"
        self._writer[volume.id] = holder
        self._by_sandbox[holder] = [volume.id]
        return volume

    def for_download(self, tenant: str, name: str) -> Volume:
        """The volume, for a download: refused while a sandbox mounts it read-write (its bytes are
        changing under the guest's cache)."""
        volume = self.get(tenant, name)
        writer = self._writer.get(volume.id)
        if writer is not None:
            raise ProtocolError("busy", f"volume {name!r} is mounted read-write by {writer}; read it through that "
                                        f"sandbox")
        return volume

    async def describe(self, volume: Volume) -> dict[str, Any]:
        backend = self.backends.get(volume.store)
        used = await backend.used_bytes(volume) if backend is not None else None
        return {**volume.public(), "used_bytes": used,
                "mounted_by": [{"sandbox_id": sid, "readonly": mode == "ro"}
                               for sid, mode in sorted(self.users(volume).items()) if not sid.startswith("api:")]}

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()
