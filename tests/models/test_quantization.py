"""Quantized backbones (issue 20 item 4): optimum-quanto on the CPU stands in for bitsandbytes, which needs CUDA."""

import argparse
import importlib.util
import json

import datasets
import pytest
import torch
from conftest import NO_WARMUP, tiny, trainer_of
from transformers import HfArgumentParser

from speechllm_hf import SpeechLlmForConditionalGeneration, from_preset
from speechllm_hf.cli import main
from speechllm_hf.commands.model_arguments import load_model_and_processor
from speechllm_hf.commands.train import ModelArguments
from speechllm_hf.quantization import quantization_config, quantization_kwargs
from speechllm_hf.quickstart.corpus import load_split

quanto = pytest.importorskip("optimum.quanto", reason="the CPU quantization backend: pip install optimum-quanto")


def quantized_tiny(local_backbones, method="quanto-int8", **kwargs):
    torch.manual_seed(0)
    return from_preset(
        "tiny",
        projector_type="mlp",
        encoder_name_or_path=str(local_backbones / "hubert"),
        text_name_or_path=str(local_backbones / "llm"),
        **quantization_kwargs(method),
        **kwargs,
    )


def quantized_linears(module: torch.nn.Module) -> int:
    return sum(isinstance(m, quanto.QModuleMixin) for m in module.modules())


@pytest.mark.parametrize("method", ["quanto-int8", "quanto-int4"])
def test_a_quantized_llm_trains_the_projector_in_float32_and_saves_it_alone(local_backbones, tmp_path, method):
    model, processor = quantized_tiny(local_backbones, method)
    assert model.language_model.is_quantized and quantized_linears(model.language_model) > 0
    assert quantized_linears(model.encoder) == 0  # the encoder keeps its precision unless asked
    assert {p.dtype for p in model.projector.parameters()} == {torch.float32}
    llm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    projector_before = {k: v.clone() for k, v in model.projector.state_dict().items()}

    trainer_of(model, processor, tmp_path / "run", learning_rate=1e-2, **NO_WARMUP).train()
    assert any(not torch.equal(projector_before[k], v) for k, v in model.projector.state_dict().items())
    assert all(torch.equal(llm_before[k], v) for k, v in model.language_model.state_dict().items())

    model.save_pretrained(tmp_path / "saved", processor=processor)
    assert (tmp_path / "saved" / "projector.safetensors").exists()
    assert not list((tmp_path / "saved").glob("model*.safetensors*"))
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()

    full_precision = SpeechLlmForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert not getattr(full_precision.language_model, "is_quantized", False)
    assert quantized_linears(full_precision) == 0
    requantized = SpeechLlmForConditionalGeneration.from_pretrained(
        tmp_path / "saved", quantization_config=quantization_config(method)
    )
    for reloaded in (full_precision, requantized):
        for name, tensor in model.projector.state_dict().items():
            torch.testing.assert_close(reloaded.projector.state_dict()[name], tensor, rtol=0, atol=0)
    batch = trainer_of(model, processor, tmp_path / "x").get_train_dataloader().__iter__().__next__()
    with torch.no_grad():
        torch.testing.assert_close(requantized(**batch).logits, model.eval()(**batch).logits)


def test_the_encoder_is_quantized_only_when_asked(local_backbones):
    model, _ = quantized_tiny(local_backbones, encoder_quantization_config=quantization_config("quanto-int8"))
    assert model.encoder.is_quantized and quantized_linears(model.encoder) > 0
    assert model.language_model.is_quantized


def test_quantizing_a_randomly_built_backbone_is_refused():
    with pytest.raises(ValueError, match="quantization_config was given, but that backbone has no checkpoint"):
        from_preset("tiny", quantization_config=quantization_config("quanto-int8"))


def test_a_full_save_of_quantized_backbones_is_refused(local_backbones, tmp_path):
    model, _ = quantized_tiny(local_backbones)
    with pytest.raises(ValueError, match="language_model is quantized"):
        model.save_pretrained(tmp_path / "full", save_full_model=True)
    assert not (tmp_path / "full" / "model.safetensors").exists()


def test_a_full_save_does_not_load_quantized(tmp_path):
    model, processor = tiny()  # random backbones: saved in full
    model.save_pretrained(tmp_path / "full", processor=processor)
    with pytest.raises(ValueError, match="would quantize the projector"):
        SpeechLlmForConditionalGeneration.from_pretrained(
            tmp_path / "full", quantization_config=quantization_config("quanto-int8")
        )


def test_bitsandbytes_is_refused_clearly_without_cuda_or_the_package(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for method in ("bnb-8bit", "bnb-4bit"):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            quantization_config(method)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else find_spec(name))
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quantization_config("bnb-4bit")


def test_bitsandbytes_methods_use_llm_int8_and_qlora_nf4(monkeypatch):
    pytest.importorskip("bitsandbytes", reason="the CUDA quantization backend, not part of the dev extra")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    nf4 = quantization_config("bnb-4bit")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert nf4.bnb_4bit_use_double_quant and quantization_config("bnb-8bit").load_in_8bit


def test_train_flags_quantize_the_llm_and_on_request_the_encoder(local_backbones):
    flags = ["--encoder_name_or_path", str(local_backbones / "hubert"), "--text_name_or_path"]
    flags += [str(local_backbones / "llm"), "--projector_type", "mlp", "--quantization", "quanto-int4"]
    (args,) = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(flags + ["--quantize_encoder"])
    model, _ = load_model_and_processor(args, **args.backbone_kwargs())
    assert model.language_model.is_quantized and model.encoder.is_quantized
    with pytest.raises(SystemExit, match="--quantize_encoder needs --quantization"):
        load_model_and_processor(argparse.Namespace(preset="tiny", quantization=None, quantize_encoder=True))


def test_generate_loads_a_saved_projector_onto_quantized_backbones(local_backbones, tmp_path):
    model, processor = quantized_tiny(local_backbones, method=None)  # saved from full precision
    model.save_pretrained(tmp_path / "saved", processor=processor)
    rows = [{"audio": row["audio"], "id": row["id"]} for row in load_split("dev")[:2]]
    datasets.Dataset.from_list(rows).to_json(tmp_path / "in.jsonl")
    outputs = {}
    for name, flags in (("full", []), ("int8", ["--quantization", "quanto-int8"])):
        args = ["generate", "--model", str(tmp_path / "saved"), "--input_file", str(tmp_path / "in.jsonl")]
        assert main([*args, "--output_file", str(tmp_path / f"{name}.jsonl"), "--max_new_tokens", "4", *flags]) == 0
        outputs[name] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert [row["id"] for row in outputs["int8"]] == [row["id"] for row in rows]
    assert all(row["response"] is not None and "error" not in row for row in outputs["int8"])
