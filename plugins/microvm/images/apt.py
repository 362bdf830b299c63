"""Debian packages for an image: apt-get and apt-cache on the builder's own state (only
templates.toml's [debian] sources), downloads checked against the index's sha256, and dpkg-deb
to unpack them. Nothing is installed on the host."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from plugins.common import private_dir
from plugins.microvm.images.commands import Clock, run
from plugins.microvm.images.host import HostError
from plugins.microvm.images.templates import ARCH, DebianSources

#: How old the builder's apt index may be before a build refreshes it.
APT_MAX_AGE_S = 24 * 3600


@dataclass(frozen=True)
class Deb:
    package: str
    version: str
    sha256: str
    path: Path


class Apt:
    """apt-get and apt-cache on a private state folder holding only the [debian] sources, so
    nothing depends on (or changes) the host's apt sources. The host's apt.conf (proxies) applies."""

    def __init__(self, base: Path, sources: DebianSources) -> None:
        self.base = base
        self.sources = sources
        self.debs = private_dir(base.parent / "debs")

    def options(self) -> list[str]:
        b = self.base
        opts = {
            "Dir::Etc::SourceList": b / "sources.list",
            "Dir::Etc::SourceParts": b / "empty",
            "Dir::Etc::Preferences": b / "empty" / "preferences",
            "Dir::Etc::PreferencesParts": b / "empty",
            "Dir::State": b / "state",
            "Dir::State::status": b / "status",
            "Dir::Cache": b / "cache",
            # (container images often turn these caches off; ours saves ~1 s per apt-cache run)
            "Dir::Cache::pkgcache": "pkgcache.bin",
            "Dir::Cache::srcpkgcache": "srcpkgcache.bin",
            "APT::Architecture": ARCH,
            "APT::Architectures": ARCH,
            "Acquire::Languages": "none",
        }
        if os.geteuid() == 0:
            # apt drops to _apt for downloads, who cannot write into a 0700 cache
            opts["APT::Sandbox::User"] = "root"
        return [arg for key, value in opts.items() for arg in ("-o", f"{key}={value}")]

    def update(self, clock: Clock, *, force: bool = False) -> None:
        """Refresh the index when it is missing, older than APT_MAX_AGE_S, for other sources, or `force`."""
        b = self.base
        sources = self.sources.sources_list()
        stamp = b / "updated"
        current = (b / "sources.list").is_file() and (b / "sources.list").read_text() == sources
        if current and not force and stamp.is_file() and time.time() - stamp.stat().st_mtime < APT_MAX_AGE_S:
            return
        if not Path(self.sources.keyring).is_file():
            raise HostError(f"{self.sources.keyring} is missing: apt-get install debian-archive-keyring")
        for sub in ("empty", "state/lists/partial", "cache/archives/partial"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        (b / "status").touch()
        (b / "sources.list").write_text(sources)
        try:
            run(["apt-get", "-q", *self.options(), "update"], clock, f"apt-get update ({self.sources.suite})")
        except RuntimeError as exc:
            raise HostError(f"cannot reach Debian's archive: {exc}") from exc
        stamp.touch()

    def show(self, *specs: str) -> list[dict[str, str]]:
        """The index fields of each of `specs` (package or package=version), candidate version.

        Raises:
            LookupError: the index lacks one of them."""
        proc = subprocess.run(["apt-cache", *self.options(), "show", "--no-all-versions", *specs],
                              capture_output=True, text=True, check=False)
        stanzas: list[dict[str, str]] = []
        for stanza in proc.stdout.split("\n\n"):
            fields: dict[str, str] = {}
            last = ""
            for line in stanza.splitlines():
                if line[:1] in (" ", "\t") and last:
                    fields[last] += "\n" + line.strip()
                elif ":" in line:
                    last, _, value = line.partition(":")
                    fields[last] = value.strip()
            if fields.get("Package"):
                stanzas.append(fields)
        by_name = {f["Package"]: f for f in stanzas}
        names = [spec.partition("=")[0] for spec in specs]
        if proc.returncode != 0 or not all(n in by_name for n in names):
            lines = [line for line in proc.stderr.splitlines() if line.startswith("E:")] or [proc.stderr.strip()]
            missing = [n for n in names if n not in by_name]
            raise LookupError(f"{' '.join(missing) or 'packages'} not in the {self.sources.suite} index: "
                              f"{' '.join(lines)[-800:]}")
        return [by_name[n] for n in names]

    def fetch(self, specs: Sequence[str], clock: Clock) -> list[Deb]:
        """The .debs of `specs` (package or package=version) from debs/, downloading what is
        missing; each checked against the index's sha256."""
        found: list[Deb] = []
        try:
            wanted = list(zip(specs, self.show(*specs), strict=True))
        except LookupError as exc:
            raise RuntimeError(f"{exc} (templates.toml names a package Debian does not have)") from None
        missing = [(s, f) for s, f in wanted if not self._cached(f)]
        if missing:
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=self.debs))
            try:
                names = [f"{f['Package']}={f['Version']}" for _, f in missing]
                try:
                    run(["apt-get", "-q", *self.options(), "download", *names], clock,
                        f"downloading {len(names)} packages", cwd=tmp)
                except RuntimeError as exc:
                    raise HostError(f"cannot download from Debian's archive: {exc}") from exc
                for _, fields in missing:
                    name = Path(fields["Filename"]).name
                    # apt-get names files with the epoch (1%3a...), the archive without it
                    got = list(tmp.glob(f"{fields['Package']}_*.deb"))
                    if len(got) != 1:
                        raise RuntimeError(f"apt-get download did not write {name}")
                    if sha256_file(got[0]) != fields["SHA256"]:
                        raise RuntimeError(f"{name} does not match the index's sha256")
                    os.replace(got[0], self.debs / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        for _, fields in wanted:
            path = self.debs / Path(fields["Filename"]).name
            found.append(Deb(fields["Package"], fields["Version"], fields["SHA256"], path))
        return found

    def _cached(self, fields: Mapping[str, str]) -> bool:
        path = self.debs / Path(fields["Filename"]).name
        return path.is_file() and sha256_file(path) == fields["SHA256"]


def unpack(deb: Path, dest: Path, clock: Clock) -> None:
    run(["dpkg-deb", "-x", deb, dest], clock, f"unpacking {deb.name}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
