"""Settings: read from the file, the environment and the flags, every value checked once; a bad one
stops `sandgate serve` with one line and status 2, and a default start logs no error."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, Limits, Settings, load_settings, parse_api_keys
from plugins.pod.settings import PodSettings
from tests.serving import free_port, serve

#: The installed entry point, as users run it.
SANDGATE = Path(sys.executable).with_name("sandgate")


def test_api_keys_from_env_win_over_file(tmp_path: Path) -> None:
    config = tmp_path / "sandgate.toml"
    config.write_text('port = 9000\napi_keys = "filekey:t0"\n[limits]\nttl_s = 60\n[quotas]\nmax_sandboxes = 3\n')
    settings = load_settings(config, env={"SANDGATE_API_KEYS": "k1:alpha, k2:beta"})
    assert settings.api_keys == {"k1": "alpha", "k2": "beta"}
    assert settings.port == 9000 and settings.limits.ttl_s == 60 and settings.quotas.max_sandboxes == 3
    assert load_settings(config, env={}).api_keys == {"filekey": "t0"}


def test_values_are_normalised_to_their_types(tmp_path: Path) -> None:
    config = tmp_path / "sandgate.toml"
    config.write_text('allowed_origins = ["https://ide.example.com", "http://localhost:3000"]\nkeepalive_s = 5\n'
                      '[api_keys]\nk1 = "alpha"\n[limits]\nttl_s = 60\n[plugins]\nblocked = ["microvm"]\n'
                      '[runtimes.wasm]\npool_size = 1\n')
    settings = load_settings(config, env={"SANDGATE_BLOCKED_PLUGINS": ""}, port=9001)
    assert settings.allowed_origins == ("https://ide.example.com", "http://localhost:3000")
    assert settings.blocked_plugins == ("microvm",) and settings.api_keys == {"k1": "alpha"}
    assert type(settings.keepalive_s) is float and type(settings.limits.ttl_s) is float
    assert settings.port == 9001 and settings.runtimes == {"wasm": {"pool_size": 1}}


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key:tenant"):
        parse_api_keys("justakey")
    config = tmp_path / "bad.toml"
    config.write_text("[limits]\nttl = 5\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown setting 'ttl' \(did you mean 'ttl_s'\?\) in \[limits\]"):
        load_settings(config, env={})
    # Programs building settings get the same checks as the file.
    with pytest.raises(ConfigError, match=r"\[limits\] ttl_s = 7200 is above max_ttl_s = 3600"):
        Limits(ttl_s=7200, max_ttl_s=3600)
    with pytest.raises(ConfigError, match="port must be from 1 to 65535"):
        Settings(port=0)
    with pytest.raises(ConfigError, match=r"--port: port must be from 1 to 65535, not 65536"):
        load_settings(env={}, port=65536)


def test_pod_settings_are_typed_like_the_gateways() -> None:
    with pytest.raises(ConfigError, match=r"\[runtimes.pod\] pool_size must be an integer, not '2'"):
        PodSettings.from_config({"namespace": "ns", "pool_size": "2"})
    with pytest.raises(ConfigError, match=r"\[runtimes.pod\] egress_gateway_labels must be a table of strings"):
        PodSettings.from_config({"namespace": "ns", "egress_gateway_labels": "app=gateway"})
    with pytest.raises(ConfigError, match=r"unknown setting 'pool_sise' \(did you mean 'pool_size'\?\)"):
        PodSettings.from_config({"namespace": "ns", "pool_sise": 1})
    settings = PodSettings.from_config({"namespace": "ns", "cpu_limit": 2, "tolerations": [{"key": "k"}]})
    assert settings.cpu_limit == "2" and settings.tolerations == ({"key": "k"},)


def test_no_keys_means_loopback_and_a_generated_key() -> None:
    settings = load_settings(env={}).with_generated_key_if_needed()
    assert settings.generated_key and settings.api_keys == {settings.generated_key: "default"}
    with pytest.raises(ConfigError, match="without API keys"):
        load_settings(env={}, host="0.0.0.0").with_generated_key_if_needed()


# -- `sandgate serve` with a bad setting -------------------------------------------------------------

#: id -> (file contents, or None for no such file; extra environment; what the one line must say).
#: {config} in the expectation stands for the file's path.
BAD = {
    "missing file": (None, {}, "{config}: no such file"),
    "not TOML": ("port = = 1\n", {}, "{config}: not valid TOML: "),
    "unknown key": ("portt = 9000\n", {}, "{config}: unknown setting 'portt' (did you mean 'port'?)"),
    "unknown limit": ("[limits]\nttl = 5\n", {}, "{config}: unknown setting 'ttl' (did you mean 'ttl_s'?) in [limits]"),
    "unknown plugins key": ("[plugins]\nblock = ['wasm']\n", {}, "{config}: unknown setting 'block'"),
    "key without tenant (env)": ("", {"SANDGATE_API_KEYS": "nocolon"}, "SANDGATE_API_KEYS: entry 'nocolo'... is "
                                                                      "not key:tenant"),
    "key given twice (env)": ("", {"SANDGATE_API_KEYS": "k1:a,k1:b"}, "SANDGATE_API_KEYS: the key 'k1'... is given "
                                                                      "twice"),
    "key without tenant (file)": ('api_keys = "nocolon"\n', {}, "{config}: api_keys: entry 'nocolo'..."),
    "empty tenant": ('[api_keys]\nk1 = ""\n', {}, "{config}: api_keys: the tenant of key 'k1'... must be a "
                                                  "non-empty string"),
    "negative memory": ("[limits]\nmemory_mb = -5\n", {}, "{config}: [limits] memory_mb must be > 0, not -5"),
    "memory not an integer": ("[limits]\nmemory_mb = 256.5\n", {}, "{config}: [limits] memory_mb must be an "
                                                                   "integer, not 256.5"),
    "default above max": ("[limits]\nmemory_mb = 8192\n", {}, "{config}: [limits] memory_mb = 8192 is above "
                                                              "max_memory_mb = 4096"),
    "ttl as text": ('[limits]\nttl_s = "1h"\n', {}, "{config}: [limits] ttl_s must be a finite number, not '1h'"),
    "negative grace": ("[limits]\nexec_grace_s = -1\n", {}, "{config}: [limits] exec_grace_s "
                                                                                 "must be >= 0, not -1.0"),
    "quota zero": ("[quotas]\nmax_sandboxes = 0\n", {}, "{config}: [quotas] max_sandboxes must be > 0, not 0"),
    "port too big": ("port = 70000\n", {}, "{config}: port must be from 1 to 65535, not 70000"),
    "port as text": ('port = "8080"\n', {}, "{config}: port must be an integer, not '8080'"),
    "keepalive nan": ("keepalive_s = nan\n", {}, "{config}: keepalive_s must be a finite number, not nan"),
    "origins as a string": ('allowed_origins = "https://a.example"\n', {}, "{config}: allowed_origins must be a "
                                                                           "list of strings"),
    "origin with a path": ('allowed_origins = ["https://a.example/"]\n', {}, "{config}: allowed_origins[0] must be "
                                                                             "an origin like"),
    "origin with a path (env)": ("", {"SANDGATE_ALLOWED_ORIGINS": "https://a.example/ide"},
                                 "SANDGATE_ALLOWED_ORIGINS: allowed_origins[0] must be an origin like"),
    "limits not a table": ("limits = 3\n", {}, "{config}: [limits] must be a table, not 3"),
    "runtime not a table": ("[runtimes]\nwasm = 5\n", {}, "{config}: [runtimes.wasm] must be a table, not 5"),
    "runtime not installed": ("[runtimes.wasmm]\npool_size = 1\n", {}, "{config}: [runtimes.wasmm]: no such runtime "
                                                                       "is installed (did you mean [runtimes.wasm]?)"),
    "runtime refuses its table": ('[runtimes.microvm]\naccel = "fast"\n', {"SANDGATE_BLOCKED_PLUGINS": "wasm"},
                                  "{config}: [runtimes.microvm] accel must be auto, kvm or tcg, not 'fast'"),
    "open host without keys": ('host = "0.0.0.0"\n', {}, "refusing to serve on 0.0.0.0 without API keys"),
}


def _serve_refused(tmp_path: Path, args: list[str], env: dict[str, str]) -> str:
    """Run `sandgate serve` (which must refuse to start); its one line on stderr."""
    # Runtimes blocked, so a gateway that wrongly starts is up at once (and the deadline ends it).
    base = {k: v for k, v in os.environ.items() if not k.startswith("SANDGATE_")}
    proc = subprocess.run([str(SANDGATE), "serve", "--port", str(free_port()), *args], cwd=tmp_path,
                          env={**base, "SANDGATE_BLOCKED_PLUGINS": "wasm,microvm", **env},
                          capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 2, output
    assert proc.stdout == "", "nothing starts, no key is printed"
    return proc.stderr


@pytest.mark.parametrize("case", BAD)
def test_serve_refuses_a_bad_setting_in_one_line(tmp_path: Path, case: str) -> None:
    text, env, expected = BAD[case]
    config = tmp_path / "sandgate.toml"
    if text is not None:
        config.write_text(text)
    stderr = _serve_refused(tmp_path, ["--config", str(config)], env)
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    assert stderr.startswith("sandgate serve: "), stderr
    assert expected.format(config=config) in stderr, stderr


def test_serve_refuses_a_bad_port_flag(tmp_path: Path) -> None:
    stderr = _serve_refused(tmp_path, ["--port", "0"], {})  # the last --port wins
    assert stderr == "sandgate serve: --port: port must be from 1 to 65535, not 0\n"


def test_serve_refuses_a_port_it_cannot_listen_on(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stderr = _serve_refused(tmp_path, ["--port", str(port)], {})
    # The runtimes start (and log) before aiohttp binds; the refusal is the last line, and no error.
    *logged, last = stderr.splitlines()
    assert last == f"sandgate serve: cannot listen on 127.0.0.1 port {port}: Address already in use", stderr
    assert not [line for line in logged if " ERROR " in line], stderr


# -- the default start ---------------------------------------------------------------------------------


@pytest.mark.wasm
@pytest.mark.usefixtures("wasm_compiled")
def test_default_start_logs_no_error_and_lists_pod_as_off(tmp_path: Path) -> None:
    """No config file: the pod runtime, which needs one, is off and says why, at INFO. (The microVM
    runtime stays blocked as in every serve() test: its pool would boot VMs for nothing.)"""
    key = "config-test-key"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDGATE_")}
    env.update(SANDGATE_API_KEYS=f"{key}:tenant", SANDGATE_STATE_DIR=str(tmp_path / "state"))
    with serve(env) as gateway:
        listed = gateway.call(key, "GET", "/v1/runtimes")
        output = gateway.banner + gateway.stop()
    assert "wasm" in [r["id"] for r in listed["runtimes"]]
    assert "pod" in listed["unavailable"] and "not configured" in listed["unavailable"]["pod"], listed
    assert not re.search(r"\b(ERROR|CRITICAL)\b", output), output
    assert re.search(r" INFO gateway\.sessions\.manager: runtime pod is off: not configured", output), output


async def test_microvm_on_a_host_never_set_up_is_off_without_an_error(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No [runtimes.microvm] table and no images built (an empty cache): off, said at INFO."""
    from gateway.web.app import MANAGER, create_app

    monkeypatch.setenv("SANDGATE_CACHE_DIR", str(tmp_path / "empty-cache"))
    settings = Settings(api_keys={"k": "t"}, blocked_plugins=("wasm", "pod"), default_runtime="microvm")
    client = await aiohttp_client(create_app(settings))
    unavailable = client.app[MANAGER].unavailable
    assert "microvm" in unavailable and "images build microvm" in unavailable["microvm"], unavailable
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
