"""The pod runtime's connections to the API server, against the local test cluster: none is left
open when the code that opened it is done with it, however late the apiserver answers.

A TLS connection closed gracefully waits for the apiserver's close_notify, and nothing waits for
that wait: an event loop that ends first (a test's, a stopping gateway's) leaves the socket open,
and it is garbage-collected later, in whatever test runs then (ResourceWarning: unclosed transport).
A paused apiserver (`KubeCluster.apiserver_paused`) is one that answers late, every time.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest

from plugins.pod.kube import Kube
from plugins.pod.watcher import PodWatcher
from tests.kube.cluster import KubeCluster

pytestmark = pytest.mark.pod

DEADLINE = 60.0
LABEL = "sandgate-test/watched"


def open_sockets_to(port: int) -> int:
    """This process's open sockets whose peer is 127.0.0.1:`port` (from /proc, as the kernel sees them)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own fd)
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    peer = f"0100007F:{port:04X}"
    found = 0
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == peer and fields[9] in inodes:
            found += 1
    return found


async def test_a_watch_stopped_mid_stream_leaves_no_connection_open(kube_cluster: KubeCluster,
                                                                    kube_namespace: str) -> None:
    """PodRuntime.stop stops its PodWatcher, whose watch is mid-stream, and closes the Kube right
    after. Before the fix the watch's connection was left to a TLS close_notify exchange that the
    paused apiserver never finished, still open once everything had returned."""
    port = int(urlparse(kube_cluster.server).port or 443)
    kube = await Kube.connect(str(kube_cluster.kubeconfig), None, kube_namespace)
    watcher = PodWatcher(kube, LABEL)
    try:
        await watcher.start()
        # A pod made after the first list reaches the watcher only through its watch: it streams.
        # (Its node selector matches no node: it stays Pending, nothing runs.)
        kube_cluster.api("POST", f"/api/v1/namespaces/{kube_namespace}/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "watched", "labels": {LABEL: "yes"}},
            "spec": {"nodeSelector": {"sandgate-test/node": "none"},
                     "containers": [{"name": "c", "image": "sandgate-agent:test"}]}})
        await watcher.wait(lambda w: w.find("watched"), DEADLINE)
        with kube_cluster.apiserver_paused():
            await watcher.stop()
            await kube.close()
            assert open_sockets_to(port) == 0, "a connection to the apiserver outlived the Kube"
    finally:
        await watcher.stop()
        await kube.close()
