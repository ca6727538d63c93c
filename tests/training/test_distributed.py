"""Data parallelism: 2 CPU processes x b clips train the projector exactly as 1 process x 2b clips, for
SpeechLlmTrainer (ASR), ContrastiveTrainer (gathered negatives) and ContinuationTrainer (CE + KL), with and without
gradient accumulation (script: tests/scripts/ddp_equivalence.py); the same for FSDP2 wrapped as fsdp.yaml asks; and,
under a DeepSpeed ZeRO-3 config, an encoder built outside deepspeed.zero.Init."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.integrations
from conftest import SCRIPTS, launch_two_cpu_processes
from safetensors.torch import load_file
from transformers.integrations import (
    deepspeed_config,
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)

from speechllm_hf import from_preset

SCRIPT = SCRIPTS / "ddp_equivalence.py"
FSDP2_SCRIPT = SCRIPTS / "fsdp2_equivalence.py"
CASES = (
    "asr",
    "asr_accumulation",
    "asr_random_order",
    "asr_feature_cache",
    "contrastive",
    "contrastive_accumulation",
    "continuation",
    "continuation_accumulation",
)
# Both runs add the same per-clip gradients in a different order (two halves all-reduced vs one batch; other matrix
# shapes), which moves float32 results by a few ulps: gradients by ~1e-7 of their size, so the SGD-updated weights
# (|w| < 2) by about 1e-7 (measured: at most 1.2e-7). Training moves them by 0.07 to 0.24; with other clips in the
# 2-process steps (the sampler grouping by the per-device batch), they ended 8e-3 to 8e-2 apart.
ATOL = 1e-6


def micro_batches(folder: Path, rank: int) -> list[list[str]]:
    return json.loads((folder / f"batches_rank{rank}.json").read_text())


def test_two_processes_train_the_projector_as_one_process_with_the_global_batch(tmp_path):
    single = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "one")],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch_two_cpu_processes([str(SCRIPT), str(tmp_path / "two")])
    assert double.returncode == 0, double.stderr[-3000:]

    for case in CASES:
        one, two = tmp_path / "one" / case, tmp_path / "two" / case
        # The same clips in every micro-batch: each process takes its own half of the single process's batch.
        alone, first, second = micro_batches(one, 0), micro_batches(two, 0), micro_batches(two, 1)
        assert len(alone) == len(first) == len(second) == (6 if "accumulation" in case else 3), case
        for step, (whole, half, other_half) in enumerate(zip(alone, first, second)):
            assert not set(half) & set(other_half), f"{case}: both processes got {set(half) & set(other_half)}"
            assert sorted(half + other_half) == sorted(whole), f"{case}, micro-batch {step}: other clips"

        # The main process alone encodes the clips (main_process_first): the other reads its cache.
        builds = [
            json.loads((run / f"builds_rank{rank}.json").read_text()) for run, rank in ((one, 0), (two, 0), (two, 1))
        ]
        assert builds == ([1, 1, 0] if case == "asr_feature_cache" else [0, 0, 0]), case
        result_one, result_two = (json.loads((run / "result.json").read_text()) for run in (one, two))
        assert (result_one["world_size"], result_two["world_size"]) == (1, 2)
        assert result_one["largest_update"] > 1000 * ATOL, f"{case}: training barely moved the projector"
        # The logged loss is the mean over processes of each one's share: the loss of the global batch.
        torch.testing.assert_close(result_two["losses"], result_one["losses"], rtol=1e-6, atol=0, msg=case)
        trained_one, trained_two = load_file(one / "projector.safetensors"), load_file(two / "projector.safetensors")
        assert trained_one.keys() == trained_two.keys()
        for name, tensor in trained_one.items():
            torch.testing.assert_close(trained_two[name], tensor, rtol=0, atol=ATOL, msg=f"{case}: {name}")


def test_fsdp2_wrapping_of_fsdp_yaml_trains_the_projector_as_one_unsharded_process(tmp_path):
    # FSDP2 (fully_shard) runs on CPU with gloo; accelerate applies it on GPUs only, so the script wraps the model as
    # accelerate does for fsdp.yaml. The root unit mixes frozen backbone parts with the trainable projector.
    result = launch_two_cpu_processes([str(FSDP2_SCRIPT), str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "result.json").read_text())
    assert run["world_size"] == 2 and run["sharded"]
    assert run["largest_update"] > 1000 * ATOL
    sharded, reference = load_file(tmp_path / "fsdp.safetensors"), load_file(tmp_path / "reference.safetensors")
    assert sharded.keys() == reference.keys() and sharded  # the FULL_STATE_DICT gather holds the whole projector
    for name, tensor in reference.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=0, atol=ATOL, msg=name)


class FakeZero3Config:
    """Stands in for transformers' `HfDeepSpeedConfig` (which needs deepspeed): registers itself as the DeepSpeed
    config in force, as that class does, and reports ZeRO-3."""

    def __init__(self, config: dict):
        self.config = config
        set_hf_deepspeed_config(self)

    def is_zero3(self) -> bool:
        return True


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="tells zero.Init apart by its import")
@pytest.mark.parametrize("pretrained", [False, True], ids=["random", "from_pretrained"])
def test_under_zero3_the_encoder_is_built_outside_zero_init_and_the_llm_inside(
    pretrained, local_backbones, monkeypatch
):
    # Without deepspeed installed, whatever transformers builds inside deepspeed.zero.Init fails on `import deepspeed`:
    # the encoder must get through, and the LLM must be the part that reaches zero.Init.
    monkeypatch.setattr(transformers.integrations, "HfDeepSpeedConfig", FakeZero3Config)
    settings = {"zero_optimization": {"stage": 3}}
    backbones = {}
    if pretrained:
        backbones = {"encoder_name_or_path": local_backbones / "hubert", "text_name_or_path": local_backbones / "llm"}
    registered = FakeZero3Config(settings)  # noqa: F841 (transformers keeps only a weak reference)
    try:
        with pytest.raises(ModuleNotFoundError, match="deepspeed") as raised:
            from_preset("tiny", **backbones)
        failed_in = {entry.name for entry in raised.traceback}
        assert not failed_in & {"build_encoder", "load_pretrained_encoder"}, failed_in
        assert ("load_pretrained_text_model" if pretrained else "__init__") in failed_in
        assert is_deepspeed_zero3_enabled() and deepspeed_config() == settings  # in force again after the encoder
    finally:
        unset_hf_deepspeed_config()
