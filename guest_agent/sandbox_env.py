"""The sandbox's own environment (`guest.env`, sent by the gateway when it hands the sandbox out):
variables every exec gets (its secrets' placeholders: the real values never come here), and the
trust of the egress proxy's CA for the hosts those secrets are bound to.

The CA goes into a bundle with the guest's own roots (so every other host still verifies), and
the variables TLS clients read point at it: OpenSSL (Python's ssl, curl), requests, pip, git;
Node reads NODE_EXTRA_CA_CERTS, added to its own roots.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

#: Variables every process the agent starts gets, after the agent's inherited ones.
ENV: dict[str, str] = {}

#: Where distributions keep their CA bundle (Debian, Fedora, Alpine and macOS-style).
SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")
BUNDLE_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO")


def apply(message: Mapping[str, Any]) -> dict[str, Any]:
    """Set the variables of `set` for the agent and every exec from now; trust `ca_pem`."""
    variables = dict(message.get("set", {}))
    ca_pem = message.get("ca_pem")
    bundle = None
    if ca_pem:
        folder = tempfile.mkdtemp(prefix="sandgate-trust-")
        ca_file = os.path.join(folder, "sandbox-ca.pem")
        _write(ca_file, ca_pem)
        system = b""
        for path in SYSTEM_BUNDLES:
            try:
                with open(path, "rb") as f:
                    system = f.read()
                break
            except OSError:
                continue
        bundle = os.path.join(folder, "ca-bundle.pem")
        _write(bundle, system.rstrip(b"\n") + b"\n" + ca_pem if system else ca_pem)
        variables.update({name: bundle for name in BUNDLE_VARIABLES})
        variables["NODE_EXTRA_CA_CERTS"] = ca_file
    ENV.update(variables)
    os.environ.update(variables)  # code the agent runs in-process (Python execs) reads them here
    return {"ca_bundle": bundle}


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
