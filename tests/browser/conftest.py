"""The browser tier: Debian's Chromium (``scripts/setup-browser``) driven headless by Playwright
through its ``executable_path`` — Playwright never downloads a browser here. Screenshots go to
``$GPUFLEET_ARTEFACTS`` (CI keeps them) or ``tests/browser/artefacts``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("GPUFLEET_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(autouse=True)
def no_leaked_tasks() -> None:
    """Replaces the suite's asyncio task-leak check (tests/conftest.py): this tier runs no
    asyncio of its own — the gateway is a child process — and Playwright's sync API keeps an
    event loop of its own on this thread, in which that async fixture cannot run."""


@pytest.fixture(scope="session")
def artefacts() -> Path:
    default = Path(__file__).parent / "artefacts"
    folder = Path(os.environ.get("GPUFLEET_ARTEFACTS") or default)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Per module: Playwright's sync API holds an event loop on this thread while it runs,
    which the asyncio tests of other tiers in the same session must not find there."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.fail(f"no Chromium at {CHROMIUM}: run scripts/setup-browser (Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()
