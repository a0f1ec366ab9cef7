"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, for the page tests.

Playwright's own browser download is never used: the tests launch the system Chromium with a fresh
profile and no network features beyond loopback."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium_path() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path is None:
        raise RuntimeError("Chromium is not installed: run ./scripts/setup.sh (Debian package chromium)")
    return path


@contextmanager
def chromium(profile: Path) -> Iterator:
    """A browser context with a fresh profile in `profile` (Playwright's persistent context)."""
    from playwright.sync_api import sync_playwright

    profile.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield context
        finally:
            context.close()
