"""ContrastiveTrainer: the loss it trains on, what it runs, retrieval that rises above chance (DDP: see
test_distributed.py)."""

import copy
import json
import math
import os
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import LOGGED_LOSS_STEP, tiny

from speechllm_hf import from_preset
from speechllm_hf.data.collators import ContrastiveCollator
from speechllm_hf.evaluation.retrieval import evaluate_retrieval, write_retrieval_report
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.contrastive import (
    ContrastiveTrainer,
    ContrastiveTrainingArguments,
    contrastive_states,
    sink_token_id,
)


def make_trainer(tmp_path, model, processor, rows=8, **overrides):
    """A ContrastiveTrainer on the first `rows` training clips, or on `rows` themselves when a list."""
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    args = ContrastiveTrainingArguments(**{**settings, **overrides})
    data = datasets.Dataset.from_list(rows if isinstance(rows, list) else load_split("train")[:rows])
    return ContrastiveTrainer(model=model, args=args, train_dataset=data, processing_class=processor)


def hand_loss(text_states, text_mask, speech_states, speech_mask, tau=0.1):
    """The paper's loss, written out: masked means, cosine similarities / tau, cross-entropy text -> speech."""
    text = (text_states * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)
    speech = (speech_states * speech_mask[..., None]).sum(1) / speech_mask.sum(1, keepdim=True)
    text, speech = text / text.norm(dim=-1, keepdim=True), speech / speech.norm(dim=-1, keepdim=True)
    logits = text @ speech.T / tau
    return -(logits.diagonal() - logits.logsumexp(dim=1)).mean()


def test_published_loss_is_the_sum_over_layers_of_the_hand_written_loss(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")
    trainer = make_trainer(tmp_path, model, processor, contrastive_layers="all", sink_token="none")
    assert trainer.layers == [0, 1, 2]  # a 2-layer LLM: "all" is spaced like {0, 5, ..., 25, 32} and ends at the last
    batch = ContrastiveCollator(processor)(load_split("train")[:4])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        audio = model(input_features=batch["input_features"], feature_attention_mask=batch["feature_attention_mask"])
        speech_mask = (torch.arange(audio.audio_hidden_states.shape[1])[None] < audio.audio_lengths[:, None]).long()
        text_out = model.language_model(
            inputs_embeds=model.embed_tokens(batch["text_input_ids"]),
            attention_mask=batch["text_attention_mask"],
            output_hidden_states=True,
        )
        speech_out = model.language_model(
            inputs_embeds=audio.audio_hidden_states, attention_mask=speech_mask, output_hidden_states=True
        )
    expected = [
        hand_loss(
            text_out.hidden_states[layer], batch["text_attention_mask"], speech_out.hidden_states[layer], speech_mask
        )
        for layer in (0, 1, 2)
    ]
    torch.testing.assert_close(loss, sum(expected), rtol=1e-5, atol=1e-5)


def test_wasserstein_loss_is_the_hand_written_sinkhorn_of_unit_tokens(tmp_path):
    """The Wasserstein variant as the original computed it, on a fixed batch: for every (transcript, clip) pair, the
    unpadded token embeddings and projector outputs, each token L2-normalised in float32, geomloss's Sinkhorn
    divergence (p = 2, blur = 0.05); logits -distance / 0.1; cross-entropy text -> speech. Same loss, same gradient
    in the projector."""
    geomloss = pytest.importorskip("geomloss")
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")
    trainer = make_trainer(tmp_path, model, processor, contrastive_loss="wasserstein")
    batch = ContrastiveCollator(processor)(load_split("train")[:4])
    model.eval()
    loss = trainer.compute_loss(model, batch)
    grads = torch.autograd.grad(loss, list(model.projector.parameters()))

    sinkhorn = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05)
    audio = model(input_features=batch["input_features"], feature_attention_mask=batch["feature_attention_mask"])
    with torch.no_grad():
        text = model.embed_tokens(batch["text_input_ids"])
    texts = [t[m.bool()].float() for t, m in zip(text, batch["text_attention_mask"])]
    clips = [a[:n].float() for a, n in zip(audio.audio_hidden_states, audio.audio_lengths)]
    distances = torch.stack(
        [
            torch.stack([sinkhorn(F.normalize(t, p=2, dim=-1), F.normalize(c, p=2, dim=-1)) for c in clips])
            for t in texts
        ]
    )
    expected = F.cross_entropy(-distances / 0.1, torch.arange(4))
    expected_grads = torch.autograd.grad(expected, list(model.projector.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # atol as for the loss: the two sum the Sinkhorn iterations in different orders, and one machine's float32 left
    # one of 40,960 gradient elements 1.5e-6 apart (transformers 4.57), over the 1e-6 this allowed before.
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_text_branch_is_transcript_tokens_only():
    _, processor = from_preset("tiny")
    rows = load_split("train")[:2]
    batch = ContrastiveCollator(processor)(rows)
    for i, row in enumerate(rows):
        ids = batch["text_input_ids"][i][batch["text_attention_mask"][i].bool()]
        assert processor.tokenizer.decode(ids) == row["text"]
        assert processor.tokenizer.bos_token_id not in ids.tolist()
        speech = batch["speech_input_ids"][i][batch["speech_attention_mask"][i].bool()]
        assert set(speech.tolist()) == {processor.audio_token_id}  # the projector output alone, no prompt


def test_layer_zero_never_runs_the_llm(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, processor = from_preset("tiny")

    def refuse(*args, **kwargs):
        raise AssertionError("the LLM ran for a layer-0 loss")

    monkeypatch.setattr(model.language_model, "forward", refuse)
    trainer = make_trainer(tmp_path, model, processor, contrastive_layers="0")
    trainer.train()
    assert "loss_layer_0" in trainer.state.log_history[0]


def test_the_text_branch_runs_without_autograd(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny")
    # The LLM is frozen, so its outputs would hold no graph even with autograd on: record the mode instead.
    grad_enabled = []
    model.language_model.register_forward_hook(
        lambda module, args, output: grad_enabled.append(torch.is_grad_enabled())
    )
    trainer = make_trainer(tmp_path, model, processor, contrastive_layers="all")
    model.train()
    trainer.compute_loss(model, ContrastiveCollator(processor)(load_split("train")[:4]))
    assert grad_enabled == [False, True]  # the text pass, then the speech pass


def test_gradient_accumulation_averages_the_micro_batches(tmp_path):
    """GA 2 x batch 4 logs and applies the mean of its two micro-batches' losses and gradients, as two GA 1 runs on
    those micro-batches give them. (Not GA 1 x batch 8: the negatives of InfoNCE are the micro-batch's own, so a
    batch of 8 is another loss; the paper accumulated 2 micro-batches of 10.)"""
    rows = load_split("train")[:8]
    by_duration = sorted(rows, key=lambda row: -row["duration"])
    # Length-grouped batches of 8 clips split into the 4 longest, then the 4 shortest.
    runs = {}
    for name, data, accumulation in (
        ("both", rows, 2),
        ("longest", by_duration[:4], 1),
        ("shortest", by_duration[4:], 1),
    ):
        torch.manual_seed(0)
        model, processor = from_preset("tiny", projector_type="mlp")  # no dropout: the runs draw no random masks
        trainer = make_trainer(
            tmp_path / name,
            model,
            processor,
            rows=data,
            gradient_accumulation_steps=accumulation,
            optim="sgd",  # lr 1, no clipping: the update is minus the gradient
            learning_rate=1.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=0.0,
            contrastive_layers="all",
        )
        trainer.train()
        projector = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
        runs[name] = (trainer.state.log_history[0], projector)
    (both, updated), (longest, updated_longest), (shortest, updated_shortest) = runs.values()
    assert both["loss"] == pytest.approx((longest["loss"] + shortest["loss"]) / 2, rel=1e-5, abs=LOGGED_LOSS_STEP)
    assert both["loss"] == pytest.approx(both["loss_contrastive"], rel=1e-5, abs=LOGGED_LOSS_STEP / 2)
    for name, tensor in updated.items():
        torch.testing.assert_close(tensor, (updated_longest[name] + updated_shortest[name]) / 2, atol=1e-5, rtol=1e-5)


def test_encoder_augmentation_is_a_switch_of_the_run_not_of_the_saved_config(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny")
    modes = []
    model.encoder.register_forward_hook(lambda module, args, output: modes.append(module.training))
    trainer = make_trainer(
        tmp_path, model, processor, encoder_train_mode_augment=True, save_strategy="steps", save_steps=1
    )
    trainer.train()
    assert modes == [True]  # SpecAugment, dropout and LayerDrop were on in the training step
    trainer.evaluate(datasets.Dataset.from_list(load_split("dev")[:4]))
    assert modes == [True, False]  # and off in evaluation
    assert not model.train().encoder.training
    # A fine-tune started from the checkpoint must not augment unless it asks to.
    saved = json.loads((tmp_path / "checkpoint-1" / "config.json").read_text())
    assert not any("augment" in key for key in saved)
    with pytest.raises(ValueError, match="excludes a feature cache"):
        make_trainer(
            tmp_path, model, processor, encoder_train_mode_augment=True, feature_cache_dir=str(tmp_path / "c")
        )


def test_options_run_and_log_each_loss(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny")
    trainer = make_trainer(
        tmp_path,
        model,
        processor,
        contrastive_layers="0,2",
        ce_weight=1.0,
        position_shift=400,
        symmetric=True,
        learnable_temperature=True,
        save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss_layer_0", "loss_layer_2", "loss_contrastive", "loss_ce", "temperature"} <= set(logged)
    assert logged["loss"] == pytest.approx(logged["loss_contrastive"] + logged["loss_ce"], rel=1e-4)
    assert "contrastive_temperature.safetensors" in os.listdir(tmp_path / "checkpoint-1")

    wasserstein = make_trainer(tmp_path / "w", *from_preset("tiny"), contrastive_loss="wasserstein")
    assert wasserstein.layers == [0]
    wasserstein.train()
    assert torch.isfinite(torch.tensor(wasserstein.state.log_history[0]["loss"]))


def test_resuming_restores_the_learnable_temperature_exactly(tmp_path):
    def run(output_dir, resume_from_checkpoint=None):
        torch.manual_seed(0)
        model, processor = from_preset("tiny", projector_type="mlp")
        trainer = make_trainer(
            output_dir,
            model,
            processor,
            max_steps=4,
            learnable_temperature=True,
            learning_rate=5e-2,
            warmup_steps=0,
            save_strategy="steps",
            save_steps=2,
        )
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return trainer.temperature.log_inv_temperature.detach().clone()

    straight = run(tmp_path / "straight")
    assert straight != torch.tensor(math.log(1 / 0.1))  # it trained, so a resume from the initial value would differ
    resumed = run(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert torch.equal(resumed, straight)


def test_gathered_negatives_need_the_infonce_loss(tmp_path):
    with pytest.raises(ValueError, match="gather_negatives works with the InfoNCE loss only"):
        ContrastiveTrainingArguments(output_dir=str(tmp_path), gather_negatives=True, contrastive_loss="wasserstein")


def test_a_few_hundred_steps_raise_held_out_retrieval_far_above_chance(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", encoder_type="whisper", projector_type="qformer")
    # The encoder positions this test was set on: transformers 5.x initialises those of a WhisperEncoder subclass
    # N(0, 0.02), 4.57 as Whisper's sinusoids (2-8x chance here). The rest of this preset is the same on both.
    torch.nn.init.normal_(model.encoder.embed_positions.weight, std=0.02)
    dev = load_split("dev")
    before, _ = evaluate_retrieval(model, processor, dev, layers="all")
    trainer = make_trainer(
        tmp_path,
        model,
        processor,
        rows=320,
        max_steps=300,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        contrastive_layers="all",  # [0, 1, 2] on the 2-layer LLM
        feature_cache_dir=str(tmp_path / "cache"),
        logging_steps=50,
    )
    trainer.train()
    after, similarities = evaluate_retrieval(model, processor, dev, layers="all")
    chance = after["layer_0"]["chance_R@1"]
    print(f"\nheld-out retrieval, {len(dev)} clips, chance R@1 {chance:.4f}")
    for layer in ("layer_0", "layer_1", "layer_2"):
        print(
            f"{layer}: text->speech R@1 {before[layer]['text_to_speech/R@1']:.3f} -> "
            f"{after[layer]['text_to_speech/R@1']:.3f}, R@5 {after[layer]['text_to_speech/R@5']:.3f}; "
            f"speech->text R@1 {after[layer]['speech_to_text/R@1']:.3f}; "
            f"loss {before[layer]['loss']:.3f} -> {after[layer]['loss']:.3f}"
        )
        assert after[layer]["loss"] < before[layer]["loss"]
    # The embedding level and the LLM's last (post-norm) state both retrieve far above chance.
    assert after["layer_0"]["text_to_speech/R@1"] >= 5 * chance
    assert after["layer_2"]["text_to_speech/R@1"] >= 5 * chance
    paths = write_retrieval_report(after, similarities, tmp_path / "report")
    assert json.loads(Path(paths[0]).read_text())["layer_0"]["chance_R@1"] == chance
    assert Path(paths[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def sink_inputs(processor, rows=4):
    """A contrastive batch of clips of different lengths, so both branches hold padding."""
    return ContrastiveCollator(processor)(load_split("train")[:rows])


def test_the_published_form_is_unchanged_bit_for_bit():
    """sink_token='none': the LLM sees the bare transcript and the bare projector output, and the states returned are
    its hidden states over the whole (right-padded) span, exactly."""
    model, processor = tiny(projector_type="mlp")
    batch = sink_inputs(processor)
    with torch.no_grad():
        states, outputs = contrastive_states(model, model, batch, [0, 1, 2], sink_token_id=None)
        text = model.language_model(
            inputs_embeds=model.embed_tokens(batch["text_input_ids"]),
            attention_mask=batch["text_attention_mask"],
            output_hidden_states=True,
        ).hidden_states
    speech_mask = batch["speech_attention_mask"]
    assert torch.equal(states[0][0], model.embed_tokens(batch["text_input_ids"]).detach())
    for layer in (1, 2):
        text_states, text_mask, speech_states, mask = states[layer]
        assert torch.equal(text_states, text[layer]) and torch.equal(text_mask, batch["text_attention_mask"])
        assert torch.equal(speech_states, outputs.hidden_states[layer]) and torch.equal(mask, speech_mask)
    assert outputs.hidden_states[0].shape[1] == speech_mask.shape[1]  # nothing was prepended


@pytest.mark.parametrize("shift", [None, 7])
def test_the_sink_token_leads_both_branches_and_its_position_is_never_pooled(shift):
    model, processor = tiny(projector_type="mlp")
    batch = sink_inputs(processor)
    bos = processor.tokenizer.bos_token_id
    shifts = None if shift is None else torch.full((4,), shift)
    with torch.no_grad():
        states, outputs = contrastive_states(model, model, batch, [0, 1, 2], shift=shifts, sink_token_id=bos)
        audio = model(input_features=batch["input_features"], feature_attention_mask=batch["feature_attention_mask"])
    speech_ids = outputs.hidden_states[0]
    assert speech_ids.shape[1] == batch["speech_input_ids"].shape[1] + 1  # one leading position was run...
    torch.testing.assert_close(speech_ids[:, 0], model.embed_tokens(torch.tensor([bos]))[0].expand(4, -1))
    for layer in (0, 1, 2):  # ...and is left out of what is pooled, at every layer, with the unprefixed masks
        text_states, text_mask, speech_states, speech_mask = states[layer]
        assert torch.equal(text_mask, batch["text_attention_mask"])
        assert torch.equal(speech_mask, batch["speech_attention_mask"])
        assert text_states.shape[1] == text_mask.shape[1] and speech_states.shape[1] == speech_mask.shape[1]
    # Layer 0 does not depend on the sink: the token embeddings and the projector output themselves.
    assert torch.equal(states[0][0], model.embed_tokens(batch["text_input_ids"]).detach())
    assert torch.equal(states[0][2], audio.audio_hidden_states)
    # Each row, run alone with its sink and no padding, gives the batched row over its valid positions: padding
    # stays invisible with the extra column, and the sink sits at position 0 (plus the shift) in both branches.
    for row in range(4):
        text_ids = batch["text_input_ids"][row][batch["text_attention_mask"][row].bool()]
        embeds = {
            "text": model.embed_tokens(torch.cat([torch.tensor([bos]), text_ids]))[None],
            "speech": torch.cat(
                [
                    model.embed_tokens(torch.tensor([bos]))[None],
                    audio.audio_hidden_states[row : row + 1, : audio.audio_lengths[row]],
                ],
                1,
            ),
        }
        for branch, index, mask_index in (("text", 0, 1), ("speech", 2, 3)):
            length = embeds[branch].shape[1]
            positions = torch.arange(length)[None] + (shift or 0)
            with torch.no_grad():
                alone = model.language_model(
                    inputs_embeds=embeds[branch], position_ids=positions, output_hidden_states=True
                ).hidden_states
            for layer in (1, 2):
                valid = states[layer][mask_index][row].bool()
                torch.testing.assert_close(states[layer][index][row][valid], alone[layer][0, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sink", [False, True])
def test_the_position_shift_changes_nothing_under_rotary_embeddings(sink):
    """The tiny LLM uses RoPE, as Llama-3.1 does: a shift shared by a whole sequence leaves every attention score, so
    every hidden state, as it was (up to float32 rounding), although the shifted positions do reach the LLM."""
    model, processor = tiny(projector_type="mlp")
    batch = sink_inputs(processor)
    sink_id = processor.tokenizer.bos_token_id if sink else None
    shift = torch.tensor([0, 7, 120, 399])
    with torch.no_grad():
        plain, _ = contrastive_states(model, model, batch, [1, 2], sink_token_id=sink_id)
        shifted, outputs = contrastive_states(model, model, batch, [1, 2], shift=shift, sink_token_id=sink_id)
    for layer in (1, 2):
        for index in (0, 2):  # text states, speech states, at their valid positions (padding is never pooled)
            valid = plain[layer][index + 1].bool()
            torch.testing.assert_close(shifted[layer][index][valid], plain[layer][index][valid], rtol=1e-5, atol=1e-5)
    positions = []
    handle = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(kwargs["position_ids"]), with_kwargs=True
    )
    with torch.no_grad():
        contrastive_states(model, model, batch, [1], shift=shift, sink_token_id=sink_id)
    handle.remove()
    for ids, mask in zip(positions, (batch["text_attention_mask"], batch["speech_attention_mask"])):
        first = ids[:, 0] if sink else ids[torch.arange(4), mask.argmax(1)]  # the first valid position of each row
        assert first.tolist() == shift.tolist()


def test_the_sink_token_is_resolved_from_the_tokenizer(tmp_path):
    _, processor = tiny()
    tokenizer, audio_id = processor.tokenizer, processor.audio_token_id
    assert sink_token_id(tokenizer, "none", audio_id) is None
    assert sink_token_id(tokenizer, "bos", audio_id) == tokenizer.bos_token_id
    assert sink_token_id(tokenizer, "<|end|>", audio_id) == tokenizer.convert_tokens_to_ids("<|end|>")
    without_bos = copy.deepcopy(tokenizer)
    without_bos.bos_token = None
    assert sink_token_id(without_bos, "bos", audio_id) == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="names no token"):
        sink_token_id(tokenizer, "not a token", audio_id)
    with pytest.raises(ValueError, match="audio placeholder"):
        sink_token_id(tokenizer, processor.audio_token, audio_id)
    assert ContrastiveTrainingArguments(output_dir=str(tmp_path)).sink_token == "bos"
