"""LoRA on the LLM through peft, for downstream fine-tuning; the adapter is saved beside the projector."""

from __future__ import annotations

# Every attention projection of Llama/Qwen-style LLMs: the one default of `add_lora` and `--lora_target_modules`.
LORA_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def add_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules=LORA_TARGET_MODULES):
    """Add a LoRA adapter to `model.language_model` (in place, `model.add_adapter`); only the adapter and the
    projector train.

    Returns:
        The model, for chaining.
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    model.add_adapter(config)
    return model


__all__ = ["LORA_TARGET_MODULES", "add_lora"]
