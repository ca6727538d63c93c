"""The flags every model-building command shares: backbone paths with --preset, --chat_template, --system_prompt."""

import argparse
import json

import pytest
from conftest import tiny

from speechllm_hf.cli import build_parser, main
from speechllm_hf.commands.model_arguments import chat_template_text, load_model_and_processor
from speechllm_hf.preprocessing.continuation import BLSP_CONTINUATION_INSTRUCTION, ContinuationPrompt
from speechllm_hf.presets import BLSP_CHAT_TEMPLATE
from speechllm_hf.quickstart.corpus import load_split

PRESET_COMMANDS = ("train", "generate", "evaluate", "retrieval", "info", "demo")
PROMPT_COMMANDS = ("train", "generate", "evaluate", "demo", "continue-writing")


def command_flags(command: str) -> set[str]:
    if command == "train":  # parses its own flags (HfArgumentParser) from the model argument classes
        from transformers import HfArgumentParser

        from speechllm_hf.commands.train import ModelArguments

        parser = HfArgumentParser(ModelArguments)
    else:
        subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[command]
    return {option for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("command", PRESET_COMMANDS)
def test_every_command_with_a_preset_takes_the_backbone_paths(command):
    flags = command_flags(command)
    assert {"--preset", "--encoder_name_or_path", "--text_name_or_path"} <= flags


@pytest.mark.parametrize("command", PROMPT_COMMANDS)
def test_every_command_that_builds_a_prompt_takes_the_prompt_format(command):
    assert {"--chat_template", "--system_prompt"} <= command_flags(command)


def test_continue_writing_takes_the_llm_path_with_a_preset():
    assert {"--preset", "--text_name_or_path"} <= command_flags("continue-writing")


def test_prompt_flags_reach_the_processor(tmp_path):
    args = argparse.Namespace(preset="tiny", chat_template="blsp", system_prompt="Be brief.")
    _, processor = load_model_and_processor(args)
    assert processor.chat_template == BLSP_CHAT_TEMPLATE and processor.system_prompt == "Be brief."
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    args = argparse.Namespace(preset="tiny", chat_template=str(template), system_prompt="")
    _, processor = load_model_and_processor(args)
    assert processor.system_prompt is None  # '' turns the preset's system prompt off
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"


def test_a_saved_model_refuses_backbone_flags(tmp_path):
    model, processor = tiny()
    model.save_pretrained(tmp_path, processor=processor)
    args = argparse.Namespace(model=str(tmp_path), text_name_or_path="elsewhere", preset=None)
    with pytest.raises(SystemExit, match="--text_name_or_path apply to --preset only"):
        load_model_and_processor(args)


def test_chat_template_value_that_is_no_template_is_refused():
    with pytest.raises(SystemExit, match="neither 'blsp', a file, nor a Jinja template"):
        chat_template_text("chatml")


def test_continue_writing_chat_prompt_with_a_system_prompt(tmp_path):
    _, processor = tiny()
    prompt = ContinuationPrompt(processor.tokenizer, style="chat", system_prompt="Be brief.")
    expected = processor.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"{BLSP_CONTINUATION_INSTRUCTION} hi"},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.text("hi") == expected
    with pytest.raises(ValueError, match="system prompt needs the 'chat' style"):
        ContinuationPrompt(processor.tokenizer, system_prompt="Be brief.")
    (tmp_path / "m.jsonl").write_text(json.dumps(load_split("dev")[0]) + "\n")
    argv = ["continue-writing", "--preset", "tiny", "--manifest", str(tmp_path / "m.jsonl")]
    with pytest.raises(SystemExit, match="--chat_template applies to --prompt chat only"):
        main([*argv, "--output_file", str(tmp_path / "out.jsonl"), "--chat_template", "blsp"])


def test_retrieval_pools_after_the_sink_token_it_is_given(tmp_path):
    """`retrieval --sink_token` reaches the pooling: the published form ('none') and the default ('bos') score the same
    untrained model differently, as they pool different sequences."""
    manifest = tmp_path / "dev.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in load_split("dev")[:6]))
    losses = {}
    for sink in ("bos", "none"):
        out = tmp_path / sink
        argv = ["retrieval", "--preset", "tiny", "--manifest", str(manifest), "--output_dir", str(out)]
        assert main([*argv, "--layers", "1", "--sink_token", sink]) == 0
        losses[sink] = json.loads((out / "retrieval.json").read_text())["layer_1"]["loss"]
    assert losses["bos"] != pytest.approx(losses["none"])
