"""helm/Dockerfile.agent's pytest stage, run as the Dockerfile runs it (there is no Docker here): the
files it copies and nothing else of the checkout, `python -m plugins.pytest_files` with pytest's
install on PYTHONPATH, then pytest from the staged folder alone, without site-packages."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "helm" / "Dockerfile.agent"


def test_the_pytest_stage_stages_a_pytest_that_runs_alone(tmp_path: Path) -> None:
    text = DOCKERFILE.read_text()
    copied = re.search(r"^COPY (plugins/\S+(?: plugins/\S+)*) /src/plugins/$", text, re.M)
    assert copied, "the pytest stage copies plugins/ files into /src/plugins/"
    src = tmp_path / "src"
    (src / "plugins").mkdir(parents=True)
    for rel in copied.group(1).split():
        shutil.copyfile(REPO / rel, src / rel)
    assert "python -m plugins.pytest_files /opt/sandgate/pytest_libs" in text
    import pytest

    site = Path(pytest.__file__).parents[1]  # where pip put pytest: /tmp/pytest in the image
    dest = tmp_path / "opt" / "pytest_libs"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{site}:{src}"}
    subprocess.run([sys.executable, "-S", "-m", "plugins.pytest_files", str(dest)], cwd=src, env=env, check=True)

    (tmp_path / "test_probe.py").write_text("import pytest\n\n@pytest.mark.parametrize('x', [1, 2])\n"
                                            "def test_x(x):\n    assert x == 1\n")
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path.insert(0, {str(dest)!r}); import pytest; "
         "assert pytest.__file__.startswith(sys.path[0]), pytest.__file__; "
         "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'test_probe.py']))"],
        cwd=tmp_path, capture_output=True, text=True, check=False)
    assert run.returncode == 1, run.stdout + run.stderr  # 1: tests ran, one failed
    assert "assert 2 == 1" in run.stdout and "1 failed, 1 passed" in run.stdout
