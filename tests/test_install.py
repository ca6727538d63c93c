"""Installing speechllm_hf where transformers 4.57 is installed keeps that transformers (issue 19, item 7)."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from filelock import FileLock
from packaging.utils import canonicalize_name

# The newest datasets and gradio need a huggingface_hub that transformers 4.57 refuses. pip 25.1 and later resolve an
# upper-bounded requirement (`transformers<6` in pyproject.toml) first, so they keep the installed 4.57 and pick older
# datasets and gradio; older pips resolved datasets first and upgraded transformers to reach its newest release.
PIP = "pip>=25.1"


@pytest.mark.parametrize("extras", ["", "[dev]"])
def test_installing_into_a_transformers_4_57_environment_keeps_it(extras, compat_python):
    with FileLock(str(Path(compat_python).parents[1]) + ".lock"):
        subprocess.run([compat_python, "-m", "pip", "install", "-q", PIP], check=True)
    result = subprocess.run(
        [compat_python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", f"{REPO}{extras}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    installs = {canonicalize_name(item["metadata"]["name"]) for item in json.loads(result.stdout)["install"]}
    assert "speechllm-hf" in installs
    assert not {"transformers", "huggingface-hub"} & installs, sorted(installs)
