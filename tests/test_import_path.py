"""What `import speechllm_hf` loads: the core, not the offline data tools, the showcases or the optional extras."""

import json
import subprocess
import sys

from conftest import REPO

NOT_CORE = ("speechllm_hf.preprocessing", "speechllm_hf.quickstart", "speechllm_hf.commands", "speechllm_hf.cli")
EXTRAS = ("matplotlib", "gradio", "jiwer", "sacrebleu")


def test_import_speechllm_hf_leaves_out_the_offline_tools_showcases_and_extras():
    # A fresh interpreter: this process has imported half the package already.
    code = "import json, sys, speechllm_hf; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.splitlines()[-1])
    loaded = [m for m in modules if m.startswith(NOT_CORE) or m.split(".")[0] in EXTRAS]
    assert loaded == []
    assert "speechllm_hf.data" in modules  # the batch-time data code is core
