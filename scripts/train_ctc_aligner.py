"""Train the tiny CTC aligner shipped in ``speechllm_hf/quickstart/corpus/ctc_aligner`` on the bundled espeak-ng
corpus.

No pretrained CTC model can be downloaded here, so ``speechllm-hf align`` and the alignment tests use this one: a
randomly initialised ``Wav2Vec2ForCTC`` with the standard 320x conv stride (20 ms frames, like
facebook/wav2vec2-base-960h), a small conv feature encoder and a few transformer layers, trained with CTC on the corpus
``train`` split. Every other step trains on word-by-word re-syntheses of the ``train`` transcripts instead (espeak-ng,
as ``scripts/make_corpus.py`` builds the ``aligned`` split, with random pauses), where the word boundaries are known
and the CTC paths are constrained to them: each word's letters within its own frames, a word delimiter in each pause,
blanks before and after the speech. Plain CTC only learns which letters a clip holds, and fires them anywhere (a
word's first letter inside the previous word, say); the constrained steps teach it where. Its vocabulary is exactly
wav2vec2-base-960h's (``<pad>`` = blank, ``<s>``, ``</s>``, ``<unk>``, ``|`` word delimiter, the 26 upper-case letters
and the apostrophe), so it is a drop-in stand-in for it; Q and Z never occur in the corpus and stay untrained. It only
knows this corpus (57 words, 8 espeak-ng voices): real data should use
a real aligner such as facebook/wav2vec2-base-960h.

The checkpoint (model in float16 safetensors + ``Wav2Vec2Processor``) and a README.md recording the command, steps,
seed, final training loss and greedy dev CER are written to ``--output_dir``. Needs the ``espeak-ng`` binary (e.g.
``apt-get install espeak-ng``). Usage, from the repository root::

    python scripts/train_ctc_aligner.py --output_dir speechllm_hf/quickstart/corpus/ctc_aligner
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Processor,
)

from speechllm_hf.data import load_audio
from speechllm_hf.preprocessing.synthetic import PITCH_RANGE, SPEED_RANGE, VOICES, espeak, peak_normalise
from speechllm_hf.quickstart.corpus import load_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_corpus import trim_silence  # noqa: E402

# facebook/wav2vec2-base-960h's vocabulary, in its order: the same alphabet as the aligner the paper used.
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]
SAMPLE_RATE = 16000
FRAME, RECEPTIVE_FIELD = 320, 400  # samples per CTC frame and samples each frame reads (wav2vec2's conv stack)


def build_processor() -> Wav2Vec2Processor:
    """The tokenizer (character vocabulary, "|" between words) and feature extractor (per-clip normalisation)."""
    vocab_file = Path(f"/tmp/ctc_aligner_vocab_{random.getrandbits(32)}.json")
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(VOCAB)}))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|", do_lower_case=False
    )
    vocab_file.unlink()
    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def build_model(args: argparse.Namespace, tokenizer: Wav2Vec2CTCTokenizer) -> Wav2Vec2ForCTC:
    """A small random-init wav2vec2: conv strides 5x2x2x2x2x2x2 = 320 samples per frame, as in wav2vec2-base."""
    config = Wav2Vec2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=4,
        intermediate_size=4 * args.hidden_size,
        conv_dim=tuple(args.conv_dim),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        # Layer-normalised conv layers and pre-norm transformer layers train from scratch faster than the
        # group-norm/post-norm wav2vec2-base layout; they change nothing about the frame rate.
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=32,
        num_conv_pos_embedding_groups=8,
        hidden_dropout=0.05,
        attention_dropout=0.05,
        activation_dropout=0.05,
        feat_proj_dropout=0.05,
        final_dropout=0.05,
        layerdrop=0.0,
        mask_time_prob=args.mask_time_prob,
        mask_time_length=5,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=True,
    )
    return Wav2Vec2ForCTC(config)


def load_rows(split: str) -> list[dict]:
    """Waveforms and upper-case transcripts of every clip of a split."""
    return [
        {"waveform": load_audio(row["audio"], target_rate=SAMPLE_RATE), "text": row["text"].upper()}
        for row in load_split(split)
    ]


def synthesise_word_clips(rows: list[dict], rng: random.Random, args: argparse.Namespace) -> list[dict]:
    """Each transcript again, word by word (as the `aligned` split is built), with random pauses; known boundaries.

    Voices cycle and speed/pitch are drawn as in `make_corpus.py`; pauses between words are drawn from
    `--word_gap` (at least two frames, room for the word delimiter) and the silence at each end from 0-0.4 s.
    """
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        (row["text"], VOICES[i % len(VOICES)], rng.randint(*SPEED_RANGE), rng.randint(*PITCH_RANGE))
        for i, row in enumerate(rows)
    ]
    layouts = [
        (
            [rng.uniform(0.0, args.max_lead_silence) for _ in range(2)],
            [rng.uniform(*args.word_gap) for _ in text.split()],
        )
        for text, *_ in jobs
    ]

    def build(job, layout) -> dict:
        text, voice, speed, pitch = job
        (lead, tail), gaps = layout
        pieces, spans, position = [], [], int(lead * SAMPLE_RATE)
        pieces.append(np.zeros(position, np.float32))
        for index, word in enumerate(text.split()):
            if index:
                pause = np.zeros(int(gaps[index] * SAMPLE_RATE), np.float32)
                pieces.append(pause)
                position += len(pause)
            audio = trim_silence(espeak(word.lower(), voice, speed, pitch))
            pieces.append(audio)
            spans.append((position, position + len(audio)))
            position += len(audio)
        pieces.append(np.zeros(int(tail * SAMPLE_RATE), np.float32))
        return {"waveform": peak_normalise(np.concatenate(pieces)), "text": text, "spans": spans}

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # the work happens in espeak-ng subprocesses
        return list(pool.map(build, jobs, layouts))


def segment_ctc_loss(
    log_probs: torch.Tensor, rows: list[dict], tokenizer: Wav2Vec2CTCTokenizer, num_frames: int
) -> torch.Tensor:
    """CTC restricted to the known word boundaries of word-by-word clips.

    Each clip's frames are cut into segments by the frame centres: silence before the speech (all blank), each word
    (its letters), each pause (one word delimiter), silence after. The loss is the CTC loss of every segment against
    its targets: the paths plain CTC allows, less those that put a letter outside its word.

    Args:
        log_probs: (B, T, V) log-softmax of the CTC logits.
        rows: The clips, with `text` and `spans` (sample ranges of the words).
        tokenizer: The CTC tokenizer (letters, "|").
        num_frames: T.

    Returns:
        The summed segment losses over the number of target tokens.
    """
    vocab = tokenizer.get_vocab()
    centres = np.arange(num_frames) * FRAME + RECEPTIVE_FIELD // 2  # (T,) sample at the middle of each frame
    segments, targets = [], []
    for b, row in enumerate(rows):
        bounds = [edge for span in row["spans"] for edge in span]  # word 1 start, word 1 end, word 2 start, ...
        cuts = np.searchsorted(centres, bounds).tolist() + [num_frames]
        labels = [[]]  # before the speech: blank
        for index, word in enumerate(row["text"].split()):
            if index:
                labels.append([vocab["|"]])
            labels.append([vocab[c] for c in word])
        labels.append([])  # after the speech (and the batch padding, silent too): blank
        start = 0
        for end, label in zip(cuts, labels):
            segments.append(log_probs[b, start:end])
            targets.append(label)
            start = end
    lengths = torch.tensor([len(x) for x in segments])
    target_lengths = torch.tensor([len(t) for t in targets])
    padded = nn.utils.rnn.pad_sequence(segments, batch_first=False)  # (S_max, N, V)
    flat = torch.tensor([c for t in targets for c in t], dtype=torch.long)
    losses = nn.functional.ctc_loss(
        padded, flat, lengths, target_lengths, blank=tokenizer.pad_token_id, reduction="none", zero_infinity=True
    )
    return losses.sum() / target_lengths.sum().clamp(min=1)  # per target token, like Wav2Vec2ForCTC's "mean"


def silence(rng: random.Random, low: float, high: float) -> np.ndarray:
    return np.zeros(int(rng.uniform(low, high) * SAMPLE_RATE), np.float32)


def augment(row: dict, rng: random.Random, args: argparse.Namespace) -> dict:
    """Adds the silences alignment needs and the corpus lacks: before the speech and pauses inside it.

    espeak-ng sentences start almost at once (median 13 ms of silence) and barely pause between words, while real
    clips (and the `aligned` split) begin with silence and pause. Pauses are inserted at random points (not only
    between words) and the transcript is unchanged; `silent` marks the inserted samples for the blank loss.
    """
    pieces = [(row["waveform"], False)]
    if rng.random() < args.pause_prob:
        cuts = sorted(rng.randrange(len(row["waveform"])) for _ in range(rng.randint(1, args.max_pauses)))
        speech = np.split(row["waveform"], cuts)
        pieces = [(speech[0], False), *(x for p in speech[1:] for x in ((silence(rng, 0.05, 0.3), True), (p, False)))]
    pieces = [(silence(rng, 0.0, args.max_lead_silence), True), *pieces, (silence(rng, 0.0, 0.2), True)]
    return {
        "waveform": np.concatenate([p for p, _ in pieces]),
        "silent": np.concatenate([np.full(len(p), is_silent) for p, is_silent in pieces]),
        "text": row["text"],
    }


def silent_frames(silent: np.ndarray, num_frames: int) -> np.ndarray:
    """(num_frames,) True for the frames whose input window, widened by half a frame each side, is all silence."""
    speech = np.concatenate([[0], np.cumsum(~silent)])  # (N + 1,) speech samples before each index
    starts = np.arange(num_frames) * FRAME  # frame t reads samples [t * 320, t * 320 + 400)
    low = np.clip(starts - FRAME // 2, 0, len(silent))
    high = np.clip(starts + RECEPTIVE_FIELD + FRAME // 2, 0, len(silent))
    return (speech[high] == speech[low]) & (starts + RECEPTIVE_FIELD <= len(silent))


def collate(rows: list[dict], processor: Wav2Vec2Processor, num_frames: int) -> dict[str, torch.Tensor]:
    """Normalised, zero-padded waveforms (+ attention mask), labels padded with -100 and (B, T) silent frames."""
    values = processor.feature_extractor(
        [r["waveform"] for r in rows], sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt"
    )
    labels = processor.tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    return {
        "input_values": values.input_values,  # (B, samples)
        "attention_mask": values.attention_mask,  # (B, samples)
        "labels": labels.input_ids.masked_fill(labels.attention_mask == 0, -100),  # (B, L)
        "silent": torch.from_numpy(np.stack([silent_frames(r["silent"], num_frames) for r in rows])),  # (B, T)
    }


def length_batches(rows: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """Shuffled batches of clips of similar length (little padding), in a random order."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]["waveform"]), rng.random()))
    batches = [[rows[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def greedy_cer(model: Wav2Vec2ForCTC, processor: Wav2Vec2Processor, rows: list[dict]) -> tuple[float, list[str]]:
    """Character error rate of greedy CTC decoding (spaces count as characters) and the hypotheses."""
    model.eval()
    hypotheses = []
    for row in rows:  # one clip at a time: no padding, exactly what the aligner sees
        inputs = processor.feature_extractor(row["waveform"], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        logits = model(inputs.input_values).logits  # (1, T, V)
        hypotheses.append(processor.batch_decode(logits.argmax(-1))[0])
    model.train()
    return jiwer.cer([r["text"] for r in rows], hypotheses), hypotheses


def write_readme(output_dir: Path, summary: dict) -> None:
    lines = [
        "# Tiny CTC aligner for the bundled corpus",
        "",
        "A randomly initialised `Wav2Vec2ForCTC` trained from scratch, on CPU, on the `train` split of the",
        "bundled espeak-ng corpus and on word-by-word re-syntheses of its transcripts (known word boundaries, which",
        "constrain the CTC paths), so that `speechllm-hf align` and the alignment tests work offline. It knows only",
        "that corpus (57 words, 8 espeak-ng voices); for real speech use a real CTC aligner, e.g.",
        "`facebook/wav2vec2-base-960h` (the aligner the paper used): `speechllm-hf align --aligner",
        "facebook/wav2vec2-base-960h`.",
        "",
        "- Architecture: wav2vec2 with conv feature encoder "
        f"{summary['conv_dim']} channels, strides 5,2,2,2,2,2,2 (320 samples = 20 ms per frame), "
        f"{summary['num_layers']} pre-norm transformer layers of width {summary['hidden_size']}, "
        f"{summary['parameters']:,} parameters, stored in float16 ({summary['size_mb']:.2f} MB).",
        "- Vocabulary: facebook/wav2vec2-base-960h's 32 tokens (`<pad>` is the CTC blank, `|` the word delimiter, "
        "A-Z and `'`); Q and Z never occur in the corpus and are untrained.",
        f"- Command: `{summary['command']}`",
        f"- Seed {summary['seed']}, {summary['steps']} steps of batch {summary['batch_size']} "
        f"(AdamW, peak lr {summary['lr']}, {summary['warmup']} warmup steps, cosine decay, "
        f"SpecAugment time-mask p={summary['mask_time_prob']}; augmentation: 0-{summary['max_lead_silence']} s of "
        f"silence before and 0-0.2 s after each clip, and with probability {summary['pause_prob']} 1-"
        f"{summary['max_pauses']} pauses of 0.05-0.3 s inserted at random points; loss: CTC + "
        f"{summary['blank_weight']} x mean -log p(blank) on the frames inside inserted silence; every "
        f"{summary['constrained_every']}nd step instead: the train transcripts re-synthesised word by word with "
        f"pauses of {summary['word_gap'][0]}-{summary['word_gap'][1]} s, CTC constrained to the known word "
        "boundaries), "
        f"{summary['train_minutes']:.1f} min on {summary['threads']} CPU threads (torch {summary['torch']}, "
        f"transformers {summary['transformers']}).",
        f"- Final training CTC loss (mean of the last 20 steps of each kind): {summary['final_loss']:.4f} plain, "
        f"{summary['final_constrained_loss']:.4f} constrained.",
        f"- Greedy CER on the corpus `dev` split ({summary['dev_clips']} clips): {summary['dev_cer'] * 100:.2f}%.",
        "",
        "Regenerate (from the repository root, with the `espeak-ng` binary installed; results may vary slightly with",
        "another thread count, torch build or espeak-ng version):",
        "",
        f"    {summary['command']}",
        "",
    ]
    (output_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("speechllm_hf/quickstart/corpus/ctc_aligner"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--hidden_size", type=int, default=160)
    parser.add_argument("--num_layers", type=int, default=3)
    parser.add_argument("--conv_dim", type=int, nargs=7, default=[32, 48, 64, 96, 128, 128, 128])
    parser.add_argument("--mask_time_prob", type=float, default=0.0)
    parser.add_argument("--pause_prob", type=float, default=0.5, help="chance to insert pauses into a clip")
    parser.add_argument("--max_pauses", type=int, default=4, help="most pauses inserted into a clip")
    parser.add_argument("--blank_weight", type=float, default=1.0, help="weight of the blank loss on inserted silence")
    parser.add_argument("--max_lead_silence", type=float, default=0.4, help="seconds of silence put before a clip")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (one is fastest on a shared or 2-core machine)"
    )
    parser.add_argument("--eval_every", type=int, default=0, help="log the dev CER every N steps (0: at the end)")
    parser.add_argument(
        "--constrained_every", type=int, default=2, help="every N-th step is a boundary-constrained word-clip step"
    )
    parser.add_argument(
        "--word_gap", type=float, nargs=2, default=[0.04, 0.3], help="pause range between words of word clips (s)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    processor = build_processor()
    model = build_model(args, processor.tokenizer)
    train_rows, dev_rows = load_rows("train"), load_rows("dev")
    word_rows = synthesise_word_clips(train_rows, random.Random(args.seed + 1), args)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{parameters:,} parameters; {len(train_rows)} train clips (+ {len(word_rows)} word by word) / "
        f"{len(dev_rows)} dev clips",
        flush=True,
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(args.seed)
    batches: list[list[dict]] = []
    word_batches: list[list[dict]] = []
    losses: list[float] = []  # plain CTC steps
    constrained_losses: list[float] = []  # boundary-constrained word-clip steps
    model.train()
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="Training the CTC aligner")
    for step in progress:
        if args.constrained_every and step % args.constrained_every == args.constrained_every - 1:
            if not word_batches:
                word_batches = length_batches(word_rows, args.batch_size, rng)
            rows = word_batches.pop()
            num_frames = int(model._get_feat_extract_output_lengths(max(len(r["waveform"]) for r in rows)))
            batch = collate([{**r, "silent": np.zeros(len(r["waveform"]), bool)} for r in rows], processor, num_frames)
            del batch["silent"], batch["labels"]
            log_probs = model(**batch).logits.log_softmax(dim=-1)  # (B, T, V)
            loss = segment_ctc_loss(log_probs, rows, processor.tokenizer, num_frames)
            constrained_losses.append(loss.item())
        else:
            if not batches:
                batches = length_batches(train_rows, args.batch_size, rng)
            rows = [augment(row, rng, args) for row in batches.pop()]
            num_frames = int(model._get_feat_extract_output_lengths(max(len(r["waveform"]) for r in rows)))
            batch = collate(rows, processor, num_frames)
            silent = batch.pop("silent")  # (B, T)
            output = model(**batch)
            # Inserted silence must be blank: CTC alone lets a model emit a label anywhere, e.g. the first word's
            # letters in the silence before it, which is fine for recognition and wrong for alignment.
            blank = output.logits.log_softmax(dim=-1)[..., processor.tokenizer.pad_token_id]  # (B, T)
            blank_loss = -(blank * silent).sum() / silent.sum().clamp(min=1)
            loss = output.loss + args.blank_weight * blank_loss
            losses.append(output.loss.item())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if losses and constrained_losses:
            progress.set_postfix(
                loss=f"{np.mean(losses[-20:]):.3f}", constrained=f"{np.mean(constrained_losses[-20:]):.3f}"
            )
        if args.eval_every and (step + 1) % args.eval_every == 0:
            cer, hyps = greedy_cer(model, processor, dev_rows)
            print(
                f"step {step + 1}: loss {np.mean(losses[-20:]):.4f}, constrained loss "
                f"{np.mean(constrained_losses[-20:]):.4f}, dev CER {cer:.4f}; e.g. {hyps[0]!r}",
                flush=True,
            )
    minutes = (time.perf_counter() - start) / 60
    dev_cer, hypotheses = greedy_cer(model, processor, dev_rows)
    print(f"dev CER {dev_cer:.4f} after {minutes:.1f} min; e.g. {hypotheses[:3]}", flush=True)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.output_dir)  # float16 storage halves the checkpoint; it loads as float32
    processor.save_pretrained(args.output_dir)
    size_mb = (args.output_dir / "model.safetensors").stat().st_size / 1e6
    import transformers

    write_readme(
        args.output_dir,
        {
            **{k: getattr(args, k) for k in ("seed", "steps", "batch_size", "lr", "warmup", "mask_time_prob")},
            **{
                k: getattr(args, k)
                for k in (
                    "hidden_size",
                    "num_layers",
                    "pause_prob",
                    "max_pauses",
                    "max_lead_silence",
                    "blank_weight",
                    "constrained_every",
                    "word_gap",
                )
            },
            "conv_dim": ",".join(map(str, args.conv_dim)),
            "parameters": parameters,
            "size_mb": size_mb,
            "command": shlex.join(["python", "scripts/train_ctc_aligner.py", *sys.argv[1:]]),
            "train_minutes": minutes,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "final_loss": float(np.mean(losses[-20:])),
            "final_constrained_loss": float(np.mean(constrained_losses[-20:])),
            "dev_clips": len(dev_rows),
            "dev_cer": dev_cer,
        },
    )
    print(f"Saved to {args.output_dir} ({size_mb:.2f} MB)")


if __name__ == "__main__":
    main()
