#!/usr/bin/env bash
# Contrastive task-independent pretraining (Zuefle & Niehues, arXiv 2412.15712) with speechllm_hf, end to end:
# prepare -> contrastive pretraining on ASR data -> retrieval check -> ASR + ST + SQA fine-tuning -> evaluation -> push.
#
# Needs GPUs, MuST-C and Spoken-SQuAD as parquet (layout below) and access to meta-llama/Llama-3.1-8B-Instruct
# (`hf auth login`). Not runnable offline. Run from the repository root:
#   DATA_HOME=/data HUB_REPO=me/hubert-qformer-llama3.1 bash examples/contrastive_pretraining/run.sh
#
# Expected data layout:
#   $DATA_HOME/mustc/en-{de,fr,it,es}/{train,tst-COMMON}/*.parquet  audio {array, sampling_rate}, duration, sentence, translation
#   $DATA_HOME/spoken_squad/{train,test}/*.parquet                    audio, duration, question, answer
set -euo pipefail

export DATA_HOME=${DATA_HOME:-/data}          # also read by eval_mustc_squad.yaml
MUSTC=$DATA_HOME/mustc
SQUAD=$DATA_HOME/spoken_squad
ASR_TRAIN=$MUSTC/en-de/train                  # the ASR data of the pretraining: English transcripts in `sentence`
LANGUAGES=(de fr it es)
WORK=${WORK:-out/contrastive_pretraining}
NUM_GPUS=${NUM_GPUS:-8}
ACCELERATE_CONFIG=examples/accelerate/ddp.yaml
NUM_PROC=${NUM_PROC:-16}                      # processes validating audio
MAX_DURATION=${MAX_DURATION:-30}              # train/prepare drop longer clips; HuBERT has no 30 s limit: raise it
                                              # (memory permitting) if your Spoken-SQuAD contexts are longer
SUBSET=${SUBSET:-}                            # "0.1": the paper's fine-tuning on a random 10% (seed 42)
HUB_REPO=${HUB_REPO:-}                        # empty: do not push

launch() {
    accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" -m speechllm_hf "$@"
}

# 1. Validate the ASR data once and read the report (train validates again; dropped rows are listed with a reason).
speechllm-hf prepare --manifest "$ASR_TRAIN" --output_dir "$WORK/prepared/asr_train" \
    --text_column sentence --num_proc "$NUM_PROC" --max_duration "$MAX_DURATION"
cat "$WORK/prepared/asr_train/report.json"

# 2. Contrastive pretraining (faithful defaults: InfoNCE text -> speech, tau 0.1, layers {0,5,...,25,32} summed,
#    in-batch negatives; AdamW lr 1e-4, cosine, 3% warmup, no weight decay, max length 2048).
#    Paper figures: 5 epochs, micro-batch 10 x gradient accumulation 2. --bf16 is a practical choice, not a paper figure.
launch train --method contrastive --preset hubert-qformer \
    --train_manifest "$ASR_TRAIN" --text_column sentence \
    --num_proc "$NUM_PROC" --max_duration "$MAX_DURATION" \
    --output_dir "$WORK/pretrain" --num_train_epochs 5 \
    --per_device_train_batch_size 10 --gradient_accumulation_steps 2 \
    --bf16 --logging_steps 10 --save_steps 1000 --save_total_limit 2 --report_to none

# 3. Held-out retrieval per layer (R@1/R@5 both ways, heat maps) on 500 tst-COMMON clips, on the GPU
#    (`speechllm-hf retrieval --model ... --manifest ... --output_dir ...` does the same on the CPU, over all rows).
python - "$WORK/pretrain" "$MUSTC/en-de/tst-COMMON" "$WORK/retrieval" <<'EOF'
import sys

from speechllm_hf import SpeechLlmForConditionalGeneration, SpeechLlmProcessor
from speechllm_hf.data import load_manifest
from speechllm_hf.evaluation.retrieval import evaluate_retrieval, write_retrieval_report

folder, split, output_dir = sys.argv[1:]
model = SpeechLlmForConditionalGeneration.from_pretrained(folder, dtype="bfloat16", device_map="cuda")
processor = SpeechLlmProcessor.from_pretrained(folder)
rows = load_manifest(split, text_column="sentence")
rows = rows.select(range(min(500, len(rows))))
results, similarities = evaluate_retrieval(model, processor, rows, text_column="sentence")
print(write_retrieval_report(results, similarities, output_dir))
EOF

# 4. ST rows need the target language in words (the instruction is "Translate the audio from English to German.");
#    MuST-C's parquet files do not carry it, so write a copy with a `target_language` column (this copies the audio).
python - "$MUSTC" "$WORK/st" "${LANGUAGES[@]}" <<'EOF'
import os
import sys

from speechllm_hf.data import load_manifest

NAMES = {"de": "German", "fr": "French", "it": "Italian", "es": "Spanish"}
mustc, output_dir, codes = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(output_dir, exist_ok=True)
for code in codes:
    rows = load_manifest(f"{mustc}/en-{code}/train", text_column="translation")
    rows = rows.add_column("target_language", [NAMES[code]] * len(rows))
    rows.to_parquet(f"{output_dir}/en-{code}.parquet")
EOF

# 5. Multi-task fine-tuning of the pretrained projector on MuST-C ASR + ST en->{de,fr,it,es} + Spoken-SQuAD.
#    Paper figures: 2 epochs, micro-batch 4 x gradient accumulation 5, same optimiser settings; optionally a random
#    10% of the combined set with seed 42. Only the projector trains (LoRA, --lora_r, would be a departure).
ST_MANIFESTS=()
for code in "${LANGUAGES[@]}"; do ST_MANIFESTS+=("st=$WORK/st/en-$code.parquet"); done
SUBSET_FLAGS=()
if [[ -n "$SUBSET" ]]; then SUBSET_FLAGS=(--data_subset "$SUBSET" --data_seed 42); fi
launch train --method asr --model "$WORK/pretrain" \
    --train_manifest "asr=$ASR_TRAIN" "${ST_MANIFESTS[@]}" "sqa=$SQUAD/train" \
    --text_column sentence --num_proc "$NUM_PROC" --max_duration "$MAX_DURATION" \
    --output_dir "$WORK/finetune" --num_train_epochs 2 \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 5 \
    --bf16 --logging_steps 10 --save_steps 1000 --save_total_limit 2 --report_to none \
    ${SUBSET_FLAGS[@]+"${SUBSET_FLAGS[@]}"}

# 6. Evaluation as in the paper: greedy, at most 200 new tokens, stop at a newline or <|eot_id|>.
#    Writes eval_mustc_squad_preds.json and eval_mustc_squad_scores.json (mean per-utterance WER and corpus WER,
#    BLEU/chrF, SQuAD EM/F1).
speechllm-hf evaluate --model "$WORK/finetune" --dtype bfloat16 \
    --data_config examples/contrastive_pretraining/eval_mustc_squad.yaml \
    --results_dir "$WORK/results" --batch_size 16

# 7. Publish the projector (a few tens of MB; the backbones are referenced by id and revision).
if [[ -n "$HUB_REPO" ]]; then
    speechllm-hf push --model "$WORK/finetune" --repo_id "$HUB_REPO"
fi
