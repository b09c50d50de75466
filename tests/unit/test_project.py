"""Project promises that are easy to break by accident."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Test", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S)
    assert command is not None
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command.group(1).strip() in [line.strip() for line in ci]


@pytest.mark.parametrize(
    "module",
    [
        "gpufleet",
        "gpufleet.errors",
        "gpufleet.spec",
        "gpufleet.engines",
        "gpufleet.runtime",
        "gpufleet.store",
        "gpufleet.controller",
        "gpufleet.gateway",
        "gpufleet.embedded",
    ],
)
def test_public_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__, module
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert missing == []


def test_spec_exports_what_tools_build_on() -> None:
    import gpufleet.spec as spec

    assert {"Model", "load_file", "load_text", "parse_document", "API_VERSION"} <= set(spec.__all__)
