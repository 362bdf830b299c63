"""Driving the IDE page the way a user does: every wait is on something the page shows."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import expect

#: Starting a sandbox may include a cold start (the warm pool empty).
START_TIMEOUT_MS = 60_000


def log_in(page: Any, base_url: str, key: str, wire: str = "json") -> None:
    page.goto(base_url + "/")
    expect(page.locator("html")).to_have_attribute("data-ready", "1")
    page.fill("#api-key", key)
    page.select_option("#wire", wire)
    page.click("#login button[type=submit]")
    expect(page.locator("#session")).to_be_visible()


def start_sandbox(page: Any, runtime: str) -> str:
    """Pick `runtime`, start a sandbox, wait until its terminal is ready; returns the sandbox id."""
    page.select_option("#runtime", runtime)
    page.click("#new-sandbox")
    # Online, or an error in the status line: a failed start fails the test at once, with its reason.
    page.locator('#conn[data-state="online"], #status.error').first.wait_for(timeout=START_TIMEOUT_MS)
    status = page.locator("#status")
    assert "error" not in (status.get_attribute("class") or ""), f"the sandbox did not start: {status.inner_text()}"
    expect(page.locator("#conn")).to_have_attribute("data-state", "online")
    expect(page.locator("#sandbox-id")).to_contain_text(runtime)
    text = page.locator("#sandbox-id").inner_text()
    return str(text.split(" ")[0])


def has_pty(page: Any) -> bool:
    return bool(page.locator("#terminal-title").inner_text() == "Terminal")


def terminal_text(page: Any) -> str:
    """Everything the terminal holds (its scrollback included), as text."""
    return str(page.evaluate("window.sandgateIDE.terminalText()"))


def wait_for_terminal(page: Any, text: str, timeout_ms: int = 30_000) -> None:
    page.wait_for_function("(text) => window.sandgateIDE.terminalText().includes(text)", arg=text,
                           timeout=timeout_ms)


def console_idle(page: Any) -> None:
    """The Python console shows its prompt again (the statement's exec ended)."""
    expect(page.locator("#terminal")).to_have_attribute("data-busy", "0", timeout=START_TIMEOUT_MS)


def type_in_terminal(page: Any, line: str) -> None:
    """Type a line into the terminal and press Enter, as a user does."""
    page.locator("#terminal").click()
    page.keyboard.type(line)
    page.keyboard.press("Enter")


def edit_file(page: Any, path: str, content: str) -> None:
    page.fill("#path", path)
    page.fill("#editor", content)
