"""Rich output in real microVMs: the display suite (gateway/testing/display.py) on the `default`
template, where each Python exec runs on a thread of the agent and its display events go through
the agent's output thread; and matplotlib and pandas on the `datascience` template."""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from gateway.testing.conformance import AUTH as AUTH_HEADERS
from gateway.testing.conformance import Gateway, GatewayFixtures
from gateway.testing.display import DisplayConformance, exec_display

if TYPE_CHECKING:
    from plugins.microvm.images.cache import BootImage

pytestmark = pytest.mark.microvm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(bundle: dict[str, Any]) -> tuple[int, int]:
    """The width and height of a bundle's PNG (its IHDR chunk), after checking its signature."""
    png = base64.b64decode(bundle["image/png"], validate=True)
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR", png[:16]
    width, height = struct.unpack(">II", png[16:24])
    return width, height


@pytest.mark.usefixtures("microvm_image")
class TestMicrovmDisplay(DisplayConformance):
    runtime = "microvm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}


@pytest.mark.usefixtures("microvm_datascience_image")
class TestDatascienceTemplate(GatewayFixtures):
    runtime = "microvm"

    @pytest.fixture(autouse=True)
    def _the_template_and_its_memory(self, microvm_datascience_image: BootImage) -> None:
        self.runtime_config = {"pool_size": 1, "template": "datascience"}
        self.create_options = {"template": "datascience", "memory_mb": microvm_datascience_image.memory_mb}

    async def test_matplotlib_figures_come_back_as_png(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        done = await exec_display(gateway, sid, "import matplotlib.pyplot as plt\n"
                                                "plt.plot([1, 3, 2])\nplt.title('first')\nprint('one')\nplt.show()\n"
                                                "plt.figure(figsize=(3, 2))\nplt.bar(['a', 'b'], [2, 5])\n"
                                                "print('two')\n", timeout=300)  # TCG: ~20 s to import
        # (stderr may say that matplotlib builds its font cache: each sandbox does, on first import)
        assert done["stdout"] == "one\ntwo\n" and "Error" not in done["stderr"], done
        shown, left_open = done["display"]
        assert shown["text/plain"].startswith("<Figure size 640x480 with 1 Axes>")
        assert png_size(shown) == (640, 480), "the 6.4x4.8 in figure at 100 dpi"
        assert png_size(left_open) == (300, 200), "the open 3x2 in one, at the end"
        assert len(base64.b64decode(shown["image/png"])) > 5000, "a real chart, not an empty canvas"
        again = await exec_display(gateway, sid, "fig, ax = plt.subplots()\nax.plot([0, 1])\nfig")
        assert len(again["display"]) == 1, "a figure displayed as the last value is not shown twice"
        png_size(again["display"][0])
        assert (await exec_display(gateway, sid, "plt.get_fignums()"))["stdout"] == "[]\n", "shown figures close"
        listed = await exec_display(gateway, sid, "import os\nsorted(os.listdir('/work'))")
        assert listed["stdout"] == "[]\n", "matplotlib keeps its font cache out of the user's files"

    async def test_pandas_dataframe_is_html(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await exec_display(gateway, sandbox["id"], "import pandas as pd\nimport numpy as np\n"
                                                          "pd.DataFrame({'x': np.arange(3), 'y': ['a', 'b', 'c']})",
                                 timeout=300)
        [bundle] = done["display"]
        assert "<table" in bundle["text/html"] and "<td>b</td>" in bundle["text/html"], bundle
        assert bundle["text/plain"].split() == ["x", "y", "0", "0", "a", "1", "1", "b", "2", "2", "c"]
        assert done["stdout"] == ""

    async def test_processes_keep_matplotlibs_own_backend(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        """The agent's backend is its interpreter's alone: a python3 process the sandbox starts
        draws with Agg, as anywhere headless."""
        resp = await gateway.client.post(f"/v1/sandboxes/{sandbox['id']}/exec", headers=AUTH_HEADERS,
                                         json={"command": ["python3", "-c", "import matplotlib.pyplot as plt\n"
                                                                            "print(plt.get_backend())"]})
        done = await resp.json()
        assert (done["exit_code"], done["stdout"]) == (0, "agg\n"), done
