"""The pod runtime's pure parts, without a cluster: resynchronising a re-attached stream, reading pod
status, the objects it writes, and its settings."""

from __future__ import annotations

import datetime
import struct

import pytest

from gateway.runtime.base import SandboxSpec
from guest_agent.wire import FrameDecoder, encode_frame
from plugins.pod import manifests as m
from plugins.pod.channel import Resync
from plugins.pod.settings import PodSettings
from plugins.pod.watcher import is_running, problem, summary

FRAMES = encode_frame({"id": 3, "ev": "data", "seq": 4, "fd": "stdout", "data": b"\x00\x01 hello"}) + encode_frame(
    {"id": 0, "result": {}})


def decoded(data: bytes) -> list[dict[str, object]]:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    return list(decoder.messages_received())


@pytest.mark.parametrize("cut", [0, 1, 5, 9, 17])
def test_resync_skips_the_cut_frame_one_byte_at_a_time(cut: int) -> None:
    first = encode_frame({"id": 1, "ev": "data", "seq": 0, "fd": "stdout", "data": b"x" * 40})
    stream = first[cut:] + FRAMES if cut else FRAMES
    resync = Resync()
    out = b"".join(resync.feed(bytes([b])) for b in stream)
    assert resync.done
    assert decoded(out) == decoded(FRAMES)


def test_resync_passes_a_clean_stream_and_everything_after() -> None:
    resync = Resync()
    assert resync.feed(FRAMES) == FRAMES and resync.done and resync.skipped == 0
    assert resync.feed(b"later") == b"later"


def test_resync_gives_up_on_a_stream_without_frames() -> None:
    resync = Resync()
    with pytest.raises(ConnectionError):
        for _ in range(40):
            resync.feed(b"\xff" * 65536)  # no plausible length header anywhere


def test_resync_refuses_a_header_whose_body_is_not_a_message() -> None:
    resync = Resync()
    fake = struct.pack(">I", 3) + b"abc"  # a plausible length, then not msgpack
    assert resync.feed(fake) == b"" and not resync.done
    assert decoded(resync.feed(FRAMES)) == decoded(FRAMES)


def pod(**status: object) -> dict[str, object]:
    return {"metadata": {"name": "p"}, "status": status}


def test_pod_status_reading() -> None:
    running = pod(phase="Running", containerStatuses=[{"name": m.AGENT_CONTAINER, "state": {"running": {}}}])
    assert is_running(running) and problem(running) is None
    pulling = pod(phase="Pending", containerStatuses=[{"name": m.AGENT_CONTAINER, "state": {
        "waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}])
    assert problem(pulling) == "ImagePullBackOff: Back-off pulling image"
    unschedulable = pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "False",
                                                       "reason": "Unschedulable", "message": "0/3 nodes"}])
    assert problem(unschedulable) == "unschedulable: 0/3 nodes"
    assert problem(unschedulable, fail_unschedulable=False) is None
    init_failed = pod(phase="Pending", initContainerStatuses=[{"name": "install-agent", "state": {
        "terminated": {"exitCode": 1, "reason": "Error"}}}])
    assert "init container install-agent failed" in str(problem(init_failed))
    ended = pod(phase="Failed", containerStatuses=[{"name": m.AGENT_CONTAINER, "state": {
        "terminated": {"exitCode": 137, "reason": "OOMKilled"}}}])
    assert problem(ended) == "the sandbox container terminated (OOMKilled, exit code 137)"
    assert summary(pulling) == "phase Pending, sandbox waiting (ImagePullBackOff)"


def test_labels_hold_any_id() -> None:
    assert m.label_value("sb_AbC-12") == "sb_AbC-12"
    hashed = m.label_value("sb_ends-with-")
    assert hashed.startswith("h-") and len(hashed) == 42 and hashed == m.label_value("sb_ends-with-")
    assert m.label_value("x" * 64).startswith("h-")


def test_the_pod_is_hardened() -> None:
    settings = PodSettings.from_config({"namespace": "ns", "runtime_class_name": "gvisor"})
    spec = SandboxSpec(sandbox_id="sb_1", tenant="t", memory_mb=300, cpu_seconds=1, disk_mb=200)
    pod = m.pod_manifest(settings, "sandgate-1", spec, datetime.datetime.now(datetime.UTC),
                         image="python:3.12-slim", memory_mb=300, disk_mb=200)
    podspec = pod["spec"]
    assert podspec["automountServiceAccountToken"] is False and podspec["runtimeClassName"] == "gvisor"
    assert podspec["dnsPolicy"] == "None" and podspec["dnsConfig"]["nameservers"] == ["127.0.0.1"], \
        "the pod resolves nothing (the proxy does): no cluster DNS to wait for"
    assert podspec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [main] = podspec["containers"]
    assert main["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                       "privileged": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True}
    assert not any(e["name"] == "PYTHONPATH" for e in main["env"]), "nothing leaks into user processes"
    assert [c["name"] for c in podspec["initContainers"]] == ["install-agent"]
    own = m.pod_spec(settings, image=settings.agent_image, memory_mb=256, disk_mb=512)
    assert "initContainers" not in own, "the agent image carries the agent"
    assert pod["metadata"]["labels"][m.NETWORK] == "false" and m.NETWORK_POLICY not in pod["metadata"]["annotations"]


def test_network_sandboxes_reach_the_gateway_pods_egress_port_and_nothing_else() -> None:
    settings = PodSettings.from_config({"namespace": "sandboxes", "egress_listen": "0.0.0.0:3128",
                                        "egress_proxy": "10.1.2.3", "egress_gateway_labels": {"app": "gw"}})
    same = m.egress_policy(settings, 3128, "sandboxes")["spec"]
    assert same["podSelector"]["matchLabels"] == {m.MANAGED_BY: "sandgate", m.COMPONENT: "sandbox", m.NETWORK: "true"}
    assert same["policyTypes"] == ["Egress"], "ingress stays denied (deny_policy)"
    assert same["egress"] == [{"to": [{"podSelector": {"matchLabels": {"app": "gw"}}}],
                               "ports": [{"protocol": "TCP", "port": 3128}]}], "no DNS, no CIDRs: the gateway only"
    other = m.egress_policy(settings, 3128, "sandgate")["spec"]["egress"][0]["to"][0]
    assert other["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "sandgate"}}
    deny = m.deny_policy("sandboxes")["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "egress" not in deny and "ingress" not in deny


@pytest.mark.parametrize("bad", [{"mode": "vm"}, {"channel": "ssh"}, {"namespace": "Bad_NS"}, {"cpu_limit": "lots"},
                                 {"run_as_user": 0}, {"unknown": 1}, {"pool_size": 1, "mode": "agent-sandbox"},
                                 {"languages": {"cobol": "cobol:1"}}, {"languages": {"go": ""}},
                                 {"languages": {"go": 1}}, {"languages": ["go"]}])
def test_settings_refuse_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PodSettings.from_config({"namespace": "ns", **bad})


def test_a_template_names_a_template_then_a_language() -> None:
    settings = PodSettings.from_config({"namespace": "ns", "templates": {"go": "my/go-with-tools:1"},
                                        "languages": {"golang": "golang:1.22", "js": "node:22", "c++": "gcc:14"}})
    assert dict(settings.languages) == {"go": "golang:1.22", "javascript": "node:22", "cpp": "gcc:14"}
    assert m.image_for(settings, None) == settings.agent_image
    assert m.image_for(settings, "go") == "my/go-with-tools:1", "an operator's template wins"
    assert [m.image_for(settings, name) for name in ("node", "JavaScript", "cxx")] == ["node:22", "node:22", "gcc:14"]
    with pytest.raises(KeyError):
        m.image_for(settings, "ruby")
