"""Mixed speech-text sequences: the collator's labels, the next-word training mode and the contrastive variant."""

import datasets
import pytest
import torch

from speechllm_hf import from_preset
from speechllm_hf.data.collators import IGNORE_INDEX, MixedSpeechTextCollator
from speechllm_hf.data.mixed import end_of_turn_token
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.contrastive import ContrastiveTrainer, ContrastiveTrainingArguments
from speechllm_hf.training.trainer import SpeechLlmTrainer

# The 12 `aligned` clips were synthesised word by word: their word times are exact.
ROWS = load_split("aligned")


def test_labels_cover_the_text_spans_and_end_of_turn_only():
    _, processor = from_preset("tiny")
    collator = MixedSpeechTextCollator(processor, seed=3)
    batch = collator(ROWS[:4])
    tokenizer = processor.tokenizer
    for i, row in enumerate(ROWS[:4]):
        spans = collator.spans(row)
        assert spans == collator.spans(row)  # the same spans every time: resumable, order-independent
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        text_words = [w for span in spans if span["kind"] == "text" for w in span["words"]]
        expected = " ".join(text_words) + end_of_turn_token(tokenizer)  # the tiny template's <|end|>
        assert tokenizer.decode(labelled).split() == expected.split()
        audio = batch["input_ids"][i] == processor.audio_token_id
        assert (batch["labels"][i][audio] == IGNORE_INDEX).all()
    speech_spans = sum(span["kind"] == "speech" for row in ROWS[:4] for span in collator.spans(row))
    assert batch["input_features"].shape[0] == speech_spans  # each speech span is its own clip


def test_next_word_training_on_mixed_sequences(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")
    before = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    args = SpeechLlmTrainingArguments(
        output_dir=str(tmp_path),
        task="mixed",
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        warmup_steps=0,
    )
    trainer = SpeechLlmTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(ROWS), processing_class=processor
    )
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    assert any(not torch.equal(before[n], p) for n, p in model.projector.named_parameters())


@pytest.mark.parametrize("sink_token", ["none", "bos"])
def test_contrastive_between_a_mixed_sequence_and_its_text_runs_each_sequence_through_the_llm_once(
    tmp_path, sink_token
):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")  # no dropout: training computes what eval does
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path),
        speech_input="mixed",
        sink_token=sink_token,
        contrastive_layers="0,2",
        ce_weight=1.0,
        max_steps=1,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = ContrastiveTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(ROWS[:4]), processing_class=processor
    )
    batch = trainer.data_collator(ROWS[:4])
    model_inputs = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "labels")
    inputs = {key: batch[key] for key in model_inputs}
    if sink_token == "bos":  # the sink leads the mixed sequence (left-padded) as a valid, unlabelled position
        lead = torch.full((4, 1), processor.tokenizer.bos_token_id)
        inputs["input_ids"] = torch.cat([lead, inputs["input_ids"]], 1)
        inputs["attention_mask"] = torch.cat([torch.ones_like(lead), inputs["attention_mask"]], 1)
        inputs["labels"] = torch.cat([torch.full_like(lead, -100), inputs["labels"]], 1)
    with torch.no_grad():
        expected = model(**inputs).loss  # the next-word loss, run on its own
    rows = []
    model.language_model.register_forward_hook(
        lambda module, args, kwargs, output: rows.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )
    trainer.train()
    assert rows == [4, 4]  # the transcripts, then the mixed sequences with their labels: no second copy
    logged = trainer.state.log_history[0]
    assert {"loss_layer_0", "loss_layer_2", "loss_ce"} <= set(logged)
    assert logged["loss_ce"] == pytest.approx(expected.item(), rel=1e-5)
