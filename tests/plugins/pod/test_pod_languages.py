"""Languages on pods of the local test cluster: `[runtimes.pod] languages` picks a create's image
by the language its `template` names, and the language suite (gateway/testing/languages.py) runs
in it through the gateway.

The test kubelet runs every image as the host's /usr (tests/kube/kubelet.py), so whatever the map
names, a pod offers the languages whose programs this host has in /usr: what these tests prove is
that the map picks the image and that the pod's agent offers and runs what its image holds.
"""

from __future__ import annotations

import shutil
from typing import Any, ClassVar

import pytest

from gateway.testing.conformance import AUTH, Gateway
from gateway.testing.languages import SAMPLES, LanguageConformance
from guest_agent import languages
from plugins.pod import manifests as m
from tests.kube.cluster import KubeCluster
from tests.kube.kubelet import DEFAULT_PATH
from tests.plugins.pod.test_pod_lifecycle import pods

pytestmark = pytest.mark.pod

#: The images a deployment would map (the test kubelet pulls none of them).
IMAGES = {
    "python": "docker.io/library/python:3.12-slim",
    "javascript": "docker.io/library/node:22-bookworm",
    "c": "docker.io/library/gcc:14",
    "cpp": "docker.io/library/gcc:14",
    "java": "docker.io/library/eclipse-temurin:21-jdk",
    "go": "docker.io/library/golang:1.22-bookworm",
}
#: What the host's /usr offers: each pod's "image" here (the kubelet's PATH).
IN_HOST_USR = frozenset(languages.offered_by_programs(lambda p: shutil.which(p, path=DEFAULT_PATH)))


class TestPodLanguages(LanguageConformance):
    runtime = "pod"
    create_options: ClassVar[dict[str, Any]] = {"template": "c"}
    languages = IN_HOST_USR

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = {**pod_config, "languages": IMAGES}  # per test: each has its own namespace

    async def test_the_map_picks_the_image(self, gateway: Gateway, kube_cluster: KubeCluster,
                                           kube_namespace: str) -> None:
        for template, language in (("js", "javascript"), ("c++", "cpp"), ("python", "python")):
            if language not in self.languages:
                continue
            sandbox = await gateway.create(template=template)
            [pod] = pods(kube_cluster, kube_namespace, f"{m.SANDBOX_ID}={m.label_value(sandbox['id'])}")
            assert [c["image"] for c in pod["spec"]["containers"]] == [IMAGES[language]]
            assert f"exec.{language}" in sandbox["capabilities"]
            done = await gateway.exec(sandbox["id"], language=language, code=SAMPLES[language].hello)
            assert done["stdout"] == f"hello from {language}\n", done
            await gateway.client.delete(f"/v1/sandboxes/{sandbox['id']}", headers=AUTH)
        resp = await gateway.client.post("/v1/sandboxes", json={"runtime": "pod", "template": "ruby"}, headers=AUTH)
        assert resp.status == 400 and "languages" in (await resp.json())["error"]["message"]
        runtimes = (await (await gateway.client.get("/v1/runtimes", headers=AUTH)).json())["runtimes"]
        [pod_runtime] = [r for r in runtimes if r["id"] == "pod"]
        assert pod_runtime["languages"] == {lang: sorted({"python", lang}) for lang in IMAGES}
