"""peft's own routes to LoRA on the LLM: `model.add_adapter(LoraConfig(...))` (transformers' method name), in this
process on transformers 5.x and in the Hub copy on transformers 4.57 without the package; saved beside the projector
and reloaded by `AutoModel` with the same logits. (`get_peft_model` over the whole model: tests/test_examples.py.)"""

import json
import textwrap

import pytest
import torch
from conftest import clip, run_without_package, trained_tiny
from peft import LoraConfig
from transformers import AutoModel

TEXTS = ["<|user|><audio> hi<|end|><|assistant|>"]


def lora_modules(module: torch.nn.Module) -> set[str]:
    return {name for name, m in module.named_modules() if hasattr(m, "lora_A")}


def randomise_lora_b(model) -> None:
    """lora_B starts at zero, which would make any adapter look applied (or lost) to a logits comparison."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)


def test_add_adapter_adapts_only_the_llm_switches_saves_and_reloads(local_backbones, tmp_path):
    model, processor = trained_tiny(local_backbones)
    inputs = processor(TEXTS, audio=[clip(0.6)], sampling_rate=16000)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    # The names users write for a Llama: the encoder (HuBERT here) has q_proj / v_proj modules too.
    assert any(name.endswith("q_proj") for name, _ in model.encoder.named_modules())
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    adapted = lora_modules(model)
    assert adapted and all(name.startswith("language_model.") for name in adapted)
    assert len(adapted) == 2 * model.language_model.config.num_hidden_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if n.startswith("projector.") or "lora_" in n}
    assert any("lora_" in n for n in trainable) and any(n.startswith("projector.") for n in trainable)

    randomise_lora_b(model)
    model.eval()
    with torch.no_grad():
        adapted_logits = model(**inputs).logits
        model.disable_adapters()
        torch.testing.assert_close(model(**inputs).logits, base_logits)
        model.enable_adapters()
        torch.testing.assert_close(model(**inputs).logits, adapted_logits)
    assert not torch.allclose(adapted_logits, base_logits)

    model.save_pretrained(tmp_path, processor=processor)
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert lora_modules(loaded) == adapted
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, adapted_logits)

    with pytest.raises(ValueError, match="already carries an adapter"):
        model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
    model.merge_lora()
    with pytest.raises(ValueError, match="carries no adapter: add one with model.add_adapter"):
        model.disable_adapters()
    with pytest.raises(TypeError, match="must be a peft config"):
        model.add_adapter({"r": 2})


# Run by the transformers-4.57 interpreter, without speechllm_hf: the Hub copy of the model code adds the adapter.
ADD_ADAPTER_ON_THE_HUB_COPY = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, transformers
    from peft import LoraConfig
    from transformers import AutoModel, AutoProcessor

    folder, out, TEXTS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    inputs = processor(TEXTS, audio=[np.zeros(9600, dtype=np.float32) + 0.1], sampling_rate=16000)
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(out)
    reloaded = AutoModel.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        difference = (reloaded(**inputs).logits - logits).abs().max().item()
    adapted = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A"))
    print(json.dumps({"transformers": transformers.__version__, "adapted": adapted, "difference": difference}))
    """
)


def test_add_adapter_on_the_hub_copy_with_transformers_4_57(local_backbones, compat_python, tmp_path):
    model, processor = trained_tiny(local_backbones)
    model.save_pretrained(tmp_path / "base", processor=processor)
    arguments = [str(tmp_path / "base"), str(tmp_path / "adapted"), json.dumps(TEXTS)]
    report = run_without_package(compat_python, ["-c", ADD_ADAPTER_ON_THE_HUB_COPY, *arguments], tmp_path)
    assert report["transformers"].startswith("4.57")
    assert report["adapted"] and all(name.startswith("language_model.") for name in report["adapted"])
    assert report["difference"] < 1e-5
