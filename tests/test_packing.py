"""Padding-free packing: packed and padded batches give the same loss, gradients and logits; the label rule at
sequence starts; refusals; the trainers and the command line; the Hub copy on transformers 4.57."""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import COMPAT_TRANSFORMERS, CPU_TRAINING, clip, run_without_package
from test_trainer import multi_task_rows
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from speechllm_hf import from_preset
from speechllm_hf.cli import main
from speechllm_hf.corpus import load_split, manifest_path
from speechllm_hf.data.collator import IGNORE_INDEX, SpeechLlmCollator
from speechllm_hf.data.tasks import PromptConfig
from speechllm_hf.models.speechllm import modeling_speechllm
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.continuation import ContinuationCollator, ContinuationTrainer, ContinuationTrainingArguments
from speechllm_hf.training.contrastive import ContrastiveTrainingArguments
from speechllm_hf.training.trainer import SpeechLlmTrainer

CHECK_SCRIPT = Path(__file__).parent / "scripts" / "padding_free_without_package.py"


def tiny_model(attn_implementation="sdpa"):
    """A tiny model whose LLM uses `attn_implementation`; the MLP projector has no dropout, so runs repeat exactly."""
    torch.manual_seed(0)
    return from_preset("tiny", projector_type="mlp", attn_implementation={"text_config": attn_implementation})


def asr_batch(processor, n=4):
    """Collated ASR rows of the bundled corpus: right-padded, of different lengths, prompts unlabelled."""
    batch = SpeechLlmCollator(processor)(load_split("train")[:n])
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max(), "the batch must hold padding for the test to mean anything"
    return batch


@contextlib.contextmanager
def llm_input_shapes(model):
    """Records the (batch, length) of every `inputs_embeds` the LLM receives: (1, N) when packed."""
    shapes = []
    hook = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        yield shapes
    finally:
        hook.remove()


def run(model, batch, padding_free):
    """Loss, projector gradients, logits, and the LLM's input shape of one forward/backward."""
    model.zero_grad()
    with llm_input_shapes(model) as shapes:
        outputs = model(**batch, padding_free=padding_free)
    outputs.loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.projector.named_parameters()}
    return outputs.loss.detach(), gradients, outputs.logits.detach(), shapes[0]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_batch_gives_the_padded_loss_gradients_and_logits(attn_implementation):
    model, processor = tiny_model(attn_implementation)
    model.train()
    batch = asr_batch(processor)
    valid = batch["attention_mask"].bool()
    padded_loss, padded_gradients, padded_logits, padded_shape = run(model, batch, padding_free=False)
    loss, gradients, logits, shape = run(model, batch, padding_free=True)

    assert padded_shape == tuple(valid.shape) and shape == (1, int(valid.sum()))  # packing did happen
    torch.testing.assert_close(loss, padded_loss, atol=1e-6, rtol=1e-6)
    for name, gradient in padded_gradients.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(gradients[name], gradient, atol=1e-6, rtol=1e-5)
    # Logits come back as (B, L, V): the padded batch's at real tokens (so no sequence saw another), zero at padding.
    assert logits.shape == padded_logits.shape
    torch.testing.assert_close(logits[valid], padded_logits[valid], atol=1e-5, rtol=1e-5)
    assert not logits[~valid].any()


def test_flash_attention_gets_each_sequences_boundaries(monkeypatch):
    """flash-attn does not install on CPU: a reference varlen attention, causal within each sequence the cumulative
    lengths delimit, stands in for flash_attention_2's kernel and checks what the packed forward hands it."""
    calls = []

    def varlen_reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        assert attention_mask is None and query.shape[0] == 1  # one packed row, no mask
        bounds, longest = kwargs["cu_seq_lens_q"].tolist(), kwargs["max_length_q"]
        calls.append((tuple(bounds), longest))
        outputs = [
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                is_causal=True,
                scale=scaling,
                enable_gqa=True,
            )
            for start, end in zip(bounds, bounds[1:])
        ]
        return torch.cat(outputs, dim=2).transpose(1, 2), None

    model, processor = tiny_model("sdpa")
    model.train()
    batch = asr_batch(processor)
    padded_loss, padded_gradients, padded_logits, _ = run(model, batch, padding_free=False)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", varlen_reference)
    monkeypatch.setattr(model.language_model.config, "_attn_implementation", "flash_attention_2")
    loss, gradients, logits, shape = run(model, batch, padding_free=True)

    lengths = batch["attention_mask"].sum(-1)
    assert shape == (1, int(lengths.sum()))
    assert calls and set(calls) == {((0, *lengths.cumsum(0).tolist()), int(lengths.max()))}
    torch.testing.assert_close(loss, padded_loss, atol=1e-6, rtol=1e-6)
    for name, gradient in padded_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, atol=1e-6, rtol=1e-5)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], padded_logits[valid], atol=1e-5, rtol=1e-5)


def test_the_first_token_of_a_sequence_is_never_predicted_from_the_previous_one():
    """Every real token labelled (as `labels=input_ids` does): packed, the last token of one sequence would be made to
    predict the first token of the next, which the padded batch never asks."""
    model, processor = tiny_model("sdpa")
    batch = asr_batch(processor, n=3)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    batch["labels"] = batch["labels"].masked_fill(batch["input_ids"] == processor.audio_token_id, IGNORE_INDEX)
    assert (batch["labels"][:, 0] != IGNORE_INDEX).all()
    with torch.no_grad(), llm_input_shapes(model) as shapes:
        padded = model(**batch, padding_free=False).loss
        packed = model(**batch, padding_free=True).loss
    assert shapes[1] == (1, int(batch["attention_mask"].sum()))
    torch.testing.assert_close(packed, padded, atol=1e-6, rtol=1e-6)


def test_generation_runs_padded_and_an_explicit_request_with_a_cache_is_refused():
    model, processor = tiny_model("sdpa")
    prompt = processor(
        ["<|user|><audio> hi<|end|><|assistant|>", "<|user|>a longer prompt <audio><|end|><|assistant|>"],
        audio=[clip(0.8), clip(0.5, 1)],
        sampling_rate=16000,
    )
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    reference = model.generate(**prompt, **settings)
    model.config.padding_free = True
    try:
        assert torch.equal(model.generate(**prompt, **settings), reference)
        for generating in ({"use_cache": True}, {"logits_to_keep": 1}):
            with pytest.raises(ValueError, match="this one generates.*padding_free=False"):
                model(**prompt, **generating, padding_free=True)
    finally:
        model.config.padding_free = False


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"position_ids": "given"}, "position ids are given"),
        ({"output_attentions": True}, "attention weights are asked for"),
    ],
)
def test_forwards_that_cannot_be_packed_are_refused(extra, reason):
    model, processor = tiny_model("sdpa")
    batch = asr_batch(processor, n=3)
    if extra.get("position_ids") == "given":
        extra = {"position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}
    with pytest.raises(ValueError, match=f"cannot be packed: {reason}"):
        model(**batch, **extra, padding_free=True)


def test_attention_that_would_mix_the_sequences_is_refused(monkeypatch, tmp_path):
    assert modeling_speechllm.padding_free_unsupported("flash_attention_2") is None
    assert modeling_speechllm.padding_free_unsupported("sdpa") is None
    assert "this LLM uses 'paged|eager'" in modeling_speechllm.padding_free_unsupported("paged|eager")
    # transformers 4.57 builds the packed-sequence mask only on torch >= 2.6; flash attention needs no mask.
    monkeypatch.setattr(modeling_speechllm, "is_torch_greater_or_equal", lambda version: False)
    assert "needs torch >= 2.6" in modeling_speechllm.padding_free_unsupported("sdpa")
    assert modeling_speechllm.padding_free_unsupported("flash_attention_2") is None

    model, processor = tiny_model("sdpa")
    with pytest.raises(ValueError, match="needs torch >= 2.6"):
        model(**asr_batch(processor, n=3), padding_free=True)
    args = SpeechLlmTrainingArguments(output_dir=str(tmp_path), padding_free=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="needs torch >= 2.6"):  # before any step
        SpeechLlmTrainer(model=model, args=args, processing_class=processor)


def test_the_contrastive_trainer_refuses_it(tmp_path):
    with pytest.raises(ValueError, match="not supported by the contrastive trainer"):
        ContrastiveTrainingArguments(output_dir=str(tmp_path), padding_free=True, use_cpu=True)


def test_training_with_padding_free_logs_the_same_losses(tmp_path):
    """Multi-task rows: the per-task losses are computed from the unpacked logits."""
    logs = {}
    for padding_free in (False, True):
        model, processor = tiny_model("sdpa")
        args = SpeechLlmTrainingArguments(
            output_dir=str(tmp_path / str(padding_free)),
            max_steps=2,
            per_device_train_batch_size=4,
            optim="sgd",
            learning_rate=0.1,
            **CPU_TRAINING,
            padding_free=padding_free,
        )
        trainer = SpeechLlmTrainer(model=model, args=args, train_dataset=multi_task_rows(), processing_class=processor)
        assert model.config.padding_free is padding_free
        with llm_input_shapes(model) as shapes:
            trainer.train()
        assert shapes and all((batch == 1) is padding_free for batch, _ in shapes)
        logs[padding_free] = [{k: v for k, v in h.items() if k.startswith("loss")} for h in trainer.state.log_history]
    assert [set(entry) for entry in logs[True]] == [set(entry) for entry in logs[False]]
    assert any({"loss_asr", "loss_st"} <= set(entry) for entry in logs[True])
    for packed, padded in zip(logs[True], logs[False]):
        for name, value in padded.items():
            assert packed[name] == pytest.approx(value, rel=1e-5), name


def test_continuation_losses_are_unchanged(tmp_path):
    model, processor = tiny_model("sdpa")
    rows = load_split("train")[:3]
    for row, continuation in zip(rows, ["and then they fly away.", "it is red.", "we go home now."]):
        row["continuation"] = continuation
    collator = ContinuationCollator(
        processor, with_teacher=True, task="continuation", prompts=PromptConfig.from_file("blsp")
    )
    batch = collator(rows)
    losses = {}
    for padding_free in (False, True):
        args = ContinuationTrainingArguments(
            output_dir=str(tmp_path), kl_weight=0.5, use_cpu=True, report_to="none", padding_free=padding_free
        )
        trainer = ContinuationTrainer(model=model, args=args, processing_class=processor)
        with torch.no_grad(), llm_input_shapes(model) as shapes:
            losses[padding_free] = trainer.compute_loss(model, batch)
        assert len(shapes) == 2 and all((size == 1) is padding_free for size, _ in shapes)  # student and teacher
    torch.testing.assert_close(losses[True], losses[False], atol=1e-6, rtol=1e-6)


def test_train_command_takes_padding_free_and_saves_it_in_the_config(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--output_dir", str(out), "--train_manifest", str(manifest_path("dev"))]
    argv += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu", "--save_strategy", "no"]
    assert main([*argv, "--padding_free"]) == 0
    assert json.loads((out / "config.json").read_text())["padding_free"] is True


def test_the_hub_copy_packs_on_transformers_4_57(compat_python, tmp_path):
    """A saved model loaded without the package on transformers 4.57 (its own masking code): eager and sdpa packed
    give the padded batch's loss and projector gradients."""
    model, processor = tiny_model("sdpa")
    model.save_pretrained(tmp_path / "model")
    batch = asr_batch(processor)
    np.savez(tmp_path / "batch.npz", **{name: tensor.numpy() for name, tensor in batch.items()})
    arguments = [str(CHECK_SCRIPT), str(tmp_path / "model"), str(tmp_path / "batch.npz")]
    report = run_without_package(compat_python, arguments, tmp_path)
    assert report["transformers"] == COMPAT_TRANSFORMERS
    assert set(report["checked"]) == {"eager", "sdpa"}
