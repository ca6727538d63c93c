"""A short end-to-end run on the tiny preset and the bundled corpus: train the projector, transcribe, save.

    python examples/tiny_end_to_end.py --steps 30

Nothing is downloaded: the tiny preset is built from configs and the corpus ships with the package.
"""

from __future__ import annotations

import argparse

import torch

from speechllm_hf import from_preset
from speechllm_hf.corpus import load_split
from speechllm_hf.models.speechllm.processing_speechllm import load_audio_file


def conversation(text: str | None) -> list[dict]:
    turns = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "\nTranscribe."}]}]
    return turns + ([{"role": "assistant", "content": text}] if text is not None else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_dir", default="out/tiny_end_to_end")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, processor = from_preset("tiny")
    rows = load_split("train")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(args.steps):
        batch = [rows[(step * args.batch_size + i) % len(rows)] for i in range(args.batch_size)]
        audio = [load_audio_file(row["audio"]) for row in batch]
        texts = [processor.apply_chat_template(conversation(row["text"])) for row in batch]
        inputs = processor(
            texts, audio=[a for a, _ in audio], sampling_rate=[r for _, r in audio], add_special_tokens=False
        )
        loss = model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    model.eval()
    row = load_split("dev")[0]
    samples, rate = load_audio_file(row["audio"])
    prompt = processor.apply_chat_template(conversation(None), add_generation_prompt=True)
    inputs = processor([prompt], audio=[samples], sampling_rate=rate, add_special_tokens=False)
    generated = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    hypothesis = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(f"reference:  {row['text']}\nhypothesis: {hypothesis!r}  (a tiny random model: expect noise)")
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
