"""Check that the model's save_pretrained, push_to_hub and from_pretrained take every argument of PreTrainedModel's,
on the transformers version this interpreter has, with the Hub copy of the model code (no speechllm_hf).

    python standard_signatures.py FOLDER

FOLDER is a projector-only save. Prints one JSON line.
"""

import inspect
import json
import os
import sys
import tempfile

sys.modules["speechllm_hf"] = None  # any import of the package now raises ImportError

import transformers  # noqa: E402
from huggingface_hub import HfApi, RepoUrl  # noqa: E402
from transformers import AutoModel, PreTrainedModel  # noqa: E402

folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
cls = type(model)
assert not cls.__module__.startswith("speechllm_hf"), cls.__module__


def parent_arguments(name: str) -> tuple[list[str], dict]:
    """PreTrainedModel's positional-or-keyword parameter names (after self/cls and the first) and defaults."""
    parameters = list(inspect.signature(getattr(PreTrainedModel, name)).parameters.values())
    parameters = [p for p in parameters if p.name not in ("self", "cls")][1:]
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    positional = [p.name for p in named if p.kind == p.POSITIONAL_OR_KEYWORD]
    return positional, {p.name: p.default for p in named if p.default is not inspect.Parameter.empty}


bound = {}
for name in ("save_pretrained", "push_to_hub", "from_pretrained"):
    positional, defaults = parent_arguments(name)
    ours = inspect.signature(getattr(cls, name))
    target = cls if name == "from_pretrained" else model
    first = folder
    # Every parameter by keyword, and the positional ones by position, bind to ours as they bind to PreTrainedModel's.
    args = (first,) if name == "from_pretrained" else (target, first)
    ours.bind(*args, **defaults)
    ours.bind(*args, *[defaults[p] for p in positional if p in defaults])
    bound[name] = sorted(defaults)

uploads = []
HfApi.create_repo = lambda self, repo_id, **kwargs: RepoUrl(f"https://huggingface.co/{repo_id}")
HfApi.create_commit = lambda self, repo_id, operations, **kwargs: uploads.append(
    sorted(op.path_in_repo for op in operations)
)
with tempfile.TemporaryDirectory() as out:
    _, defaults = parent_arguments("save_pretrained")
    model.save_pretrained(out, **defaults)  # every default, as the Trainer or a user may pass them
    saved = sorted(os.listdir(out))
    _, defaults = parent_arguments("push_to_hub")
    # The Hub copy refuses local backbone folders: name them by (made-up) Hub ids for the upload check.
    model.config.encoder_name_or_path, model.config.text_name_or_path = "org/encoder", "org/llm"
    model.push_to_hub("org/model", **defaults)
_, defaults = parent_arguments("from_pretrained")
defaults["revision"] = None  # "main" would name a branch of a Hub repo; FOLDER is a folder
reloaded = cls.from_pretrained(folder, **{k: v for k, v in defaults.items() if k != "config"})
print(json.dumps({"transformers": transformers.__version__, "bound": bound, "saved": saved, "uploaded": uploads}))
