"""Padding-free packing, a collator concern: packed and padded batches give the same loss, gradients and logits; the
label rule at sequence starts; flash attention's sequence boundaries; refusals; the trainers and the command line;
the Hub copy on transformers 4.57."""

import contextlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    COMPAT_TRANSFORMERS,
    CPU_TRAINING,
    SCRIPTS,
    TRANSFORMERS_5,
    multi_task_rows,
    run_without_package,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from speechllm_hf import from_preset
from speechllm_hf.cli import main
from speechllm_hf.data import collators
from speechllm_hf.data.collators import (
    IGNORE_INDEX,
    TASK_IDS,
    ContinuationCollator,
    SpeechLlmCollator,
    pack_sequences,
    padding_free_unsupported,
)
from speechllm_hf.data.tasks import PromptConfig
from speechllm_hf.quickstart.corpus import load_split, manifest_path
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.continuation import ContinuationTrainer, ContinuationTrainingArguments
from speechllm_hf.training.contrastive import ContrastiveTrainingArguments
from speechllm_hf.training.trainer import SpeechLlmTrainer

CHECK_SCRIPT = SCRIPTS / "padding_free_without_package.py"


def tiny_model(attn_implementation="sdpa"):
    """A tiny model whose LLM uses `attn_implementation`; the MLP projector has no dropout, so runs repeat exactly."""
    torch.manual_seed(0)
    return from_preset("tiny", projector_type="mlp", attn_implementation={"text_config": attn_implementation})


def asr_batches(processor, n=4, **settings):
    """The bundled corpus's first ASR rows collated padded and packed: right-padded rows of different lengths, prompts
    unlabelled."""
    rows = load_split("train")[:n]
    padded = SpeechLlmCollator(processor, **settings)(rows)
    lengths = padded["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max(), "the batch must hold padding for the test to mean anything"
    return padded, SpeechLlmCollator(processor, padding_free=True, **settings)(rows)


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


def run(model, batch):
    """Loss, projector gradients, logits, and the LLM's input shape of one forward/backward."""
    model.zero_grad()
    with llm_input_shapes(model) as shapes:
        outputs = model(**batch)
    outputs.loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.projector.named_parameters()}
    return outputs.loss.detach(), gradients, outputs.logits.detach(), shapes[0]


def test_the_packed_batch_holds_the_padded_sequences_back_to_back():
    _, processor = tiny_model()
    padded, packed = asr_batches(processor, return_task_ids=True)
    valid = padded["attention_mask"].bool()
    assert "attention_mask" not in packed and packed["use_cache"] is False
    assert torch.equal(packed["input_ids"], padded["input_ids"][valid][None])
    lengths = valid.sum(-1).tolist()
    assert packed["position_ids"][0].tolist() == [p for length in lengths for p in range(length)]
    # Each sequence's first label is ignored; prompts start with unlabelled tokens anyway, so the labels are the same.
    assert torch.equal(packed["labels"], padded["labels"][valid][None])
    tasks = padded[TASK_IDS].tolist()
    assert packed[TASK_IDS].tolist() == [[task for task, length in zip(tasks, lengths) for _ in range(length)]]
    assert torch.equal(packed["input_features"], padded["input_features"])  # audio stays one row per clip
    assert not any(name in packed for name in collators.FLASH_ATTENTION_KWARGS)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_batch_gives_the_padded_loss_gradients_and_logits(attn_implementation):
    model, processor = tiny_model(attn_implementation)
    model.train()
    padded, packed = asr_batches(processor)
    valid = padded["attention_mask"].bool()
    padded_loss, padded_gradients, padded_logits, padded_shape = run(model, padded)
    loss, gradients, logits, shape = run(model, packed)

    assert padded_shape == tuple(valid.shape) and shape == (1, int(valid.sum()))  # packing did happen
    torch.testing.assert_close(loss, padded_loss, atol=1e-6, rtol=1e-6)
    for name, gradient in padded_gradients.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(gradients[name], gradient, atol=1e-6, rtol=1e-5)
    # The packed row's logits are the padded batch's at its real tokens, in order: no sequence saw another.
    torch.testing.assert_close(logits[0], padded_logits[valid], atol=1e-5, rtol=1e-5)


def test_flash_attention_gets_each_sequences_boundaries(monkeypatch):
    """flash-attn does not install on CPU: a reference varlen attention, causal within each sequence the cumulative
    lengths delimit, stands in for flash_attention_2's kernel and checks what the packed batch hands it."""
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
    padded, packed = asr_batches(processor, return_flash_attn_kwargs=True)
    padded_loss, padded_gradients, padded_logits, _ = run(model, padded)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", varlen_reference)
    monkeypatch.setattr(model.language_model.config, "_attn_implementation", "flash_attention_2")
    loss, gradients, logits, shape = run(model, packed)

    lengths = padded["attention_mask"].sum(-1)
    assert shape == (1, int(lengths.sum()))
    assert calls and set(calls) == {((0, *lengths.cumsum(0).tolist()), int(lengths.max()))}
    torch.testing.assert_close(loss, padded_loss, atol=1e-6, rtol=1e-6)
    for name, gradient in padded_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, atol=1e-6, rtol=1e-5)
    valid = padded["attention_mask"].bool()
    torch.testing.assert_close(logits[0], padded_logits[valid], atol=1e-5, rtol=1e-5)


def test_the_first_token_of_a_sequence_is_never_predicted_from_the_previous_one():
    """Every real token labelled (as `labels=input_ids` does): packed, the last token of one sequence would be made to
    predict the first token of the next, which the padded batch never asks."""
    model, processor = tiny_model("sdpa")
    batch, _ = asr_batches(processor, n=3)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    batch["labels"] = batch["labels"].masked_fill(batch["input_ids"] == processor.audio_token_id, IGNORE_INDEX)
    assert (batch["labels"][:, 0] != IGNORE_INDEX).all()
    packed = pack_sequences(batch)
    starts = packed["position_ids"][0] == 0
    assert int(starts.sum()) == 3 and (packed["labels"][0][starts] == IGNORE_INDEX).all()
    with torch.no_grad(), llm_input_shapes(model) as shapes:
        padded_loss = model(**batch).loss
        packed_loss = model(**packed).loss
    assert shapes[1] == (1, int(batch["attention_mask"].sum()))
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-6)


def test_attention_that_would_mix_the_sequences_is_refused(monkeypatch, tmp_path):
    assert padding_free_unsupported("flash_attention_2") is None
    assert padding_free_unsupported("sdpa") is None
    assert "this LLM uses 'paged|eager'" in padding_free_unsupported("paged|eager")
    # transformers 4.57 builds the packed-sequence mask only on torch >= 2.6; flash attention needs no mask.
    monkeypatch.setattr(collators, "is_torch_greater_or_equal", lambda version: False)
    assert "needs torch >= 2.6" in padding_free_unsupported("sdpa")
    assert padding_free_unsupported("flash_attention_2") is None

    model, processor = tiny_model("sdpa")
    args = SpeechLlmTrainingArguments(output_dir=str(tmp_path), padding_free=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="needs torch >= 2.6"):  # when the trainer is built, before any step
        SpeechLlmTrainer(model=model, args=args, processing_class=processor)
    # A collator that packs asks the same of the LLM, whatever the arguments say.
    plain = SpeechLlmTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="needs torch >= 2.6"):
        SpeechLlmTrainer(model=model, args=plain, data_collator=SpeechLlmCollator(processor, padding_free=True))


def test_padding_free_with_a_collator_that_does_not_pack_is_refused(tmp_path):
    model, processor = tiny_model("sdpa")
    args = SpeechLlmTrainingArguments(output_dir=str(tmp_path), padding_free=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"padding_free is set but the collator \(SpeechLlmCollator\) does not pack"):
        SpeechLlmTrainer(model=model, args=args, data_collator=SpeechLlmCollator(processor))


def test_the_contrastive_trainer_refuses_it(tmp_path):
    with pytest.raises(ValueError, match="not supported by the contrastive trainer"):
        ContrastiveTrainingArguments(output_dir=str(tmp_path), padding_free=True, use_cpu=True)


def test_training_with_padding_free_logs_the_same_losses(tmp_path):
    """Multi-task rows: the per-task losses are computed from the packed batch's per-token task ids."""
    logs = {}
    for padding_free in (False, True):
        model, processor = tiny_model("sdpa")
        config = model.config.to_dict()
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
        collator = trainer.data_collator
        assert collator.padding_free is padding_free and not collator.return_flash_attn_kwargs
        with llm_input_shapes(model) as shapes:
            trainer.train()
        assert shapes and all((batch == 1) is padding_free for batch, _ in shapes)
        # transformers 5.x's Trainer turns the model's use_cache off (4.57's leaves it); packing leaves the config as
        # it found it.
        assert model.config.to_dict() == {**config, **({"use_cache": False} if TRANSFORMERS_5 else {})}
        logs[padding_free] = [{k: v for k, v in h.items() if k.startswith("loss")} for h in trainer.state.log_history]
    assert [set(entry) for entry in logs[True]] == [set(entry) for entry in logs[False]]
    assert any({"loss_asr", "loss_st"} <= set(entry) for entry in logs[True])
    for packed, padded in zip(logs[True], logs[False]):
        for name, value in padded.items():
            assert packed[name] == pytest.approx(value, rel=1e-5), name


def test_a_flash_attention_llm_gets_the_sequence_boundaries_from_the_default_collator(tmp_path, monkeypatch):
    model, processor = tiny_model("sdpa")
    monkeypatch.setattr(model.language_model.config, "_attn_implementation", "flash_attention_2")
    args = SpeechLlmTrainingArguments(output_dir=str(tmp_path), padding_free=True, use_cpu=True, report_to="none")
    collator = SpeechLlmTrainer(model=model, args=args, processing_class=processor).data_collator
    assert collator.padding_free and collator.return_flash_attn_kwargs
    rows = load_split("train")[:3]
    lengths = SpeechLlmCollator(processor)(rows)["attention_mask"].sum(-1)
    batch = collator(rows)
    bounds = torch.tensor([0, *lengths.cumsum(0).tolist()], dtype=torch.int32)
    assert torch.equal(batch["cu_seq_lens_q"], bounds) and torch.equal(batch["cu_seq_lens_k"], bounds)
    assert batch["max_length_q"] == batch["max_length_k"] == int(lengths.max())


def test_continuation_losses_are_unchanged(tmp_path):
    model, processor = tiny_model("sdpa")
    rows = load_split("train")[:3]
    for row, continuation in zip(rows, ["and then they fly away.", "it is red.", "we go home now."]):
        row["continuation"] = continuation
    losses = {}
    for padding_free in (False, True):
        collator = ContinuationCollator(
            processor, with_teacher=True, prompts=PromptConfig.from_file("blsp"), padding_free=padding_free
        )
        batch = collator(rows)
        args = ContinuationTrainingArguments(
            output_dir=str(tmp_path), kl_weight=0.5, use_cpu=True, report_to="none", padding_free=padding_free
        )
        trainer = ContinuationTrainer(model=model, args=args, data_collator=collator, processing_class=processor)
        with torch.no_grad(), llm_input_shapes(model) as shapes:
            losses[padding_free] = trainer.compute_loss(model, batch)
        assert len(shapes) == 2 and all((size == 1) is padding_free for size, _ in shapes)  # student and teacher
    torch.testing.assert_close(losses[True], losses[False], atol=1e-6, rtol=1e-6)


def test_train_command_takes_padding_free_and_keeps_it_out_of_the_model_config(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--output_dir", str(out), "--train_manifest", str(manifest_path("dev"))]
    argv += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu", "--save_strategy", "no"]
    assert main([*argv, "--padding_free"]) == 0
    assert torch.load(out / "training_args.bin", weights_only=False).padding_free is True  # a setting of the run
    assert "padding_free" not in json.loads((out / "config.json").read_text())  # not of the model


def test_the_hub_copy_takes_a_packed_batch_on_transformers_4_57(compat_python, tmp_path):
    """A saved model loaded without the package on transformers 4.57 (its own masking code): eager and sdpa give the
    padded batch's loss, projector gradients and logits on the packed batch."""
    model, processor = tiny_model("sdpa")
    model.save_pretrained(tmp_path / "model")
    for name, batch in zip(("padded", "packed"), asr_batches(processor)):
        np.savez(tmp_path / f"{name}.npz", **{key: np.asarray(value) for key, value in batch.items()})
    batches = [str(tmp_path / f"{name}.npz") for name in ("padded", "packed")]
    report = run_without_package(compat_python, [str(CHECK_SCRIPT), str(tmp_path / "model"), *batches], tmp_path)
    assert report["transformers"] == COMPAT_TRANSFORMERS
    assert set(report["checked"]) == {"eager", "sdpa"}
