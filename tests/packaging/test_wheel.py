"""The wheel as users get it: built from this checkout, installed into a fresh virtualenv outside
it, and run from there with the checkout off the path, so only what the wheel holds can be read.

Offline: the wheel is built without build isolation and installed without dependencies; the new
virtualenv finds the dependencies through a .pth file naming a folder of links to this
virtualenv's packages (all but sandgate itself, whose editable finder would bring the checkout back).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.serving import Served, serve

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "plugins", "guest_agent")
#: Folders inside the packages that are not the project's files: npm's (the IDE serves xterm.js
#: from node_modules when `npm ci` ran, and says so when it did not) and Python's caches.
NOT_SHIPPED = {"node_modules", "__pycache__"}
KEY = "wheel-test-key"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    #: The new virtualenv's site-packages, where the wheel went.
    site: Path
    #: A working directory outside the checkout.
    outside: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment minus anything that points back at the checkout or configures a gateway
        (the compiled-module cache, SANDGATE_CACHE_DIR, stays shared)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")
               and (not k.startswith("SANDGATE_") or k == "SANDGATE_CACHE_DIR")}
        return {**env, "SANDGATE_API_KEYS": f"{KEY}:tenant", **extra}


def _run(*args: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    # A copy: a build in place would leave build/ and egg-info in the checkout, and build/lib would
    # carry files between builds.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", root / "dist", source, cwd=root)
    (wheel,) = (root / "dist").glob("sandgate-*.whl")

    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet", "--no-deps",
         "--no-index", wheel, cwd=root)
    site = Path(_run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=root).strip())
    deps = root / "deps"
    deps.mkdir()
    ours = re.compile(r"^(sandgate-.*|__editable__.*|.*\.pth|gateway|plugins|guest_agent|__pycache__)$")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not ours.match(entry.name):
            (deps / entry.name).symlink_to(entry)
    (site / "sandgate-test-dependencies.pth").write_text(f"{deps}\n")
    outside = root / "cwd"
    outside.mkdir()
    return Installed(wheel, venv, site, outside)


def test_the_installed_wheel_is_what_runs(installed: Installed) -> None:
    probe = ("import json, sys, gateway, plugins.microvm, guest_agent; "
             "print(json.dumps([sys.path, [m.__file__ for m in (gateway, plugins.microvm, guest_agent)]]))")
    path, files = json.loads(_run(installed.python, "-c", probe, cwd=installed.outside))
    assert all(Path(f).is_relative_to(installed.site) for f in files), files
    assert not [p for p in path if Path(installed.outside, p).resolve().is_relative_to(ROOT)], path


def test_the_wheel_holds_every_data_file(installed: Installed) -> None:
    """Every file in the packages that is not Python source is read at run time (the IDE's files,
    the JavaScript client, the microVM's templates.toml and guest/init, ...), so each must ship."""
    with zipfile.ZipFile(installed.wheel) as wheel:
        shipped = set(wheel.namelist())
    expected = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            rel = path.relative_to(ROOT)
            if path.is_file() and path.suffix not in (".py", ".pyc") and not NOT_SHIPPED & set(rel.parts) \
                    and not any(part.startswith(".") for part in rel.parts):
                expected.add(rel.as_posix())
    assert {"plugins/microvm/templates.toml", "plugins/microvm/guest/init", "gateway/web/static/index.html",
            "gateway/web/js/sandgate.js"} <= expected, "the walk above finds the data files"
    assert sorted(expected - shipped) == []
    assert [n for n in shipped if NOT_SHIPPED & set(n.split("/")) or n.endswith(".pyc")] == []


def _serve_installed(installed: Installed, env: Mapping[str, str], *args: str) -> AbstractContextManager[Served]:
    """The wheel's `sandgate serve`, run from outside the checkout, ready to take requests."""
    return serve(env, *args, command=[str(installed.venv / "bin" / "sandgate")], cwd=installed.outside)


def _run_code(gateway: Served, runtime: str) -> None:
    listed = gateway.call(KEY, "GET", "/v1/runtimes")
    assert runtime in [r["id"] for r in listed["runtimes"]], listed
    sandbox = gateway.call(KEY, "POST", "/v1/sandboxes", {"runtime": runtime})
    done = gateway.call(KEY, "POST", f"/v1/sandboxes/{sandbox['id']}/exec",
                        {"language": "python", "code": "print(sum(range(10)))"})
    assert done["stdout"] == "45\n", done
    if runtime == "wasm":  # C through the installed jail (python -m plugins.wasm.jail from the wheel)
        done = gateway.call(KEY, "POST", f"/v1/sandboxes/{sandbox['id']}/exec",
                            {"language": "c", "code": '#include <stdio.h>\nint main(void) { puts("from C"); }\n'})
        assert done["stdout"] == "from C\n", done
    if runtime == "microvm":  # a process, started by the guest's init and agent from the wheel
        done = gateway.call(KEY, "POST", f"/v1/sandboxes/{sandbox['id']}/exec",
                            {"command": ["sh", "-c", "echo from $(uname -s)"]})
        assert done["stdout"] == "from Linux\n", done
    assert gateway.call(KEY, "DELETE", f"/v1/sandboxes/{sandbox['id']}") is None


def _no_errors(output: str) -> None:
    assert not re.search(r"\b(ERROR|CRITICAL)\b|Traceback", output), output


@pytest.mark.wasm
@pytest.mark.usefixtures("wasm_compiled")
def test_the_installed_gateway_runs_wasm_and_serves_the_ide(installed: Installed, tmp_path: Path) -> None:
    env = installed.env(SANDGATE_BLOCKED_PLUGINS="microvm", SANDGATE_STATE_DIR=str(tmp_path / "state"))
    with _serve_installed(installed, env) as gateway:
        _run_code(gateway, "wasm")
        names = [p.name for p in (ROOT / "gateway" / "web" / "static").iterdir() if p.name != "index.html"]
        names += [p.name for p in (ROOT / "gateway" / "web" / "js").glob("*.js")]
        for url in ["/", *(f"/static/{name}" for name in names)]:
            with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}{url}", timeout=60) as resp:
                assert resp.status == 200 and resp.read(), url
        output = gateway.banner + gateway.stop()
    _no_errors(output)


@pytest.mark.microvm
def test_the_installed_gateway_runs_microvm(installed: Installed, tmp_path: Path) -> None:
    from plugins.microvm.images.cache import find_image

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not installed here (`sandgate images build microvm` installs it)")
    if find_image("default") is None:
        pytest.skip("the microVM default image is not built here (`sandgate images build microvm`)")
    config = installed.outside / "microvm.toml"
    config.write_text("[runtimes.microvm]\npool_size = 0\n")  # one VM, for the one sandbox
    env = installed.env(SANDGATE_BLOCKED_PLUGINS="wasm", SANDGATE_STATE_DIR=str(tmp_path / "state"))
    with _serve_installed(installed, env, "--config", str(config)) as gateway:
        _run_code(gateway, "microvm")
        output = gateway.banner + gateway.stop()
    _no_errors(output)
