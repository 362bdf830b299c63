"""Build the local test cluster's binaries: a real kube-apiserver from Debian's source, etcd, kubectl.

    python -m tests.kube.build [--force]

Everything lands in `cache_root() / "kube"` (~/.cache/sandgate/kube, or $SANDGATE_CACHE_DIR/kube):
`bin/` holds kube-apiserver, etcd and kubectl plus BUILD-INFO.json; `gopath/` the source tree and
`go-build/` Go's build cache (kept, so a rebuild after a recipe change takes seconds, not minutes);
`build.log` the last build's output. The test fixtures call `ensure_built()`, which does nothing
when the binaries for the current recipe are there; a file lock keeps two pytest runs from building
at once.

Why these steps (each measured on Debian bookworm; no registry here offers a ready apiserver,
kind, k3s or envtest, and there is no container engine):

1. apt-get installs the build tools: golang-1.19-go (bookworm's Go that builds 1.20's tree),
   dpkg-dev (`apt-get source` unpacks with dpkg-source), bubblewrap (the test kubelet runs pods with
   it) and golang-github-modern-go-reflect2-dev (see 5). `deb-src` is enabled for bookworm first if the
   host has no source entry, with the URIs and key of the host's own bookworm `deb` entry.
2. etcd (etcd-server 3.4) and kubectl (kubernetes-client 1.20, the apiserver's own minor version) are
   fetched with `apt-get download` and unpacked into bin/ rather than installed: installing
   etcd-server registers a system service, and kubernetes-client's /usr/bin/kubectl collides with
   other packages that ship one (this host's Google Cloud `kubectl`). The tests use bin/kubectl, never
   whatever kubectl is on PATH.
3. `apt-get source kubernetes` is bookworm's 1.20.2 (Debian's version string 1.20.5+really1.20.2):
   the full upstream tree with vendor/. It is unpacked at gopath/src/k8s.io/kubernetes because the
   tree builds in GOPATH mode (GO111MODULE=off): its vendor/k8s.io/* are symlinks into staging/,
   which module mode of a newer Go rejects, and upstream's own build of that era ran in a GOPATH.
4. pkg/generated/openapi is not in the source (upstream generates it at build time): the vendored
   openapi-gen is built and run over every package tagged `+k8s:openapi-gen=true`, as upstream's
   Makefile.generated_files does. kube-apiserver does not link without it.
5. vendor/github.com/modern-go/reflect2 1.0.1 reads runtime internals that Go 1.18 changed and
   crashes at start (`unexpected fault address` in reflect2.loadGoTypes); Debian's 1.0.2 is the fix,
   so its source replaces the vendored copy.
6. `go build` of cmd/kube-apiserver, version stamped v1.20.2 (kubectl compares versions), under
   `nice` because the machine is shared: ~6 minutes on 2 cores.

kube-controller-manager and kube-scheduler build from the same tree, but the tests need neither: the
test kubelet binds pods itself, and the Helm chart's objects are stored, not reconciled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from plugins.common import TerminalProgress, cache_root, file_lock

#: Bump when a step below changes: installed binaries of another recipe are rebuilt.
RECIPE = 2
KUBE_VERSION = "v1.20.2"
GO = Path("/usr/lib/go-1.19/bin/go")
APT_TOOLS = ("golang-1.19-go", "dpkg-dev", "bubblewrap", "golang-github-modern-go-reflect2-dev")
#: Debian's packaged binaries unpacked into bin/: package -> path inside the .deb.
APT_BINARIES = {"etcd-server": "usr/bin/etcd", "kubernetes-client": "usr/bin/kubectl"}
REFLECT2_SRC = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
SOURCES_D = Path("/etc/apt/sources.list.d")
DEB_SRC_FILE = SOURCES_D / "sandgate-deb-src.sources"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
# Other sessions may hold dpkg's lock (apt runs elsewhere on a shared machine): wait, don't fail.
APT_OPTS = ("-o", "DPkg::Lock::Timeout=600", "-o", "APT::Get::Assume-Yes=true")

Progress = Callable[[float, str], None]


class BuildError(RuntimeError):
    """The binaries cannot be built on this host; the message says why and what was tried."""


@dataclass(frozen=True)
class Binaries:
    apiserver: Path
    etcd: Path
    kubectl: Path
    bwrap: Path


def die_with_parent() -> None:
    """In a child, before exec: SIGKILL when the process that started it dies (prctl
    PR_SET_PDEATHSIG), so an interrupted build or test run leaves nothing running."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def kube_cache() -> Path:
    return cache_root() / "kube"


def bin_dir() -> Path:
    return kube_cache() / "bin"


def source_dir() -> Path:
    return kube_cache() / "gopath" / "src" / "k8s.io" / "kubernetes"


def installed() -> Binaries | None:
    """The binaries of the current recipe, or None when something is missing or stale."""
    bins = bin_dir()
    try:
        info = json.loads((bins / "BUILD-INFO.json").read_text())
    except (OSError, ValueError):
        return None
    bwrap = shutil.which("bwrap")
    found = Binaries(bins / "kube-apiserver", bins / "etcd", bins / "kubectl", Path(bwrap or "/nonexistent"))
    if info.get("recipe") != RECIPE or bwrap is None:
        return None
    if not all(os.access(p, os.X_OK) for p in (found.apiserver, found.etcd, found.kubectl)):
        return None
    return found


def ensure_built(progress: Progress | None = None, *, force: bool = False) -> Binaries:
    """The binaries, built first when missing (minutes; `progress` hears about it).

    Raises:
        BuildError: the host cannot build them (no apt-get, not root, a step failed).
    """
    found = None if force else installed()
    if found is not None:
        return found
    progress = progress or TerminalProgress()
    (lock := kube_cache() / ".build.lock").parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock):
        found = None if force else installed()  # another process may have built it meanwhile
        if found is None:
            found = _build(progress)
    return found


class _Runner:
    """Runs the build's commands with their output in build.log and a progress line while they run."""

    def __init__(self, log: Path, progress: Progress) -> None:
        self.log_path = log
        self.progress = progress
        self.started = time.monotonic()
        log.write_text("")

    def note(self, phase: str) -> None:
        self.progress(time.monotonic() - self.started, phase)

    def run(self, argv: Sequence[str | Path], phase: str, *, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> None:
        argv = [str(a) for a in argv]
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            except OSError as exc:
                raise BuildError(f"{phase}: cannot run {argv[0]}: {exc}") from exc
            while True:
                try:
                    code = proc.wait(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    self.note(phase)
                except BaseException:
                    proc.kill()
                    proc.wait()
                    raise
        if code != 0:
            tail = "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise BuildError(f"{phase}: `{' '.join(argv)}` exited {code}; end of {self.log_path}:\n{tail}")


def _build(progress: Progress) -> Binaries:
    if not shutil.which("apt-get"):
        raise BuildError("building kube-apiserver needs Debian's apt-get (bookworm), and this host has none")
    cache = kube_cache()
    cache.mkdir(parents=True, exist_ok=True)
    run = _Runner(cache / "build.log", progress)
    _install_tools(run)
    bins = bin_dir()
    bins.mkdir(exist_ok=True)
    _unpack_debs(run, bins)
    src = _fetch_source(run)
    gopath = cache / "gopath"
    env = {"GOPATH": str(gopath), "GO111MODULE": "off", "GOFLAGS": "", "GOCACHE": str(cache / "go-build"),
           "GOTOOLCHAIN": "local", "CGO_ENABLED": "1"}
    _replace_reflect2(src)
    _generate_openapi(run, src, gopath, env)
    _build_apiserver(run, bins, env)
    info = {"recipe": RECIPE, "kube_version": KUBE_VERSION,
            "source": (src / ".sandgate-source").read_text().strip(),
            "seconds": round(time.monotonic() - run.started)}
    (bins / "BUILD-INFO.json").write_text(json.dumps(info, indent=2) + "\n")
    found = installed()
    if found is None:
        raise BuildError(f"the build finished but {bins} is incomplete (or bwrap is missing)")
    run.progress(time.monotonic() - run.started, "done")
    return found


# 1. Build tools from apt.


def _missing_packages(names: Sequence[str]) -> list[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *names],
                         capture_output=True, text=True).stdout
    ok = {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["ii"]}
    return [n for n in names if n not in ok]


def _has_deb_src() -> bool:
    """Whether any apt source (one-line or deb822) already offers bookworm's sources."""
    for path in [Path("/etc/apt/sources.list"), *SOURCES_D.glob("*.list")]:
        text = path.read_text(errors="replace") if path.is_file() else ""
        if re.search(r"^\s*deb-src\s.*\sbookworm\s", text, re.M):
            return True
    for path in SOURCES_D.glob("*.sources"):
        for stanza in _deb822(path.read_text(errors="replace")):
            if "deb-src" in stanza.get("types", "").split() and "bookworm" in stanza.get("suites", "").split() \
                    and stanza.get("enabled", "yes").lower() != "no":
                return True
    return False


def _deb822(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current = {}
        elif line.startswith("#"):
            continue
        elif line[0].isspace() and current:  # a continued field
            last = next(reversed(current))
            current[last] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key.strip().lower()] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _enable_deb_src() -> None:
    """A deb822 entry for bookworm's sources, mirroring the host's own bookworm `deb` entry (its
    URIs and signing key: a host pinned to a snapshot gets sources from the same snapshot)."""
    uris, signed_by = "http://deb.debian.org/debian", "/usr/share/keyrings/debian-archive-keyring.gpg"
    for path in SOURCES_D.glob("*.sources"):
        for stanza in _deb822(path.read_text(errors="replace")):
            if "deb" in stanza.get("types", "").split() and "bookworm" in stanza.get("suites", "").split():
                uris = stanza.get("uris", uris)
                signed_by = stanza.get("signed-by", signed_by)
    DEB_SRC_FILE.write_text(
        "# Added by sandgate's tests/kube/build.py: `apt-get source kubernetes` builds the test apiserver.\n"
        f"Types: deb-src\nURIs: {uris}\nSuites: bookworm\nComponents: main\nSigned-By: {signed_by}\n")


def _install_tools(run: _Runner) -> None:
    missing = _missing_packages(APT_TOOLS)
    need_src = not _has_deb_src()
    if os.geteuid() != 0 and (missing or need_src):
        raise BuildError(f"building kube-apiserver needs root for apt-get (missing: {', '.join(missing) or 'none'}"
                         f"{'; no deb-src entry for bookworm' if need_src else ''})")
    if need_src:
        run.note("enabling deb-src for bookworm")
        _enable_deb_src()
    # Once per build: the package lists may be stale, and a new deb-src entry has none yet. Without
    # root (everything already installed) the lists are what they are: download and source need none.
    if os.geteuid() == 0:
        run.run(["apt-get", *APT_OPTS, "update"], "apt-get update", env=APT_ENV)
    if missing:
        run.run(["apt-get", *APT_OPTS, "install", "--no-install-recommends", *missing],
                f"apt-get install {' '.join(missing)}", env=APT_ENV)


# 2. etcd and kubectl, unpacked from Debian's packages.


def _unpack_debs(run: _Runner, bins: Path) -> None:
    with tempfile.TemporaryDirectory(dir=kube_cache(), prefix=".debs-") as tmp:
        run.run(["apt-get", *APT_OPTS, "download", *APT_BINARIES], "apt-get download etcd-server kubernetes-client",
                cwd=Path(tmp))
        for package, inner in APT_BINARIES.items():
            (deb,) = Path(tmp).glob(f"{package}_*.deb")
            root = Path(tmp) / package
            run.run(["dpkg-deb", "-x", deb, root], f"unpacking {deb.name}")
            dest = bins / Path(inner).name
            shutil.copy2(root / inner, dest.with_suffix(".new"))
            os.replace(dest.with_suffix(".new"), dest)


# 3. The source tree.


def _fetch_source(run: _Runner) -> Path:
    src = source_dir()
    done = src / ".sandgate-unpacked"
    if done.exists():
        return src
    shutil.rmtree(src, ignore_errors=True)
    src.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kube_cache(), prefix=".source-") as tmp:
        # --only-source: the source package named kubernetes, not whatever binary has that name.
        run.run(["apt-get", *APT_OPTS, "source", "--only-source", "kubernetes"], "apt-get source kubernetes",
                cwd=Path(tmp))
        (tree,) = (p for p in Path(tmp).iterdir() if p.is_dir())
        (tree / "vendor").is_dir() or _fail(f"{tree.name} has no vendor/ folder: not the tree this recipe knows")
        os.replace(tree, src)
        (src / ".sandgate-source").write_text(tree.name + "\n")
    done.write_text("")
    return src


def _fail(message: str) -> bool:
    raise BuildError(message)


# 4. pkg/generated/openapi.


def _openapi_packages(src: Path) -> list[str]:
    """The packages upstream's Makefile.generated_files feeds openapi-gen for pkg/generated/openapi:
    folders of the tree (vendor/ and hidden or `_` folders left out, staging/src named as its vendor/
    twin) with a Go file carrying `// +k8s:` tags and `+k8s:openapi-gen=`, less code-generator's and
    sample-apiserver's. Import paths as GOPATH mode spells them."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(src):
        top = Path(dirpath).relative_to(src)
        if top == Path("."):
            dirnames[:] = [d for d in dirnames if d != "vendor" and not d.startswith(("_", "."))]
        for name in filenames:
            if not name.endswith(".go"):
                continue
            text = (Path(dirpath) / name).read_text(errors="replace")
            if "+k8s:openapi-gen=" in text and re.search(r"^// *\+k8s:", text, re.M):
                found.add(top.as_posix())
                break
    packages = set()
    for rel in found:
        if rel.startswith("staging/src/"):
            rel = "vendor/" + rel.removeprefix("staging/src/")
        if rel.startswith(("vendor/k8s.io/code-generator/", "vendor/k8s.io/sample-apiserver/")):
            continue
        packages.add("k8s.io/kubernetes/" + rel)
    return sorted(packages)


def _generate_openapi(run: _Runner, src: Path, gopath: Path, env: dict[str, str]) -> None:
    out = src / "pkg" / "generated" / "openapi" / "zz_generated.openapi.go"
    if out.exists():
        return
    tool = kube_cache() / "tools" / "openapi-gen"
    run.run(["nice", GO, "build", "-o", tool, "k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen"],
            "building openapi-gen", cwd=src, env=env)
    run.note("finding packages tagged for openapi-gen")
    packages = _openapi_packages(src)
    if not packages:
        raise BuildError(f"no package in {src} is tagged +k8s:openapi-gen=true")
    report = kube_cache() / "tools" / "openapi-violations.report"
    run.run(["nice", tool, "--input-dirs", ",".join(packages), "--output-package",
             "k8s.io/kubernetes/pkg/generated/openapi", "--output-file-base", "zz_generated.openapi",
             "--output-base", gopath / "src",
             "--go-header-file", src / "vendor" / "k8s.io" / "code-generator" / "hack" / "boilerplate.go.txt",
             "--report-filename", report],
            f"generating pkg/generated/openapi from {len(packages)} packages", cwd=src, env=env)
    if not out.exists():
        raise BuildError(f"openapi-gen ran but wrote no {out}")


# 5. reflect2.


def _replace_reflect2(src: Path) -> None:
    vendored = src / "vendor" / "github.com" / "modern-go" / "reflect2"
    if (vendored / ".sandgate-debian").exists():
        return
    if not (REFLECT2_SRC / "reflect2.go").is_file():
        raise BuildError(f"{REFLECT2_SRC} is missing: golang-github-modern-go-reflect2-dev is not installed")
    shutil.rmtree(vendored)
    shutil.copytree(REFLECT2_SRC, vendored, ignore=shutil.ignore_patterns("*_test.go", "test*"))
    (vendored / ".sandgate-debian").write_text("Debian's golang-github-modern-go-reflect2-dev 1.0.2\n")


# 6. kube-apiserver.


def _build_apiserver(run: _Runner, bins: Path, env: dict[str, str]) -> None:
    major, minor = KUBE_VERSION[1:].split(".")[:2]
    values = {"gitVersion": KUBE_VERSION, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean"}
    # Both version packages, as upstream's hack/lib/version.sh does: the apiserver's /version
    # answers from client-go's, its --version from component-base's.
    ldflags = " ".join(["-s -w", *(f"-X k8s.io/kubernetes/vendor/k8s.io/{pkg}.{key}={value}"
                                   for pkg in ("client-go/pkg/version", "component-base/version")
                                   for key, value in values.items())])
    tmp = bins / ".kube-apiserver.new"
    run.run(["nice", GO, "build", "-ldflags", ldflags, "-o", tmp, "k8s.io/kubernetes/cmd/kube-apiserver"],
            "building kube-apiserver (about 6 minutes on 2 cores)", cwd=source_dir(), env=env)
    os.replace(tmp, bins / "kube-apiserver")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kube.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the binaries are there")
    args = parser.parse_args(argv)
    try:
        found = ensure_built(TerminalProgress(), force=args.force)
    except BuildError as exc:
        print(f"sandgate: cannot build the test cluster: {exc}", file=sys.stderr)
        return 1
    for name in ("apiserver", "etcd", "kubectl", "bwrap"):
        print(f"{name}: {getattr(found, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
