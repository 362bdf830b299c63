from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gateway.config import load_settings, parse_api_keys
from tests.serving import serve


def test_api_keys_from_env_win_over_file(tmp_path: Path) -> None:
    config = tmp_path / "sandgate.toml"
    config.write_text('port = 9000\napi_keys = "filekey:t0"\n[limits]\nttl_s = 60\n[quotas]\nmax_sandboxes = 3\n')
    settings = load_settings(config, env={"SANDGATE_API_KEYS": "k1:alpha, k2:beta"})
    assert settings.api_keys == {"k1": "alpha", "k2": "beta"}
    assert settings.port == 9000 and settings.limits.ttl_s == 60 and settings.quotas.max_sandboxes == 3
    assert load_settings(config, env={}).api_keys == {"filekey": "t0"}


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key:tenant"):
        parse_api_keys("justakey")
    config = tmp_path / "bad.toml"
    config.write_text("[limits]\nttl = 5\n")
    with pytest.raises(ValueError, match="unknown settings"):
        load_settings(config, env={})


def test_no_keys_means_loopback_and_a_generated_key() -> None:
    settings = load_settings(env={}).with_generated_key_if_needed()
    assert settings.generated_key and settings.api_keys == {settings.generated_key: "default"}
    with pytest.raises(SystemExit, match="without API keys"):
        load_settings(env={}, host="0.0.0.0").with_generated_key_if_needed()


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
