"""The audio token and the pad token on any tokenizer (fast or slow, with or without BOS and pad), on transformers 5.x
and 4.57: the tokenizer helpers of the Hub folder, run without the package in each version."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO

HUB_FOLDER = REPO / "speechllm_hf" / "models" / "speechllm"
CTC_TOKENIZER = REPO / "speechllm_hf" / "quickstart" / "corpus" / "ctc_aligner"  # a slow (Python) tokenizer

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Wav2Vec2CTCTokenizer
    from speechllm_hub.processing_speechllm import add_special_token, ensure_pad_token

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "<|x|>": 2, "A": 3, "B": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizers = {
        # No BOS, no pad, one extra special token of its own that must stay special.
        "fast": PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", additional_special_tokens=["<|x|>"]
        ),
        "slow": Wav2Vec2CTCTokenizer.from_pretrained(sys.argv[1]),
    }
    report = {}
    for name, tokenizer in tokenizers.items():
        if name == "slow":
            tokenizer.pad_token = None  # a tokenizer without pad
        add_special_token(tokenizer, "<audio>")
        add_special_token(tokenizer, "<audio>")  # a second call adds nothing
        ensure_pad_token(tokenizer)
        ids = tokenizer("A <audio> B", add_special_tokens=False)["input_ids"]
        report[name] = {
            "audio_pieces": ids.count(tokenizer.convert_tokens_to_ids("<audio>")),
            "audio_special": "<audio>" in tokenizer.all_special_tokens,
            "own_special_kept": name == "slow" or "<|x|>" in tokenizer.all_special_tokens,
            "decoded": tokenizer.decode(ids, skip_special_tokens=True).replace(" ", ""),
            "pad": tokenizer.pad_token is not None,
            "bos": tokenizer.bos_token_id is not None,
        }
    print(json.dumps(report))
    """
)


def tokenizer_report(python: str, tmp_path: Path) -> dict:
    package = tmp_path / "speechllm_hub"
    package.mkdir(exist_ok=True)
    for name in ("configuration_speechllm.py", "processing_speechllm.py", "audio_speechllm.py", "compat_speechllm.py"):
        shutil.copy(HUB_FOLDER / name, package / name)
    (package / "__init__.py").write_text("")
    result = subprocess.run(
        [python, "-c", SCRIPT, str(CTC_TOKENIZER)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


EXPECTED = {
    "audio_pieces": 1,
    "audio_special": True,
    "own_special_kept": True,
    "decoded": "AB",
    "pad": True,
}


def check(report: dict) -> None:
    for name, found in report.items():
        assert {k: found[k] for k in EXPECTED} == EXPECTED, name
    assert not report["fast"]["bos"]


def test_audio_and_pad_tokens_on_fast_and_slow_tokenizers_on_transformers_5(tmp_path):
    check(tokenizer_report(sys.executable, tmp_path))


def test_audio_and_pad_tokens_on_fast_and_slow_tokenizers_on_transformers_4_57(tmp_path, compat_python):
    check(tokenizer_report(compat_python, tmp_path))
