"""Load a processor folder whose configs map the tokenizer or feature extractor to a module of their own, the way a
user without speechllm_hf would (`AutoProcessor.from_pretrained(folder, trust_remote_code=True)`).

    python foreign_processor_code.py FOLDER MARKER

The planted module writes MARKER when it is imported. Prints a JSON line: the error message (or null) and whether the
planted module ran.
"""

import json
import os
import sys

sys.modules["speechllm_hf"] = None  # any import of the package now raises ImportError

import transformers  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

folder, marker = sys.argv[1], sys.argv[2]
try:
    AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    error = None
except ValueError as err:
    error = str(err)
print(json.dumps({"transformers": transformers.__version__, "error": error, "ran": os.path.exists(marker)}))
