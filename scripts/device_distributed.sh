#!/usr/bin/env bash
# Exercises examples/accelerate/{fsdp,deepspeed_zero2,deepspeed_zero3}.yaml on a machine with ONE CUDA GPU: a few
# steps of `speechllm-hf train` with the tiny preset (backbones saved to local folders first, so that every run loads
# the same frozen weights) under each config, 1 process each, and compares the trained projector with a plain
# single-process run (SGD: equal projectors mean equal gradients). One process shards nothing: this checks the
# wrapping, loading, training and saving paths, not communication between GPUs (no multi-process hang can show).
#
#   bash scripts/device_distributed.sh [WORK_DIR]      # from the repository root; no network needed
#
# Needs torch with CUDA, transformers, accelerate, and importable deepspeed, datasets, soundfile and soxr (on
# PYTHONPATH is fine). Prints one line per check, PASS, FAIL (with the last error line), HANG (killed at its time
# limit) or SKIP, and writes them with the tail of each failing log to $OUT/device_distributed.log when OUT is set.
# Each run has `timeout 120`; runs that no longer fit in 285 s in all are skipped.
set -u
WORK=${1:-/tmp/device_distributed}
BUDGET=${DEVICE_BUDGET:-285}  # seconds; later runs are skipped past it
rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
SUMMARY="$WORK/summary.txt"
: >"$SUMMARY"
PORT=29600
STATUS=

report() { echo "$1" | tee -a "$SUMMARY"; }

# Runs "$@" with a time limit and sets STATUS to PASS, FAIL or HANG; reports a failure or a hang under the name $1.
attempt() {
    local name=$1 log="$WORK/$1.log"
    shift
    local left=$((BUDGET - SECONDS))
    if ((left < 30)); then
        STATUS=SKIP
        report "SKIP  $name (no time left in the $BUDGET s budget)"
        return
    fi
    local limit=$((left < 120 ? left : 120))
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    if ((rc == 0)); then
        STATUS=PASS
    elif ((rc == 124 || rc == 137)); then
        STATUS=HANG
        report "HANG  $name (killed after $limit s; log $log)"
    else
        STATUS=FAIL
        local cause
        cause=$(grep -E "Error|error:|Exception" "$log" | tail -n 1 | cut -c1-220)
        report "FAIL  $name (exit $rc: ${cause:-see $log})"
    fi
}

# Trains with `speechllm-hf train` as run $1, plain (config "plain") or under the accelerate config $2, method $3.
train() {
    local name=$1 config=$2 method=$3
    shift 3
    local launch=(python -m speechllm_hf)
    if [[ $config != plain ]]; then
        PORT=$((PORT + 1))
        launch=(python -m accelerate.commands.launch --config_file "examples/accelerate/$config.yaml"
            --num_processes 1 --main_process_port "$PORT" -m speechllm_hf)
    fi
    attempt "$name" "${launch[@]}" train --method "$method" --preset tiny --projector_type mlp \
        --encoder_name_or_path "$WORK/backbones/hubert" --text_name_or_path "$WORK/backbones/llm" \
        --train_manifest speechllm_hf/quickstart/corpus/dev.jsonl --output_dir "$WORK/$name" --max_steps 3 \
        --per_device_train_batch_size 4 --optim sgd --learning_rate 0.5 --lr_scheduler_type constant \
        --warmup_steps 0 --max_grad_norm 1.0 --seed 0 --save_strategy no --report_to none --logging_steps 1 \
        --disable_tqdm true "$@"
}

# When run $1 trained, reports whether its projector equals that of the plain run $2. SGD at lr 0.5 for 3 steps: a
# lost or different batch moves weights by about 1e-2, float rounding and GPU kernels by far less than 1e-4.
compare() {
    [[ $STATUS == PASS ]] || return
    python "$WORK/compare.py" "$WORK/$1" "$WORK/$2" >>"$WORK/$1.log" 2>&1
    local rc=$? line
    line=$(tail -n 1 "$WORK/$1.log")
    if ((rc == 0)); then report "PASS  $1 ($line)"; else report "FAIL  $1 ($line)"; fi
}

cat >"$WORK/compare.py" <<'PYTHON'
import sys

from safetensors.torch import load_file

trained, reference = (load_file(f"{folder}/projector.safetensors") for folder in sys.argv[1:])
assert trained.keys() == reference.keys(), (sorted(trained), sorted(reference))
diff = max(float((trained[k].float() - reference[k].float()).abs().max()) for k in reference)
print(f"projector max |difference| from the plain run: {diff:.2e}")
sys.exit(0 if diff < 1e-4 else 1)
PYTHON

# ZeRO-3: the encoder (HuBERT) must be built outside deepspeed.zero.Init and the LLM inside, for a pretrained and a
# random encoder, with the ZeRO-3 config registered as `speechllm-hf train` registers it (its argument parsing).
cat >"$WORK/zero3_check.py" <<'PYTHON'
import sys

from transformers import TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

from speechllm_hf import from_preset

root = sys.argv[1]
args = TrainingArguments(output_dir=f"{root}/zero3-check", report_to="none")
assert is_deepspeed_zero3_enabled(), "the accelerate config did not register ZeRO-3"
ok = True
for encoder in (f"{root}/backbones/hubert", None):
    model, _ = from_preset("tiny", encoder_name_or_path=encoder, text_name_or_path=f"{root}/backbones/llm")
    counts = {}
    for part in ("encoder", "language_model"):
        flags = [hasattr(p, "ds_id") for p in getattr(model, part).parameters()]
        counts[part] = f"{sum(flags)}/{len(flags)}"
        ok &= (sum(flags) == 0) if part == "encoder" else (sum(flags) == len(flags) > 0)
    print(f"{'pretrained' if encoder else 'random'} encoder; partitioned parameters: {counts}")
ok &= is_deepspeed_zero3_enabled()  # registered again after the encoder
sys.exit(0 if ok else 1)
PYTHON

cat >"$WORK/backbones.py" <<'PYTHON'
import sys

import torch
from transformers import AutoModelForCausalLM, HubertModel, Wav2Vec2FeatureExtractor

from speechllm_hf.presets import tiny_encoder_config, tiny_text_config, tiny_tokenizer

root = sys.argv[1]
torch.manual_seed(1)
HubertModel(tiny_encoder_config("hubert")).save_pretrained(f"{root}/hubert")
Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(f"{root}/hubert")
tokenizer = tiny_tokenizer()
AutoModelForCausalLM.from_config(tiny_text_config(tokenizer)).save_pretrained(f"{root}/llm")
tokenizer.save_pretrained(f"{root}/llm")
PYTHON

cat >"$WORK/versions.py" <<'PYTHON'
import importlib

import torch

versions = {}
for name in ("torch", "transformers", "accelerate", "deepspeed", "datasets", "soundfile", "soxr"):
    try:
        versions[name] = importlib.import_module(name).__version__
    except Exception as err:  # reported; the runs that need it then fail with the same cause
        versions[name] = f"NOT IMPORTABLE ({type(err).__name__}: {err})"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA GPU (accelerate applies FSDP on GPUs only)"
print(f"INFO  {gpu}; " + ", ".join(f"{name} {version}" for name, version in versions.items()))
PYTHON

report "$(python "$WORK/versions.py" 2>&1 | tail -n 1)"

# Tiny HuBERT and Llama backbones in local folders, laid out as a Hub download leaves them.
attempt backbones python "$WORK/backbones.py" "$WORK/backbones"
[[ $STATUS == PASS ]] || exit 1

train asr-plain plain asr
if [[ $STATUS == PASS ]]; then
    report "PASS  asr-plain (the reference)"
    PORT=$((PORT + 1))
    attempt zero3-encoder-outside-zero-init python -m accelerate.commands.launch \
        --config_file examples/accelerate/deepspeed_zero3.yaml --num_processes 1 --main_process_port "$PORT" \
        "$WORK/zero3_check.py" "$WORK"
    if [[ $STATUS == PASS ]]; then
        report "PASS  zero3-encoder-outside-zero-init ($(grep encoder "$WORK/zero3-encoder-outside-zero-init.log" | tr '\n' ' '))"
    fi
    for config in deepspeed_zero3 deepspeed_zero2 fsdp; do
        train "asr-$config" "$config" asr
        compare "asr-$config" asr-plain
    done
    # Under ZeRO-3 each forward of the encoder gathers its partitioned weights; with a feature cache it runs once, on
    # process 0, before DeepSpeed wraps the model.
    train asr-deepspeed_zero3-feature-cache deepspeed_zero3 asr --feature_cache_dir "$WORK/cache"
    compare asr-deepspeed_zero3-feature-cache asr-plain
fi

# ContrastiveTrainer runs the encoder and the LLM's text branch outside the wrapped forward: DeepSpeed gathers weights
# per module, FSDP per unit, so the FSDP run is expected to fail (it does on CPU with fully_shard; docs/distributed.md).
train contrastive-plain plain contrastive
if [[ $STATUS == PASS ]]; then
    report "PASS  contrastive-plain (the reference)"
    for config in deepspeed_zero3 fsdp; do
        train "contrastive-$config" "$config" contrastive
        compare "contrastive-$config" contrastive-plain
    done
fi

report "INFO  done in $SECONDS s; logs in $WORK"
if [[ -n ${OUT:-} ]]; then
    {
        cat "$SUMMARY"
        for log in "$WORK"/*.log; do
            if grep -q -E "^(FAIL|HANG)  $(basename "$log" .log) " "$SUMMARY"; then
                echo "===== $log (last 40 lines)"
                tail -n 40 "$log"
            fi
        done
    } >"$OUT/device_distributed.log"
fi
