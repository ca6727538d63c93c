"""BLSP continuation writing (speechllm-hf continue-writing) and ContinuationTrainer (CE and KL distillation)."""

import json
import math
import os

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_TRAINING, LOGGED_LOSS_STEP, launch_two_cpu_processes

from speechllm_hf import from_preset
from speechllm_hf.cli import main
from speechllm_hf.data.collators import IGNORE_INDEX, ContinuationCollator
from speechllm_hf.data.tasks import PromptConfig
from speechllm_hf.preprocessing.continuation import (
    BLSP_CONTINUATION_INSTRUCTION,
    ContinuationPrompt,
    make_normalizer,
    parts_dir,
    report_path,
    write_continuations,
)
from speechllm_hf.presets import BLSP_CHAT_TEMPLATE
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.continuation import (
    ContinuationTrainer,
    ContinuationTrainingArguments,
    distillation_kl,
    response_logits,
)
from speechllm_hf.training.trainer import logits_to_keep

CONTINUATIONS = ["and then they fly away.", "it is red.", "so we play with them all day.", "we go home."]


def write_manifest(path, n=8):
    """The first `n` corpus rows; rows 2 and 5 are too long for a 192-token prompt and row 6 has no text."""
    rows = load_split("train")[:n]
    # Over 192 tokens with any tokenizer of the tiny preset, characters or words.
    changes = {2: "seven red boxes are on the table " * 30, 5: "turn the blue light off " * 40, 6: None}
    for index, text in changes.items():
        if index < n:
            rows[index]["text"] = text
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def tiny_llm():
    """The tiny preset's LLM as `continue-writing --preset tiny --seed 0` builds it."""
    torch.manual_seed(0)
    model, processor = from_preset("tiny")
    return model.language_model.eval(), processor.tokenizer


def continuation_rows(n=4):
    rows = load_split("train")[:n]
    for row, continuation in zip(rows, CONTINUATIONS):
        row["continuation"] = continuation
    return rows


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def training_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        **CPU_TRAINING,
    )
    return ContinuationTrainingArguments(**{**settings, **overrides})


# --------------------------------------------------------------------------------------------------------------------
# continue-writing


def test_one_row_per_kept_input_in_input_order_and_drops_counted(tmp_path):
    rows = write_manifest(tmp_path / "m.jsonl")
    model, tokenizer = tiny_llm()
    output = tmp_path / "out.jsonl"
    report = write_continuations(
        model, tokenizer, tmp_path / "m.jsonl", output, model_name="tiny", batch_size=3, max_new_tokens=6
    )
    assert report["dropped"] == {"missing_text": 1, "too_long": 2, "empty_continuation": 0}
    assert report["total"] == 8 and report["kept"] == 5
    assert (
        report["output_column"] == "continuation"
        and "'text' still holds the transcript" in report["output_column_note"]
    )
    assert json.loads(report_path(output).read_text()) == report
    written = read_jsonl(output)
    kept = [row for i, row in enumerate(rows) if i not in (2, 5, 6)]
    assert [{k: v for k, v in row.items() if k != "continuation"} for row in written] == kept
    assert all(row["continuation"] for row in written)
    assert not parts_dir(output).exists()

    # Batched with left padding, each row gets what the model writes for its prompt alone.
    ids = ContinuationPrompt(tokenizer).encode([rows[7]["text"]])
    alone = model.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(alone[0, len(ids[0]) :], skip_special_tokens=True).strip() == written[-1]["continuation"]


def test_a_killed_run_resumes_to_the_same_file(tmp_path, monkeypatch):
    write_manifest(tmp_path / "m.jsonl")
    model, tokenizer = tiny_llm()
    settings = dict(model_name="tiny", batch_size=2, max_new_tokens=6)
    uninterrupted = write_continuations(model, tokenizer, tmp_path / "m.jsonl", tmp_path / "a.jsonl", **settings)

    generate, generated = model.generate, []

    def killed_after_one_batch(*args, **kwargs):
        if generated:
            raise KeyboardInterrupt
        generated.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        write_continuations(model, tokenizer, tmp_path / "m.jsonl", tmp_path / "b.jsonl", **settings)
    part = parts_dir(tmp_path / "b.jsonl") / "part-00000.jsonl"
    assert len(read_jsonl(part)) == 2 and not (tmp_path / "b.jsonl").exists()
    with open(part, "a") as file:  # killed in the middle of writing the next line
        file.write('{"index": 7, "contin')

    with pytest.raises(ValueError, match="max_new_tokens differ"):
        write_continuations(
            model, tokenizer, tmp_path / "m.jsonl", tmp_path / "b.jsonl", **{**settings, "max_new_tokens": 5}
        )

    def counting(*args, **kwargs):
        generated.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    resumed = write_continuations(model, tokenizer, tmp_path / "m.jsonl", tmp_path / "b.jsonl", **settings)
    assert sum(generated) == 2 + 3  # the 3 rows left, nothing twice
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert {**resumed, "output": None} == {**uninterrupted, "output": None}


def test_two_processes_write_the_same_file_as_one(tmp_path):
    write_manifest(tmp_path / "m.jsonl", n=7)
    command = ["continue-writing", "--preset", "tiny", "--manifest", str(tmp_path / "m.jsonl")]
    command += ["--max_new_tokens", "6", "--batch_size", "2", "--cpu"]
    assert main(command + ["--output_file", str(tmp_path / "one.jsonl")]) == 0

    result = launch_two_cpu_processes(
        ["-m", "speechllm_hf", *command, "--output_file", str(tmp_path / "two.jsonl")], timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Process 1 of 2:" in result.stderr
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    one, two = (json.loads(report_path(tmp_path / f"{n}.jsonl").read_text()) for n in ("one", "two"))
    assert {**two, "output": None} == {**one, "output": None} and one["kept"] == 4


def test_prompts_and_normaliser():
    _, tokenizer = tiny_llm()
    blsp = ContinuationPrompt(tokenizer)
    assert blsp.text("i see birds") == f"###[Human]:{BLSP_CONTINUATION_INSTRUCTION} i see birds\n\n\n###[Assistant]:"
    text_ids = tokenizer(blsp.text("i see birds"), add_special_tokens=False)["input_ids"]
    assert blsp.encode(["i see birds"])[0] == [tokenizer.bos_token_id] + text_ids
    chat = ContinuationPrompt(tokenizer, style="chat")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{BLSP_CONTINUATION_INSTRUCTION} i see birds"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert chat.text("i see birds") == rendered
    assert chat.encode(["i see birds"])[0] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # Whisper's English normaliser; without normalizer.json British spellings stay.
    assert make_normalizer()("Seven RED boxes, in the colour-box!") == "7 red boxes in the colour box"


# --------------------------------------------------------------------------------------------------------------------
# ContinuationTrainer


def test_blsp_format_labels_only_the_continuation_and_eos(tmp_path):
    model, processor = from_preset("tiny", projector_type="mlp", chat_template=BLSP_CHAT_TEMPLATE)
    tokenizer = processor.tokenizer
    rows = continuation_rows(2)
    collator = ContinuationCollator(processor, with_teacher=True, prompts=PromptConfig.from_file("blsp"))
    batch = collator(rows)
    human = f"<s>###[Human]:{BLSP_CONTINUATION_INSTRUCTION}"
    for i, row in enumerate(rows):
        # BLSP's `###[Human]:{instruction}<speech>\n\n\n###[Assistant]:{continuation}</s>`, BOS first.
        prompt, response = collator.prompt_and_response(row)
        assert prompt == f"{human}<audio>\n\n\n###[Assistant]:" and response == row["continuation"] + "</s>"
        # The teacher reads what continue-writing prompted the text LLM with: a space between instruction and text.
        assert collator.teacher_prompt(row) == f"{human} {row['text']}\n\n\n###[Assistant]:"
        teacher_prompt = tokenizer(collator.teacher_prompt(row), add_special_tokens=False)["input_ids"]
        assert teacher_prompt == ContinuationPrompt(tokenizer).encode([row["text"]])[0]

        ids, labels = batch["input_ids"][i], batch["labels"][i]
        length = int(batch["attention_mask"][i].sum())
        labelled = (labels != IGNORE_INDEX).nonzero().flatten()
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        assert labelled.tolist() == list(range(length - len(response_ids), length))  # the last tokens, nothing else
        assert labels[labelled].tolist() == ids[labelled].tolist() == response_ids
        assert response_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labels[labelled], skip_special_tokens=True).strip() == row["continuation"]
        audio = ids == processor.audio_token_id
        assert audio.sum() > 0 and (labels[audio] == IGNORE_INDEX).all()

        teacher_length = int(batch["teacher_attention_mask"][i].sum())
        teacher_ids, teacher_labels = batch["teacher_input_ids"][i], batch["teacher_labels"][i]
        assert teacher_ids[:teacher_length].tolist() == teacher_prompt + response_ids
        assert teacher_labels[:teacher_length].tolist() == [IGNORE_INDEX] * len(teacher_prompt) + response_ids
        assert (teacher_labels[teacher_length:] == IGNORE_INDEX).all()

    # Speech positions never count: the model masks them even when the labels hold tokens there.
    student = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    corrupted = batch["labels"].masked_fill(batch["input_ids"] == processor.audio_token_id, 7)
    model.eval()
    with torch.no_grad():
        loss = model(**student).loss
        torch.testing.assert_close(model(**{**student, "labels": corrupted}).loss, loss)
        trainer = ContinuationTrainer(model=model, args=training_args(tmp_path), processing_class=processor)
        torch.testing.assert_close(trainer.compute_loss(model, {**student, "labels": corrupted}), loss)


def test_distillation_kl_is_zero_for_equal_logits_and_matches_a_hand_computation():
    logits = torch.randn(5, 7)
    assert torch.equal(distillation_kl(logits, logits.clone()), torch.zeros(5))

    student, teacher, temperature = [1.0, 0.0, -1.0], [0.0, 2.0, 0.0], 2.0
    p = [math.exp(t / temperature) for t in teacher]
    p = [x / sum(p) for x in p]
    q = [math.exp(s / temperature) for s in student]
    q = [x / sum(q) for x in q]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # BLSP-Emo's: no T^2
    kl = distillation_kl(torch.tensor([student]), torch.tensor([teacher]), temperature)
    assert kl.item() == pytest.approx(expected, rel=1e-6) and expected > 0.1
    hinton = distillation_kl(torch.tensor([student]), torch.tensor([teacher]), temperature, temperature_squared=True)
    assert hinton.item() == pytest.approx(temperature**2 * expected, rel=1e-6)

    # Position t predicts token t + 1: labels on positions 2 and 3 select the logits of positions 1 and 2; BLSP-Emo
    # takes those of positions 2 and 3.
    logits = torch.arange(12.0).reshape(1, 4, 3)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6]])
    assert torch.equal(response_logits(logits, labels), logits[0, 1:3])
    assert torch.equal(response_logits(logits, labels, "blsp-emo"), logits[0, 2:4])


def test_the_kl_term_is_blsp_emos_hand_written_kl_div_at_the_positions_chosen(tmp_path):
    """BLSP-Emo's response KL as its code writes it, on a fixed batch: `F.kl_div(log_softmax(student / T),
    softmax(teacher / T), reduction="batchmean")` over `logits[labels != -100]` of each model, no T^2. The trainer
    gives exactly that with kl_positions="blsp-emo"; by default it takes the logits one position earlier (those that
    predict the response tokens); kl_temperature_squared multiplies by T^2."""
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp", chat_template=BLSP_CHAT_TEMPLATE)
    with torch.no_grad():  # sharper distributions: comparing other positions shows in the value
        model.language_model.lm_head.weight.mul_(20)
    model.eval()
    collator = ContinuationCollator(processor, with_teacher=True, prompts=PromptConfig.from_file("blsp"))
    batch = collator(continuation_rows(3))
    with torch.no_grad():
        student_logits = model(**{k: v for k, v in batch.items() if not k.startswith("teacher_")}).logits
        teacher_logits = model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"])
    teacher_logits = teacher_logits.logits

    def blsp_emo_kl(student, labels, teacher, teacher_labels, temperature=2.0):
        return F.kl_div(
            F.log_softmax(student[labels != IGNORE_INDEX] / temperature, dim=-1),
            F.softmax(teacher[teacher_labels != IGNORE_INDEX] / temperature, dim=-1),
            reduction="batchmean",
        )

    labels, teacher_labels = batch["labels"], batch["teacher_labels"]
    at_tokens = blsp_emo_kl(student_logits, labels, teacher_logits, teacher_labels)
    predicting = blsp_emo_kl(student_logits[:, :-1], labels[:, 1:], teacher_logits[:, :-1], teacher_labels[:, 1:])
    losses = {}
    for positions, squared, expected in (
        ("blsp-emo", False, at_tokens),
        ("aligned", False, predicting),
        ("aligned", True, 4 * predicting),
    ):
        args = training_args(
            tmp_path, ce_weight=0.0, kl_weight=1.0, kl_positions=positions, kl_temperature_squared=squared
        )
        trainer = ContinuationTrainer(model=model, args=args, processing_class=processor)
        with torch.no_grad():
            losses[positions, squared] = trainer.compute_loss(model, batch)
        torch.testing.assert_close(losses[positions, squared], expected, rtol=1e-5, atol=1e-6)
    assert abs(at_tokens - predicting) > 0.01 * predicting  # the two position sets are told apart


def test_kl_is_zero_end_to_end_when_the_speech_features_are_the_transcript_embeddings(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp", chat_template=BLSP_CHAT_TEMPLATE)
    with torch.no_grad():  # sharper next-token distributions, so that a wrong input shows in the KL
        model.language_model.lm_head.weight.mul_(20)
    model.eval()
    tokenizer = processor.tokenizer
    rows = continuation_rows(2)  # transcripts of different lengths
    collator = ContinuationCollator(processor, with_teacher=True, prompts=PromptConfig.from_file("blsp"))
    batch = collator(rows)
    trainer = ContinuationTrainer(
        model=model, args=training_args(tmp_path, ce_weight=0.0, kl_weight=1.0), processing_class=processor
    )
    with torch.no_grad():
        assert trainer.compute_loss(model, batch) > 0.01  # real (random-projector) speech: far from the teacher

    # The student reads the teacher's sequence with its transcript tokens replaced by audio tokens, behind 3 extra
    # left pads (so its absolute positions differ), and the "speech features" are those tokens' embeddings. The
    # transcript tokens are the teacher's tokens that the student's own sequence does not share at either end.
    pads = 3
    input_ids = torch.nn.functional.pad(batch["teacher_input_ids"], (pads, 0), value=tokenizer.pad_token_id)
    attention_mask = torch.nn.functional.pad(batch["teacher_attention_mask"], (pads, 0), value=0)
    labels = torch.nn.functional.pad(batch["teacher_labels"], (pads, 0), value=IGNORE_INDEX)
    transcripts = []
    for i, row in enumerate(rows):
        student_ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        teacher_ids = batch["teacher_input_ids"][i][batch["teacher_attention_mask"][i].bool()].tolist()
        prefix = next(n for n, (a, b) in enumerate(zip(student_ids + [None], teacher_ids)) if a != b)
        suffix = next(n for n, (a, b) in enumerate(zip(student_ids[::-1] + [None], teacher_ids[::-1])) if a != b)
        span = teacher_ids[prefix : len(teacher_ids) - suffix]
        assert processor.audio_token_id not in teacher_ids and row["text"][-5:] in tokenizer.decode(span)
        transcripts.append(span)
        input_ids[i, pads + prefix : pads + len(teacher_ids) - suffix] = processor.audio_token_id
    lengths = torch.tensor([len(t) for t in transcripts])
    embeddings = model.get_input_embeddings()(
        torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in transcripts], batch_first=True)
    )
    monkeypatch.setattr(model, "get_audio_features", lambda *args, **kwargs: (embeddings, lengths))
    student = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "input_features": batch["input_features"],
        "feature_attention_mask": batch["feature_attention_mask"],
    }
    teacher = {k: v for k, v in batch.items() if k.startswith("teacher_")}
    with torch.no_grad():
        assert trainer.compute_loss(model, {**student, **teacher}).item() == pytest.approx(0.0, abs=1e-5)


def test_the_teacher_is_the_llm_without_its_lora_adapter(tmp_path):
    from speechllm_hf.training.lora import add_lora

    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")
    model.eval()
    batch = ContinuationCollator(processor, with_teacher=True)(continuation_rows(2))
    teacher = {key.removeprefix("teacher_"): batch[key] for key in ("teacher_input_ids", "teacher_attention_mask")}
    teacher["labels"] = batch["teacher_labels"]
    trainer = ContinuationTrainer(model=model, args=training_args(tmp_path, kl_weight=1.0), processing_class=processor)
    before = trainer.teacher_response_logits(model, teacher, batch["labels"])
    add_lora(model, r=2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
        student = model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"])
    assert not torch.allclose(response_logits(student.logits, batch["teacher_labels"]), before)  # LoRA is active
    torch.testing.assert_close(trainer.teacher_response_logits(model, teacher, batch["labels"]), before)


def test_a_few_steps_lower_the_continuation_cross_entropy(tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")  # no dropout: a deterministic run
    dataset = datasets.Dataset.from_list(continuation_rows(2))  # one batch, seen at every step
    args = training_args(
        tmp_path, max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="constant"
    )
    trainer = ContinuationTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6 and "loss_kl" not in logs[0]
    assert logs[0]["loss_ce"] == pytest.approx(logs[0]["loss"], rel=1e-6, abs=LOGGED_LOSS_STEP / 2)
    # The frozen LLM is random, so the speech can only steer it a little; the run is the same every time.
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.05


def test_the_loss_is_the_base_trainers_with_response_logits_only_and_each_tasks_loss(tmp_path):
    """The cross-entropy goes through SpeechLlmTrainer's loss: logits from the position before the first label on (the
    same loss, KL included, as with every position's logits) and `loss_<task>` for rows of several tasks."""
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")
    model.eval()  # no dropout; the metrics are recorded as evaluation's
    rows = continuation_rows(4)
    for index, row in enumerate(rows):
        row["task"] = "asr" if index % 2 else "continuation"
    args = training_args(tmp_path, kl_weight=0.5)
    trainer = ContinuationTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor
    )
    collator = trainer.data_collator
    assert isinstance(collator, ContinuationCollator) and collator.with_teacher and collator.return_task_ids
    batch = collator(rows)
    recorded = trainer._metrics["eval"]
    with torch.no_grad():
        full_loss, full_outputs = trainer.compute_loss(model, {**batch, "logits_to_keep": 0}, return_outputs=True)
        recorded.clear()
        loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    length = batch["labels"].shape[1]
    assert outputs.logits.shape[1] == logits_to_keep(batch["labels"]) < length == full_outputs.logits.shape[1]
    torch.testing.assert_close(loss, full_loss)

    mixed = {name: list(values) for name, values in recorded.items()}
    assert set(mixed) == {"loss_ce", "loss_kl", "loss_asr", "loss_continuation"}
    for task in ("asr", "continuation"):
        recorded.clear()
        with torch.no_grad():
            trainer.compute_loss(model, collator([row for row in rows if row["task"] == task]))
        # A task's loss over the mixed batch is the cross-entropy of its rows alone, per response token.
        assert mixed[f"loss_{task}"] == [pytest.approx(recorded["loss_ce"][0], rel=1e-5)]


def test_gradient_accumulation_matches_the_full_batch_with_kl(tmp_path):
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model, processor = from_preset("tiny", projector_type="mlp")
        args = training_args(
            tmp_path / str(batch_size),
            max_steps=2,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            kl_weight=0.5,
        )
        dataset = datasets.Dataset.from_list(continuation_rows(4))
        trainer = ContinuationTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
        trainer.train()
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        results.append((losses, {n: p.detach().clone() for n, p in model.projector.named_parameters()}))
    (full_losses, full_state), (accumulated_losses, accumulated_state) = results
    assert full_losses.keys() == accumulated_losses.keys() == {1, 2}
    for step in full_losses:
        assert accumulated_losses[step] == pytest.approx(full_losses[step], rel=1e-5)
    for name, tensor in full_state.items():
        # Adam divides by the gradients' own scale, which magnifies summation-order noise where they are tiny.
        torch.testing.assert_close(accumulated_state[name], tensor, atol=1e-5, rtol=1e-5)


def test_arguments_follow_blsp_stage_2_and_stay_fp32_on_cpu(tmp_path):
    args = ContinuationTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert (args.learning_rate, args.weight_decay, args.warmup_steps, args.num_train_epochs) == (5e-5, 0.05, 1000, 1)
    assert (args.task, args.prompt_file, args.ce_weight, args.kl_weight, args.kl_temperature) == (
        "continuation",
        "blsp",
        1.0,
        0.0,
        2.0,
    )
    # The KL's form when it is on: BLSP-Emo's scale (no T^2), at the positions that predict the response tokens.
    assert (args.kl_temperature_squared, args.kl_positions) == (False, "aligned")
    assert not args.bf16 and not args.fp16
    with pytest.raises(ValueError, match="not both 0"):
        ContinuationTrainingArguments(output_dir=str(tmp_path), use_cpu=True, ce_weight=0.0)
    with pytest.raises(ValueError, match="kl_positions must be one of aligned, blsp-emo"):
        ContinuationTrainingArguments(output_dir=str(tmp_path), use_cpu=True, kl_positions="shifted")


def test_cli_writes_continuations_then_trains_on_them_with_kl(tmp_path):
    write_manifest(tmp_path / "m.jsonl", n=4)
    output = tmp_path / "continuations.jsonl"
    argv = ["continue-writing", "--preset", "tiny", "--manifest", str(tmp_path / "m.jsonl")]
    assert main(argv + ["--output_file", str(output), "--max_new_tokens", "4", "--normalize"]) == 0
    assert len(read_jsonl(output)) == 3
    argv = ["train", "--method", "continuation", "--preset", "tiny", "--output_dir", str(tmp_path / "run")]
    argv += ["--train_manifest", str(output), "--max_steps", "1", "--per_device_train_batch_size", "3"]
    argv += ["--use_cpu", "--kl_weight", "1", "--warmup_steps", "0", "--save_strategy", "no", "--report_to", "none"]
    assert main(argv) == 0
    assert "config.json" in os.listdir(tmp_path / "run")
