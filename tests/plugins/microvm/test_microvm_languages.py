"""Languages in real microVMs through the gateway: every language of the table on the `polyglot`
template (the language suite, gateway/testing/languages.py), and `default` and `full` offering
exactly what their programs allow."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from gateway.testing.conformance import AUTH, Gateway, GatewayFixtures
from gateway.testing.functions import FunctionsConformance
from gateway.testing.languages import SAMPLES, LanguageConformance, offered
from guest_agent import languages

if TYPE_CHECKING:
    from plugins.microvm.images.cache import BootImage

pytestmark = pytest.mark.microvm


@pytest.mark.usefixtures("microvm_polyglot_image")
class TestPolyglotTemplate(LanguageConformance):
    runtime = "microvm"
    languages = frozenset(languages.BY_ID)

    @pytest.fixture(autouse=True)
    def _the_template_and_its_memory(self, microvm_polyglot_image: BootImage) -> None:
        # The template's own memory size: the snapshot's, so creates are clones of the warm pool.
        self.runtime_config = {"pool_size": 1, "template": "polyglot"}
        self.create_options = {"template": "polyglot", "memory_mb": microvm_polyglot_image.memory_mb}


@pytest.mark.usefixtures("microvm_full_image")
class TestSmallerTemplates(GatewayFixtures):
    runtime = "microvm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 0}

    async def test_default_offers_python_alone(self, gateway: Gateway) -> None:
        sandbox = await gateway.create()
        assert offered(sandbox["capabilities"]) == {"python"}

    async def test_full_offers_what_its_disk_holds(self, gateway: Gateway) -> None:
        # python3, nodejs and gcc (no g++, go, JDK, ruby, php or rustc)
        sandbox = await gateway.create(template="full")
        assert offered(sandbox["capabilities"]) == {"python", "javascript", "c"}
        for language in ("javascript", "c"):
            done = await gateway.exec(sandbox["id"], language=language, code=SAMPLES[language].echo,
                                      stdin="full\n", timeout=100)
            assert done["stdout"] == "got:full\n", done
        resp = await gateway.client.post(f"/v1/sandboxes/{sandbox['id']}/exec", json={"language": "go", "code": ""},
                                         headers=AUTH)
        assert resp.status == 501 and (await resp.json())["error"]["code"] == "unsupported"

    @pytest.mark.usefixtures("microvm_polyglot_image")
    async def test_runtimes_list_what_each_templates_agent_offered(self, gateway: Gateway) -> None:
        runtimes = (await (await gateway.client.get("/v1/runtimes", headers=AUTH)).json())["runtimes"]
        [microvm] = [r for r in runtimes if r["id"] == "microvm"]
        assert microvm["languages"]["default"] == ["python"]
        assert microvm["languages"]["full"] == ["c", "javascript", "python"]
        assert microvm["languages"]["polyglot"] == sorted(languages.BY_ID)


@pytest.mark.usefixtures("microvm_polyglot_image")
class TestPolyglotInvoke(GatewayFixtures):
    """Invoke and test mode in the languages the polyglot template adds, with the serverless
    suite's own tests: JavaScript under Node (harness.js runs under Node and QuickJS alike), Ruby
    and PHP under Debian's interpreters (the harnesses WASM runs too)."""

    runtime = "microvm"
    functions = FunctionsConformance.functions
    invoke = FunctionsConformance.invoke
    test_javascript_invoke = FunctionsConformance.test_javascript_invoke
    test_javascript_tests = FunctionsConformance.test_javascript_tests
    test_ruby_and_php_invoke = FunctionsConformance.test_ruby_and_php_invoke

    @pytest.fixture(autouse=True)
    def _the_template_and_its_memory(self, microvm_polyglot_image: BootImage) -> None:
        self.runtime_config = {"pool_size": 1, "template": "polyglot"}
        self.create_options = {"template": "polyglot", "memory_mb": microvm_polyglot_image.memory_mb}
