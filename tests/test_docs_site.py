"""The documentation site builds with warnings as errors, and its API reference is built from
the docstrings."""

import os
import subprocess
import sys

import pytest

from tests.helpers.commands import ROOT


@pytest.mark.slow
def test_the_docs_site_builds_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("SelfFlowTransformer", "SelfFlowObjective", "dual_timestep", "load_official"):
        assert name in api
