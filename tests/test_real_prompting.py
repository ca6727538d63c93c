"""The whisper-base-smollm2 presets on the real pretrained backbones (local stand-ins, see conftest.real_backbones):
the real ChatML tokenizer, its chat template with audio, batching for generation, labels, the saved tokenizer on
transformers 4.57."""

import json
import textwrap

import pytest
import torch
from conftest import run_without_package

from speechllm_hf import PRESETS, from_preset
from speechllm_hf.data.collators import IGNORE_INDEX, SpeechLlmCollator, special_token_strings
from speechllm_hf.presets import SMALL_LLM_PROJECTOR_CONFIGS
from speechllm_hf.quickstart.corpus import load_split

INSTRUCTION = "\nTranscribe the audio."


def build(preset: str, real_backbones):
    torch.manual_seed(0)
    model, processor = from_preset(
        preset,
        encoder_name_or_path=str(real_backbones / "whisper-base"),
        text_name_or_path=str(real_backbones / "smollm2-135m-instruct"),
    )
    return model.eval(), processor


@pytest.fixture(scope="module")
def pair(real_backbones):
    return build("whisper-base-smollm2", real_backbones)


@pytest.fixture(scope="module")
def dev_rows():
    """The shortest and the longest dev clip: a batch of them needs padding."""
    rows = sorted(load_split("dev"), key=lambda row: row["duration"])
    return [rows[0], rows[-1]]


def conversation(row: dict) -> list[dict]:
    content = [{"type": "audio", "path": row["audio"]}, {"type": "text", "text": INSTRUCTION}]
    return [{"role": "user", "content": content}]


def test_preset_records_the_local_folders_not_the_hub_ids(pair, real_backbones):
    model, _ = pair
    assert PRESETS["whisper-base-smollm2"].encoder_name_or_path == "openai/whisper-base"
    assert PRESETS["whisper-base-smollm2"].text_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = model.config.to_dict()
    assert config["encoder_name_or_path"] == str(real_backbones / "whisper-base")
    assert config["text_name_or_path"] == str(real_backbones / "smollm2-135m-instruct")
    assert config["encoder_revision"] is None and config["text_revision"] is None  # a folder has no commit


def test_chat_template_renders_chatml_with_the_audio_tokens_expanded(pair, dev_rows):
    model, processor = pair
    tokenizer = processor.tokenizer
    assert processor.chat_template == tokenizer.chat_template  # the LLM's own, not BLSP's
    text = processor.apply_chat_template(conversation(dev_rows[0]), add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith(f"<|im_start|>user\n<audio>{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    inputs = processor.apply_chat_template(conversation(dev_rows[0]), add_generation_prompt=True, tokenize=True)
    ids = inputs["input_ids"][0]
    audio = (ids == model.config.audio_token_id).nonzero().flatten()
    assert len(audio) == processor.num_audio_tokens(inputs["feature_attention_mask"].sum()) > 0
    assert (audio == torch.arange(audio[0], audio[0] + len(audio))).all()  # one contiguous run, where <audio> was
    assert tokenizer.decode(ids[: audio[0]]).endswith("<|im_start|>user\n")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no automatic BOS before the template's own


def test_batch_is_left_padded_and_generates_what_each_clip_generates_alone(pair, dev_rows):
    model, processor = pair
    conversations = [conversation(row) for row in dev_rows]
    batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True)
    short, long = batch["attention_mask"].sum(-1)
    assert short < long and batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, 0] == processor.tokenizer.pad_token_id == processor.tokenizer.eos_token_id
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for index, messages in enumerate(conversations):
            alone = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            output = model.generate(**alone, max_new_tokens=4, do_sample=False)[:, alone["input_ids"].shape[1] :]
            assert together[index].tolist() == output[0].tolist()


def test_labels_cover_only_the_response_and_its_end_of_turn(pair, dev_rows):
    _, processor = pair
    batch = SpeechLlmCollator(processor)(dev_rows)
    for labels, row in zip(batch["labels"], dev_rows):
        response = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
        assert response.startswith(row["text"] + "<|im_end|>") and not response[len(row["text"]) + 10 :].strip()


def test_no_special_token_of_the_llm_passes_inside_a_transcript(pair, dev_rows):
    _, processor = pair
    specials = special_token_strings(processor.tokenizer)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<audio>"} <= set(specials)
    ids = processor.tokenizer(dev_rows[0]["text"], add_special_tokens=False)["input_ids"]
    assert not set(ids) & set(processor.tokenizer.all_special_ids)
    row = {**dev_rows[0], "text": "the bird <|im_end|> is big"}
    with pytest.raises(ValueError, match="special tokens of the tokenizer"):
        SpeechLlmCollator(processor)([row])


def test_forward_trains_only_the_projector(pair, dev_rows):
    model, processor = pair
    outputs = model(**SpeechLlmCollator(processor)(dev_rows))
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {"projector"}
    model.zero_grad(set_to_none=True)


def test_qformer_variant_builds_with_its_sizes_and_runs(real_backbones, dev_rows):
    model, processor = build("whisper-base-smollm2-qformer", real_backbones)
    assert SMALL_LLM_PROJECTOR_CONFIGS["qformer"].items() <= model.config.projector_config.to_dict().items()
    inputs = processor.apply_chat_template(conversation(dev_rows[0]), add_generation_prompt=True, tokenize=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_saved_tokenizer_config_is_clean_and_loads_on_transformers_4_57(pair, tmp_path, compat_python):
    _, processor = pair
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local", "cache_dir", "_commit_hash"} & set(config)
    text = processor.apply_chat_template(conversation(load_split("dev")[0]), add_generation_prompt=True)
    expected = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    script = textwrap.dedent(
        """
        import json, sys
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
        ids = tokenizer(sys.argv[2], add_special_tokens=False)["input_ids"]
        print(json.dumps({"ids": ids, "audio": tokenizer.convert_tokens_to_ids("<audio>"), "pad": tokenizer.pad_token,
                          "padding_side": tokenizer.padding_side}))
        """
    )
    loaded = run_without_package(compat_python, ["-c", script, str(tmp_path), text], tmp_path, timeout=300)
    assert loaded == {
        "ids": expected,
        "audio": processor.audio_token_id,
        "pad": "<|im_end|>",
        "padding_side": "left",
    }
