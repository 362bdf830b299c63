"""Rich output on the microVM `datascience` template, through a real gateway: what a notebook-style
session costs under this machine's accelerator.

    .venv/bin/python bench/datascience.py [--n 3]

For each of N fresh datascience sandboxes (clones of the template's snapshot), one REST exec after
another: `import numpy`, `import pandas`, `import matplotlib.pyplot` (the font cache is built in
each sandbox, on its first import), then a line plot shown with plt.show() (one PNG display event),
a DataFrame's HTML as the last value, and the same plot again once everything is warm. Wall time of
each `POST /v1/sandboxes/{id}/exec`, the PNG's size, and the agent's max RSS at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from typing import Any

import aiohttp
from _common import AUTH, banner, fmt_stats, inprocess_gateway, settings_dict, stats_ms, wait_quiet, write_results

from plugins.microvm.images.templates import load_templates

STEPS = {
    "import numpy": "import numpy",
    "import pandas": "import pandas as pd",
    "import matplotlib.pyplot": "import matplotlib.pyplot as plt",
    "plot + plt.show() (first)": "plt.plot([1, 3, 2, 5, 4])\nplt.title('bench')\nplt.show()",
    "DataFrame as html": "pd.DataFrame({'x': range(20), 'y': [i * i for i in range(20)]})",
    "plot + plt.show() (warm)": "plt.plot([1, 3, 2, 5, 4])\nplt.title('bench')\nplt.show()",
}
RSS = "import resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


async def measure(url: str, n: int, memory_mb: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {step: [] for step in STEPS}
    png_bytes, rss_kb = [], []
    body = {"runtime": "microvm", "template": "datascience", "memory_mb": memory_mb}
    async with aiohttp.ClientSession(url, headers=AUTH) as http:
        for _ in range(n):
            async with http.post("/v1/sandboxes", json=body) as resp:
                assert resp.status == 201, await resp.text()
                sid = (await resp.json())["id"]
            wait_quiet(threshold_cores=0.5, max_wait_s=60)
            for step, code in STEPS.items():
                start = time.perf_counter()
                async with http.post(f"/v1/sandboxes/{sid}/exec", json={"code": code, "timeout": 300}) as resp:
                    done = await resp.json()
                samples[step].append(time.perf_counter() - start)
                assert done["exit_code"] == 0, done
                if step.startswith("plot"):
                    png_bytes.append(len(base64.b64decode(done["display"][0]["image/png"])))
            async with http.post(f"/v1/sandboxes/{sid}/exec", json={"code": RSS}) as resp:
                rss_kb.append(int((await resp.json())["stdout"]))
            await http.delete(f"/v1/sandboxes/{sid}")
    results: dict[str, Any] = {step: stats_ms(values) for step, values in samples.items()}
    for step in STEPS:
        print(fmt_stats(step, results[step]), flush=True)
    results["png_bytes"] = sorted(set(png_bytes))
    results["agent_max_rss_mb"] = round(max(rss_kb) / 1024, 1)
    print(f"PNG of the 6.4x4.8 in figure at 100 dpi: {results['png_bytes']} bytes; "
          f"agent max RSS {results['agent_max_rss_mb']} MB")
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--memory-mb", type=int, default=load_templates()["datascience"].memory_mb)
    args = parser.parse_args()
    banner("rich output: microVM datascience template")
    settings = settings_dict(0, runtimes={"microvm": {"pool_size": 1, "template": "datascience"}}, blocked=("pod",))
    async with inprocess_gateway(settings) as (_, url):
        results = await measure(url, args.n, args.memory_mb)
    write_results("datascience", results)


if __name__ == "__main__":
    asyncio.run(main())
