"""Weight memory of the full-size presets' backbones in bfloat16, 8-bit and 4-bit, computed from parameter counts
(docs/real_backbones.md, "Quantized backbones"): each model is built on the meta device from its published
architecture, so nothing is downloaded and nothing is measured.

bitsandbytes quantizes the `nn.Linear` weights of the transformer blocks; embeddings, norms, biases, convolutions and
the LLM's output head stay in bfloat16. 8-bit (LLM.int8()) stores one byte a weight plus a float32 scale per row;
4-bit NF4 with double quantization half a byte plus, per block of 64 weights, an 8-bit absmax and, per 256 blocks, a
float32 scale. Activations, the KV cache and the CUDA context come on top.

    python scripts/backbone_memory.py
"""

import torch
from transformers import AutoModel, AutoModelForCausalLM, HubertConfig, LlamaConfig, WhisperConfig

from speechllm_hf.models.speechllm.modules_speechllm import SpeechLlmWhisperEncoder

# The architectures of the presets' checkpoints, as their config.json files give them.
LLMS = {
    "meta-llama/Llama-3.1-8B-Instruct": LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
    "meta-llama/Llama-2-7b-hf": LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
}  # fmt: skip
ENCODERS = {
    "facebook/hubert-large-ls960-ft": HubertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True,
    ),
    "openai/whisper-small": WhisperConfig(
        d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072, num_mel_bins=80,
    ),
    "openai/whisper-base": WhisperConfig(
        d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048, num_mel_bins=80,
    ),
}  # fmt: skip
PRESETS = {
    "hubert-qformer": ("facebook/hubert-large-ls960-ft", "meta-llama/Llama-3.1-8B-Instruct"),
    "whisper-cnn": ("openai/whisper-small", "meta-llama/Llama-2-7b-hf"),
    "whisper-base-smollm2": ("openai/whisper-base", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
BYTES_PER_QUANTIZED_WEIGHT = {"bf16": 2.0, "8-bit": 1.0, "4-bit": 0.5 + 1 / 64 + 4 / (64 * 256)}


def counts(model: torch.nn.Module, head: torch.nn.Module | None) -> tuple[int, int, int]:
    """(all parameters, quantized weights, rows of the quantized weights) of `model`; `head` is not quantized."""
    total = sum(p.numel() for p in model.parameters())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return total, sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)


def gigabytes(total: int, quantized: int, rows: int, scheme: str) -> float:
    rest = (total - quantized) * 2  # bfloat16
    scales = rows * 4 if scheme == "8-bit" else 0
    return (rest + quantized * BYTES_PER_QUANTIZED_WEIGHT[scheme] + scales) / 1e9


def main() -> None:
    with torch.device("meta"):
        llms = {}
        for name, config in LLMS.items():
            model = AutoModelForCausalLM.from_config(config)
            llms[name] = counts(model, model.get_output_embeddings())
        encoders = {}
        for name, config in ENCODERS.items():
            model = (
                SpeechLlmWhisperEncoder(config) if config.model_type == "whisper" else AutoModel.from_config(config)
            )
            encoders[name] = counts(model, None)
    print("| preset | encoder (parameters) | LLM (parameters) | bf16 | LLM 8-bit | LLM 4-bit | both 4-bit |")
    print("|---|---|---|---|---|---|---|")
    for preset, (encoder, llm) in PRESETS.items():
        enc, lm = encoders[encoder], llms[llm]
        bf16 = gigabytes(*enc, "bf16") + gigabytes(*lm, "bf16")
        llm8 = gigabytes(*enc, "bf16") + gigabytes(*lm, "8-bit")
        llm4 = gigabytes(*enc, "bf16") + gigabytes(*lm, "4-bit")
        both4 = gigabytes(*enc, "4-bit") + gigabytes(*lm, "4-bit")
        print(
            f"| `{preset}` | {encoder} ({enc[0] / 1e6:.0f} M) | {llm} ({lm[0] / 1e9:.2f} B) | {bf16:.2f} GB "
            f"| {llm8:.2f} GB | {llm4:.2f} GB | {both4:.2f} GB |"
        )


if __name__ == "__main__":
    main()
