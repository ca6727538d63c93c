"""A speech LLM trained with the ecosystem's own tools only: a plain `transformers.Trainer`, LoRA through peft's
`get_peft_model`, then `AutoModel` / `PeftModel` reload and the "speech-llm" pipeline on a raw array.

    python examples/plain_trainer.py --output_dir /tmp/plain --max_steps 20

The tiny random preset by default (offline, a CPU minute); `--preset whisper-base-smollm2 --encoder_name_or_path ...
--text_name_or_path ...` for real backbones. What the library's own `SpeechLlmTrainer` adds over this (feature cache,
length-grouped batches, per-task losses, projector-only checkpoints) is in docs/training.md.
"""

from __future__ import annotations

import argparse

import datasets
import soundfile as sf
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoProcessor, Trainer, TrainingArguments, pipeline

from speechllm_hf import from_preset
from speechllm_hf.data import SpeechLlmCollator
from speechllm_hf.quickstart.corpus import load_split


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--encoder_name_or_path", default=None)
    parser.add_argument("--text_name_or_path", default=None)
    parser.add_argument("--max_steps", type=int, default=20)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    backbones = {k: v for k, v in vars(args).items() if k.endswith("_name_or_path") and v}
    model, processor = from_preset(args.preset, **backbones)
    # The base folder: the backbones (by reference, or whole for random ones) and the projector as it starts.
    base_dir = f"{args.output_dir}/base"
    model.save_pretrained(base_dir, processor=processor)

    # Rows with an `audio` column (a path here; bytes, arrays and decoded `datasets` Audio dicts work too) and a
    # `text` column (the transcript). The collator decodes and pads them; `remove_unused_columns=False` keeps the
    # columns the model's forward does not name, which the Trainer would otherwise drop before the collator sees them.
    train = datasets.Dataset.from_list(load_split("train"))

    # LoRA on the LLM's attention; the projector trains in full (`modules_to_save`) and is saved with the adapter.
    attention = r".*language_model.*\.(q_proj|v_proj)"
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=attention, modules_to_save=["projector"])
    peft_model = get_peft_model(model, lora)
    trainer = Trainer(
        model=peft_model,
        args=TrainingArguments(
            output_dir=f"{args.output_dir}/checkpoints",
            max_steps=args.max_steps,
            per_device_train_batch_size=8,
            learning_rate=2e-3,
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
            report_to="none",
            save_strategy="no",
            logging_steps=1,
        ),
        train_dataset=train,
        data_collator=SpeechLlmCollator(processor),
    )
    trainer.train()
    adapter_dir = f"{args.output_dir}/adapter"
    peft_model.save_pretrained(adapter_dir)  # LoRA weights and the projector; the backbones stay in base_dir

    # Reload as someone without speechllm_hf would: remote code for the base, peft for the adapter.
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir, trust_remote_code=True), adapter_dir)
    reloaded_processor = AutoProcessor.from_pretrained(base_dir, trust_remote_code=True)
    clip = load_split("dev")[0]
    inputs = processor(
        processor.audio_token + " " + clip["text"], audio=[clip["audio"]], sampling_rate=16000, return_tensors="pt"
    )
    peft_model.eval()
    reloaded.eval()
    with torch.no_grad():
        difference = (peft_model(**inputs).logits - reloaded(**inputs).logits).abs().max().item()

    # The pipeline takes the merged model and a raw array, as transformers' speech-recognition pipeline does.
    merged = reloaded.merge_and_unload()
    waveform, rate = sf.read(clip["audio"], dtype="float32")
    pipe = pipeline("speech-llm", model=merged, processor=reloaded_processor, trust_remote_code=True)
    # min_new_tokens: the tiny random preset may end its answer at once (transformers 4.57's initialisation does).
    answer = pipe({"raw": waveform, "sampling_rate": rate}, max_new_tokens=24, min_new_tokens=1)["generated_text"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "reload_max_abs_logit_difference": difference,
        "reference": clip["text"],
        "pipeline_answer": answer,
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
