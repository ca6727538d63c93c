"""The documentation site builds without warnings (what `mkdocs build --strict` enforces: no broken links or nav)."""

import subprocess
import sys

import pytest
from conftest import REPO


def test_mkdocs_build_strict(tmp_path):
    # This interpreter's mkdocs, not whatever `mkdocs` is first on PATH (a pyenv shim may stand for another Python).
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (it is in the dev extra)")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
