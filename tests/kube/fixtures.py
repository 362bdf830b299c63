"""pytest fixtures for the local test cluster (docs/kubernetes.md, "The local test cluster").

Registered for the whole of tests/ by `pytest_plugins = ["tests.kube.fixtures"]` in tests/conftest.py,
so tests/plugins/pod and tests/helm just ask for them:

    pytestmark = pytest.mark.pod

    def test_something(kube_cluster: KubeCluster, kube_namespace: str) -> None: ...

- `kube_cluster` (session): etcd, kube-apiserver and the test kubelet, its Node Ready. A
  `tests.kube.cluster.KubeCluster`: kubeconfig, server, admin_token, ca_file, kubectl, node_name,
  api(), kubectl_run(), create_namespace(), create_service_account(), service_account_token(),
  can_i(), wait_pod(), kubelet_log, apiserver_paused().
- `kube_namespace` (function): a fresh namespace with its `default` ServiceAccount; its pods are
  deleted at the end of the test (no namespace controller runs here to do it).
- `kube_binaries` (session): the built binaries (tests.kube.build.Binaries).

The binaries are built, when missing, once the tests are collected and before any runs (minutes
the first time; outside the per-test timeout). A host that cannot build them (no apt-get, not
root, a failed build step) skips these tests with the exact reason; a cluster that fails to start
is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
from collections.abc import Iterator

import pytest

from tests.kube.build import Binaries, BuildError, ensure_built, installed
from tests.kube.cluster import KubeCluster, running_cluster

_BUILD_ERROR = pytest.StashKey[str]()


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly or installed() is not None:
        return
    if not any("kube_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    from plugins.common import TerminalProgress

    # Progress lines straight to the terminal: a build of minutes must not look like a hang.
    capture = session.config.pluginmanager.getplugin("capturemanager")
    suspended = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
    with suspended:
        try:
            ensure_built(TerminalProgress())
        except BuildError as exc:
            session.config.stash[_BUILD_ERROR] = str(exc)


@pytest.fixture(scope="session")
def kube_binaries(request: pytest.FixtureRequest) -> Binaries:
    error = request.config.stash.get(_BUILD_ERROR, None)
    if error is None:
        try:
            return ensure_built()
        except BuildError as exc:
            error = str(exc)
    pytest.skip(f"the local Kubernetes (kube-apiserver from Debian's source) cannot be built here: {error}")


@pytest.fixture(scope="session")
def kube_cluster(kube_binaries: Binaries) -> Iterator[KubeCluster]:
    with running_cluster(kube_binaries) as cluster:
        yield cluster


@pytest.fixture
def kube_namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    namespace = kube_cluster.create_namespace()
    yield namespace
    # Grace 0: gone from the API at once; the test kubelet sees the deletion and kills the processes.
    try:
        kube_cluster.api("DELETE", f"/api/v1/namespaces/{namespace}/pods",
                         {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})
        kube_cluster.api("DELETE", f"/api/v1/namespaces/{namespace}")
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"cleaning up namespace {namespace}: {json.loads(exc.read())}") from exc
