"""Custom microVM templates: a user's own templates file (checked at load), built for real with
`sandgate images build microvm --template custom-test --templates FILE`, and a sandbox of it
through the real gateway running the Debian package's program, importing the pip package,
requiring the npm package and reading the files; the setup commands' confinement; and
`sandgate images ls` / `prune` on a private cache holding real built entries."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from aiohttp.test_utils import TestClient

from gateway import cli
from gateway.testing.conformance import AUTH, Gateway, GatewayFixtures
from plugins.microvm.images import templates
from plugins.microvm.images.templates import TemplateError, load_config

if TYPE_CHECKING:
    from plugins.microvm.images.cache import BootImage

USER_FILE = Path(__file__).parent / "templates" / "custom.toml"
NAME = "custom-test"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- the templates file, checked at load ------------------------------------------------------------


@pytest.mark.parametrize(("table", "message"), [
    ('[templates.x]\nbase = "full"\nmemroy_mb = 256\n', "unknown keys in [templates.x]: memroy_mb"),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs]\npip = "six"\n', "templates.x.rootfs.pip must be a list"),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs]\nsetup = [1]\n', "templates.x.rootfs.setup must be a list"),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs]\npip = ["--index-url=http://evil/"]\n',
     "must name registry packages"),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs]\npip = ["-r/etc/shadow"]\n', "must name registry packages"),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs]\nnpm = ["file:/etc"]\n', "must name registry packages"),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs]\nnpm = ["../../x"]\n', "must name registry packages"),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs]\n[templates.x.rootfs.files]\n"/a/../../etc/passwd" = "x"\n',
     "absolute file path without .."),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs]\n[templates.x.rootfs.files]\n"relative" = "x"\n',
     "absolute file path"),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs.files]\n"/a" = { text = "x", source = "y" }\n',
     "one of text or source"),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs.files]\n"/a" = { source = "nope.txt" }\n', "cannot read"),
    ('[templates.x]\nbase = "full"\n[templates.x.rootfs.files]\n"/a" = { text = "x", mode = 99999 }\n',
     "mode must be an integer"),
    ('[templates.x]\nbase = "nope"\n', "no template 'nope'"),
    ('[templates.x]\nbase = 3\n', "base must be a string"),
    ('[templates.x]\nbase = "y"\n[templates.y]\nbase = "x"\n', "comes back to"),
    ('[debian]\nsuite = "sid"\n[templates.x]\nbase = "full"\n', "holds [templates.<name>] tables only"),
    ('[templates.x\n', "not valid TOML"),
])
def test_a_bad_user_file_is_refused_naming_the_key(tmp_path: Path, table: str, message: str) -> None:
    path = _write(tmp_path / "mine.toml", table)
    with pytest.raises(TemplateError, match=None) as err:
        load_config(user_file=path)
    assert message in str(err.value)
    if "mine.toml" not in str(err.value) and "no template" not in message:
        pytest.fail(f"the error does not name the file: {err.value}")


def test_npm_needs_node_on_the_disk(tmp_path: Path) -> None:
    # `default` has no root disk; a template replacing full's packages without nodejs cannot have npm
    path = _write(tmp_path / "mine.toml", '[templates.x]\nbase = "full"\nrootfs = { packages = ["busybox-static"], '
                                          'npm = ["is-odd"] }\n')
    # (a rootfs given inline replaces nothing: its lists add to the base's, which has nodejs)
    assert load_config(user_file=path).templates["x"].rootfs.npm == ("is-odd",)  # type: ignore[union-attr]
    path = _write(tmp_path / "other.toml", '[templates.x]\nbase = "default"\ncompile_with = ["libc6"]\n'
                                           'rootfs = { packages = ["busybox-static"], npm = ["is-odd"] }\n')
    with pytest.raises(TemplateError, match="npm needs nodejs"):
        load_config(user_file=path)


def test_a_user_template_adds_to_its_base_and_overrides_by_name(tmp_path: Path) -> None:
    shipped = load_config()
    path = _write(tmp_path / "mine.toml", """
[templates.full]            # replaces the shipped full, starting from it
base = "full"
memory_mb = 384
[templates.full.rootfs]
packages = ["jq"]
[templates.tools]
base = "full"               # this file's full, so jq too
[templates.tools.rootfs]
pip = ["six"]
""")
    config = load_config(user_file=path)
    full, tools = config.templates["full"], config.templates["tools"]
    assert full.memory_mb == tools.memory_mb == 384
    assert full.rootfs is not None and tools.rootfs is not None and shipped.templates["full"].rootfs is not None
    assert full.rootfs.packages == (*shipped.templates["full"].rootfs.packages, "jq")
    assert tools.rootfs.packages == full.rootfs.packages and tools.rootfs.pip == ("six",)
    assert full.declaration != shipped.templates["full"].declaration
    assert config.templates["default"] == shipped.templates["default"]


def test_everything_in_the_spec_is_in_the_key(tmp_path: Path) -> None:
    from plugins.microvm.images.cache import recipe

    (tmp_path / "data.txt").write_text("one")
    base = ('[templates.x]\nbase = "full"\n[templates.x.rootfs]\npackages = ["jq"]\npip = ["six"]\nnpm = ["is-odd"]\n'
            'setup = ["true"]\n[templates.x.rootfs.files]\n"/etc/a" = "a"\n"/etc/b" = { source = "data.txt" }\n')
    path = _write(tmp_path / "mine.toml", base)
    keys = {recipe(load_config(user_file=path), "x")}
    for old, new in (('"jq"', '"bc"'), ('"six"', '"six==1.17.0"'), ('"is-odd"', '"is-even"'),
                     ('"true"', '"true "'), ('"/etc/a" = "a"', '"/etc/a" = "b"'),
                     ('source = "data.txt"', 'source = "data.txt", mode = 0o600')):
        _write(path, base.replace(old, new))
        keys.add(recipe(load_config(user_file=path), "x"))
    _write(path, base)
    (tmp_path / "data.txt").write_text("two")  # the host file's content, not its name
    keys.add(recipe(load_config(user_file=path), "x"))
    assert len(keys) == 8


def test_the_shipped_templates_keep_their_keys_without_a_user_file() -> None:
    # A template without the new keys declares exactly what it did: the images built before stay current.
    data = templates._read_toml(templates.TEMPLATES_FILE)
    for name, spec in load_config().templates.items():
        assert spec.declaration == templates.canonical(data["templates"][name])


# -- setup commands, confined ------------------------------------------------------------------------


def _busybox_tree(tmp_path: Path) -> Path:
    """A tree holding Debian's static busybox, fetched by the image builder's own apt (cached)."""
    from plugins.common import private_dir
    from plugins.microvm.images.apt import Apt, unpack
    from plugins.microvm.images.cache import microvm_cache
    from plugins.microvm.images.commands import Clock
    from plugins.microvm.images.host import HostError

    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("apt-get") is None:
        pytest.skip("setup commands are confined by root with unshare; the test's busybox comes with apt-get")
    clock = Clock(lambda *_: None)
    apt = Apt(private_dir(private_dir(microvm_cache()) / "apt"), load_config().debian)
    try:
        apt.update(clock)
        [deb] = apt.fetch(["busybox-static"], clock)
    except HostError as exc:
        pytest.skip(f"cannot fetch busybox-static: {exc}")
    tree = tmp_path / "tree"
    unpack(deb.path, tree, clock)
    for applet in ("sh", "cat", "ls", "echo", "mount", "chroot", "mknod", "chown", "stat", "wget", "nc", "id"):
        (tree / "bin" / applet).symlink_to("busybox")
    for folder in ("etc", "mnt", "tmp"):
        (tree / folder).mkdir()
    return tree


def _confined(tree: Path, command: str) -> subprocess.CompletedProcess[str]:
    from plugins.microvm.images.confine import setup_argv

    return subprocess.run(setup_argv(tree, command), capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(cli.__file__).parents[1])})


def test_setup_commands_run_as_root_in_the_tree_and_nothing_more(tmp_path: Path) -> None:
    tree = _busybox_tree(tmp_path)
    secret = tmp_path / "host-secret"
    secret.write_text("the host's")
    ok = _confined(tree, "echo made > /etc/made; chown 1000:1000 /etc/made; id -u; ls /")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["0", "bin", "dev", "etc", "mnt", "proc", "tmp", "usr"]  # the tree is all it sees
    assert (tree / "etc/made").read_text() == "made\n" and (tree / "etc/made").stat().st_uid == 1000
    for attack in (
        f"cat {secret}",                                 # the host's files
        "cat /proc/1/root/../../../etc/hostname; ls /proc/2",  # the host's processes
        "mount -t tmpfs none /mnt",                      # mounts (to reach the host's disks)
        "chroot / /bin/true",                            # chroot, the classic way out of a chroot
        "mknod /tmp/sda b 8 0",                          # device nodes
        "wget -q -T 5 -O- http://1.1.1.1/",              # the network
    ):
        refused = _confined(tree, attack)
        assert refused.returncode != 0, (attack, refused.stdout)
    assert not (tree / "tmp/sda").exists() and not (tree / ".sandgate-old-root").exists()


def test_a_failing_setup_command_fails_the_build(tmp_path: Path) -> None:
    from plugins.microvm.images.commands import Clock
    from plugins.microvm.images.rootfs import customize
    from plugins.microvm.images.templates import RootfsSpec

    tree = _busybox_tree(tmp_path)
    path = _write(tmp_path / "mine.toml", '[templates.x]\nbase = "full"\n[templates.x.rootfs]\n'
                                          'setup = ["echo first > /etc/first", "echo broken >&2; exit 3"]\n'
                                          '[templates.x.rootfs.files]\n"/etc/motd" = { text = "hi", mode = 0o600 }\n')
    spec = load_config(user_file=path).templates["x"]
    assert isinstance(spec.rootfs, RootfsSpec)
    (tree / "etc/motd").symlink_to(tmp_path / "host-motd")  # a link in the tree must not lead the write out
    with pytest.raises(RuntimeError, match=r"(?s)setup command 2 of 2 \(echo broken >&2; exit 3\).*exit 3.*broken"):
        customize(tree, spec, spec.rootfs, {"libc6": "2.36-9"}, Clock(lambda *_: None))
    assert (tree / "etc/first").read_text() == "first\n"
    assert (tree / "etc/motd").read_text() == "hi" and not (tmp_path / "host-motd").exists()
    assert (tree / "etc/motd").stat().st_mode & 0o7777 == 0o600


# -- built for real, through the gateway ---------------------------------------------------------


@pytest.fixture(scope="session")
def custom_image() -> BootImage:
    """`sandgate images build microvm --template custom-test --templates FILE` (a debootstrap of
    full's packages and jq, minutes the first time; a cache hit after). A host that cannot build
    it (no root, no apt, Debian unreachable) skips with the reason."""
    from plugins.common import TerminalProgress
    from plugins.microvm.images.cache import find_image
    from plugins.microvm.images.host import HostError
    from plugins.microvm.runtime import MicrovmRuntime

    try:
        MicrovmRuntime.build_images({"templates_file": str(USER_FILE)}, NAME, TerminalProgress())
    except HostError as exc:
        pytest.skip(f"the custom template cannot be built here: {exc}")
    # the CLI the README shows: now a cache hit
    assert cli.main(["images", "build", "microvm", "--template", NAME, "--templates", str(USER_FILE)]) == 0
    image = find_image(NAME, load_config(user_file=USER_FILE))
    assert image is not None
    return image


@pytest.mark.microvm
class TestCustomTemplate(GatewayFixtures):
    runtime = "microvm"
    # the gateway's default template is the custom one: it needs only that image
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 0, "templates_file": str(USER_FILE), "template": NAME}

    async def _sandbox(self, gateway: Gateway, image: BootImage) -> str:
        sandbox = await gateway.create(template=NAME, memory_mb=image.memory_mb)
        return str(sandbox["id"])

    async def test_the_sandbox_has_what_the_template_added(self, gateway: Gateway, custom_image: BootImage) -> None:
        sid = await self._sandbox(gateway, custom_image)
        debian = await gateway.exec(sid, command="echo '{\"a\": [1, 2]}' | jq -c '.a | add'", timeout=100)
        assert (debian["exit_code"], debian["stdout"]) == (0, "3\n"), debian
        wheel = await gateway.exec(sid, language="python", code="import six; print(six.__version__, six.__file__)",
                                   timeout=100)
        assert wheel["stdout"] == "1.17.0 /usr/local/lib/python3.11/dist-packages/six.py\n", wheel
        npm = await gateway.exec(sid, language="javascript", code="const isOdd = require('is-odd');"
                                                                  "console.log(isOdd(3), isOdd(4))", timeout=100)
        assert npm["stdout"] == "true false\n", npm
        files = await gateway.exec(sid, command="cat /etc/sandgate-test.txt; /opt/tools/hello.sh; "
                                                "stat -c %a /opt/tools/hello.sh")
        assert files["stdout"] == "a file from the template\nhello from a host file\n755\n", files
        setup = await gateway.exec(sid, command="jq -r .made /etc/setup-made.json; cat /etc/setup-network "
                                                "/etc/setup-mount")
        # the setup commands ran at build time, with the image's programs, confined
        assert setup["stdout"] == "by setup\nunreachable\nrefused\n", setup

    async def test_a_gateway_without_the_file_does_not_know_the_template(
            self, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], custom_image: BootImage) -> None:
        from gateway.config import Settings
        from gateway.testing.conformance import KEY
        from gateway.web.app import create_app

        settings = Settings(api_keys={KEY: "tenant-a"}, blocked_plugins=self._blocked(),
                            runtimes={"microvm": {"pool_size": 0, "template": NAME}})
        client = await aiohttp_client(create_app(settings))
        resp = await client.post("/v1/sandboxes", json={"runtime": "microvm", "template": NAME}, headers=AUTH)
        assert f"unknown microvm template {NAME!r}" in (await resp.json())["error"]["message"]


# -- sandgate images ls / prune --------------------------------------------------------------------


def _copy(src: Path, dest: Path, *, link: bool) -> None:
    dest.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file():
            (os.link if link else shutil.copyfile)(item, dest / item.name)


@pytest.mark.microvm
def test_ls_and_prune_on_real_images(custom_image: BootImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A private cache holding the built image (hard links: current), a copy of its kernel and
    initrd under another recipe (a replaced image: unused), an image of a template no file
    declares any more, and a root disk no image uses."""
    cache = tmp_path / "cache"
    images = cache / "microvm" / "images"
    _copy(custom_image.dir, images / NAME / custom_image.dir.name, link=True)
    stale = images / NAME / ("0" * 24)
    _copy(custom_image.dir, stale, link=False)
    (stale / "rootfs.ext4").unlink()
    os.link(custom_image.dir / "rootfs.ext4", stale / "rootfs.ext4")  # shared: frees nothing
    gone_template = images / "retired" / ("1" * 24)
    gone_template.mkdir(parents=True)
    shutil.copyfile(custom_image.initrd, gone_template / "initrd.img")
    disk = cache / "microvm" / "rootfs" / ("2" * 24)
    disk.mkdir(parents=True)
    (disk / "rootfs.ext4").write_bytes(os.urandom(1 << 20))
    used_disk = cache / "microvm" / "rootfs" / ("3" * 24)
    used_disk.mkdir()
    os.link(custom_image.dir / "rootfs.ext4", used_disk / "rootfs.ext4")
    monkeypatch.setenv("SANDGATE_CACHE_DIR", str(cache))
    blocks = sum(p.stat().st_blocks * 512 for p in (*stale.iterdir(), *gone_template.iterdir(), disk / "rootfs.ext4")
                 if p.name != "rootfs.ext4" or p.parent == disk)

    assert cli.main(["images", "ls", "microvm", "--templates", str(USER_FILE)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["RUNTIME", "NAME", "STATE", "IMAGE", "SNAPSHOT", "TOTAL", "PATH"]
    by_path = {row[-1]: row for row in rows[1:]}
    assert by_path[str(images / NAME / custom_image.dir.name)][2] == "current"
    assert by_path[str(stale)][2] == by_path[str(gone_template)][2] == "unused"
    assert by_path[str(disk)][1:4] == ["root", "disk", "unused"] and str(used_disk) not in by_path
    current_row = by_path[str(images / NAME / custom_image.dir.name)]
    image_mb = sum(p.stat().st_blocks * 512 for p in custom_image.dir.iterdir() if p.is_file()) / (1 << 20)
    assert current_row[3:5] == [f"{image_mb:.1f}", "MB"]

    # Without the user's file its template is unknown, so its images are unused: ls says so
    assert cli.main(["images", "ls", "microvm"]) == 0
    states = {line.split()[2] for line in capsys.readouterr().out.splitlines() if line.split()[1] == NAME}
    assert states == {"unused"}

    assert cli.main(["images", "prune", "microvm", "--templates", str(USER_FILE)]) == 0
    out = capsys.readouterr().out
    assert f"removed {NAME} {stale}" in out and f"removed retired {gone_template}" in out
    assert f"removed root disk {disk}" in out
    assert f"microvm: freed {blocks / (1 << 20):.1f} MB" in out
    assert not stale.exists() and not gone_template.parent.exists() and not disk.exists()
    assert (images / NAME / custom_image.dir.name / "manifest.json").is_file() and used_disk.is_dir()
    assert cli.main(["images", "prune", "microvm", "--templates", str(USER_FILE)]) == 0
    assert capsys.readouterr().out == "microvm: freed 0.0 MB\n"


def test_a_build_keeps_one_previous_image_and_prune_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from plugins.microvm.images.cache import image_dir, recipe, stale_images

    monkeypatch.setenv("SANDGATE_CACHE_DIR", str(tmp_path))
    config = load_config()
    current = image_dir("default", recipe(config, "default"))
    older = [current.with_name(f"{n:024d}") for n in range(3)]
    for age, folder in enumerate([*older, current]):
        folder.mkdir(parents=True)
        os.utime(folder, (1000 + age, 1000 + age))
    assert stale_images(config, "default", keep_previous=1) == [older[1], older[0]]  # the newest other stays
    assert stale_images(config, "full", keep_previous=1) == []
    assert stale_images(config) == sorted(older, key=lambda p: p.stat().st_mtime, reverse=True)


def test_wasm_ls_and_prune_on_real_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The compiled JavaScript module (small) at its current name, and a copy of it under another
    wasmtime's name, which prune removes."""
    from plugins.wasm import artifacts

    try:
        module = artifacts.ensure_compiled("javascript", lambda *_: None)
    except artifacts.ArtifactsMissing as exc:
        pytest.skip(f"no WASM JavaScript module here: {exc}")
    cache = tmp_path / "cache"
    monkeypatch.setenv("SANDGATE_CACHE_DIR", str(cache))
    current = artifacts.compiled_module_path("javascript")
    shutil.copyfile(module, current)
    old = current.with_name(current.name.replace("-wasmtime", "-wasmtime0.0.1-old"))
    shutil.copyfile(module, old)
    size = old.stat().st_blocks * 512
    assert cli.main(["images", "ls", "wasm"]) == 0
    rows = {line.split()[-1]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[str(current)][1:4] == ["javascript", "module", "current"]
    assert rows[str(old)][1:4] == ["javascript", "module", "unused"]
    assert cli.main(["images", "prune", "wasm"]) == 0
    out = capsys.readouterr().out
    assert f"wasm: removed javascript module {old}" in out and f"wasm: freed {size / (1 << 20):.1f} MB" in out
    assert current.is_file() and not old.exists()


def test_a_bad_templates_file_stops_the_gateway_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = _write(tmp_path / "mine.toml", '[templates.x]\nbase = "full"\nmemory = 3\n')
    config = _write(tmp_path / "sandgate.toml", f'[runtimes.microvm]\ntemplates_file = "{mine}"\n')
    assert cli.main(["serve", "--config", str(config), "--port", "1"]) == 2  # (refused before it listens)
    err = capsys.readouterr().err
    assert str(config) in err and f"{mine}: unknown keys in [templates.x]: memory" in err
    assert cli.main(["images", "ls", "microvm", "--templates", str(tmp_path / "nope.toml")]) == 1
    assert f"{tmp_path / 'nope.toml'}: no such file" in capsys.readouterr().err
    assert cli.main(["images", "prune", "--templates", str(mine)]) == 2  # which runtime's templates?
    assert "--templates needs a runtime" in capsys.readouterr().err


def test_the_readme_example_loads(tmp_path: Path) -> None:
    import re

    readme = (Path(cli.__file__).parents[1] / "README.md").read_text()
    [block] = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if b.startswith("[templates.tools]")]
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    tools = load_config(user_file=_write(tmp_path / "my-templates.toml", block)).templates["tools"]
    assert tools.rootfs is not None and tools.rootfs.npm == ("lodash@4.17.21",)
    assert [f.path for f in tools.rootfs.files] == ["etc/motd", "opt/app/run.sh"]
