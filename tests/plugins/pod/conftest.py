"""Fixtures for the pod runtime's tests: its `[runtimes.pod]` settings for the local test cluster."""

from __future__ import annotations

from typing import Any

import pytest

from tests.kube.cluster import KubeCluster


@pytest.fixture
def pod_config(kube_cluster: KubeCluster, kube_namespace: str) -> dict[str, Any]:
    """Settings aimed at this test's namespace; the default agent image name carries
    `sandgate-agent`, which the test kubelet answers with the repo's agent at /opt/sandgate. The
    egress listener is on loopback, where the test kubelet's pods (sharing the host's network)
    reach it."""
    return {"kubeconfig": str(kube_cluster.kubeconfig), "namespace": kube_namespace, "ready_timeout_s": 60.0,
            "egress_listen": "127.0.0.1:0",
            "templates": {"plain-python": "docker.io/library/python:3.11-slim",
                          "missing": "registry.invalid/sandgate/does-not-exist:1"}}
