"""Fixtures that run the real guest agent (see agent_harness)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest_agent.agent_harness import AgentClient, InProcessAgent, SubprocessAgent


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def proc_agent(root: Path) -> Iterator[SubprocessAgent]:
    agent = SubprocessAgent(root)
    yield agent
    agent.stop()


@pytest.fixture(params=["subprocess", "inprocess"])
def client(request: pytest.FixtureRequest, root: Path) -> Iterator[AgentClient]:
    """The same tests against both ways of running the agent."""
    agent: SubprocessAgent | InProcessAgent
    agent = SubprocessAgent(root) if request.param == "subprocess" else InProcessAgent(root)
    yield agent.client
    agent.stop()


@pytest.fixture
def pclient(proc_agent: SubprocessAgent) -> AgentClient:
    """Only the subprocess agent (tests that chdir, sleep in user code, or kill things)."""
    return proc_agent.client
