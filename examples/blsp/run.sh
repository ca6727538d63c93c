#!/usr/bin/env bash
# BLSP (Wang et al., arXiv 2309.00916) with speechllm_hf, end to end:
# stage 1 (pointer) -> continuation writing -> stage 2 behaviour alignment -> generation -> (push).
#
# Needs GPUs, an English ASR manifest, and the stage-1 instruction-tuned Llama-2-7B (see
# docs/stage1_instruction_tuning.md; Llama-2 is gated: `hf auth login`). Not runnable offline. Run from the repository
# root:
#   STAGE1_LLM=me/llama2-7b-blsp-stage1 ASR_MANIFEST=/data/asr/train.jsonl TEST_FILE=/data/asr/test.jsonl \
#       bash examples/blsp/run.sh
set -euo pipefail

STAGE1_LLM=${STAGE1_LLM:-out/llama2-7b-blsp-stage1}    # Hub id or folder of the stage-1 LLM; publish it to the Hub
                                                       # first if others are to load the projector (its config
                                                       # records this path)
ASR_MANIFEST=${ASR_MANIFEST:-/data/asr/train.jsonl}    # {"audio": path, "text": transcript} per line
TEST_FILE=${TEST_FILE:-/data/asr/test.jsonl}           # {"audio", "instruction"?, "reference"?} per line
WORK=${WORK:-out/blsp}
NUM_GPUS=${NUM_GPUS:-8}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-8}
EFFECTIVE_BATCH=768                                    # BLSP stage 2: sequences per optimiser step
ACCELERATE_CONFIG=examples/accelerate/ddp.yaml
NUM_PROC=${NUM_PROC:-16}
LOSS=${LOSS:-ce}                                       # ce (BLSP) or kl (BLSP-KD: KL to the transcript-fed LLM, T = 2)
HUB_REPO=${HUB_REPO:-}                                 # empty: do not push

ACCUMULATION=$((EFFECTIVE_BATCH / (PER_DEVICE_BATCH * NUM_GPUS)))
if ((PER_DEVICE_BATCH * NUM_GPUS * ACCUMULATION != EFFECTIVE_BATCH)); then
    echo "PER_DEVICE_BATCH x NUM_GPUS must divide $EFFECTIVE_BATCH" >&2
    exit 1
fi

launch() {
    accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" -m speechllm_hf "$@"
}

# 0. Stage 1 (text instruction tuning of Llama-2-7B on Alpaca) is plain causal-LM fine-tuning outside this package:
#    docs/stage1_instruction_tuning.md has the settings and a script; its output folder (or its Hub id) is STAGE1_LLM.

# 1. Validate the ASR audio once and read the report (train validates again; dropped rows are listed with a reason).
speechllm-hf prepare --manifest "$ASR_MANIFEST" --output_dir "$WORK/prepared" --num_proc "$NUM_PROC" --max_duration 30
cat "$WORK/prepared/report.json"

# 2. Continuation writing: the stage-1 LLM continues every transcript (BLSP prompt, greedy, at most 64 new tokens,
#    prompts of 192 tokens or more dropped, Whisper's English normaliser on the transcripts). The processes split the
#    rows; rerunning this command after an interruption resumes it.
launch continue-writing --text_model "$STAGE1_LLM" --manifest "$ASR_MANIFEST" \
    --output_file "$WORK/continuations.jsonl" --normalize --dtype bfloat16 --batch_size 32
cat "$WORK/continuations.report.json"

# 3. Stage 2: train the CNN adapter so that the frozen LLM writes the same continuation from the speech.
#    Defaults of --method continuation are BLSP's: AdamW lr 5e-5, weight decay 0.05, 1000 warmup steps then linear
#    decay, 1 epoch, bf16 on GPUs that support it, prompt file "blsp", loss on the continuation + EOS only.
LOSS_FLAGS=()
if [[ "$LOSS" == kl ]]; then LOSS_FLAGS=(--kl_weight 1 --ce_weight 0 --kl_temperature 2); fi
#    --chat_template blsp: BLSP's ###[Human]: template even if the stage-1 tokenizer was given a chat template.
launch train --method continuation --preset whisper-cnn --text_name_or_path "$STAGE1_LLM" --chat_template blsp \
    --train_manifest "$WORK/continuations.jsonl" --num_proc "$NUM_PROC" --max_duration 30 \
    --output_dir "$WORK/stage2" \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$ACCUMULATION" \
    --logging_steps 10 --save_steps 500 --save_total_limit 2 --report_to none \
    ${LOSS_FLAGS[@]+"${LOSS_FLAGS[@]}"}

# 4. Generation in BLSP's jsonl format, batched and length-sorted (greedy, at most 128 new tokens by default), with
#    the prompt file the model was trained with. Rows keep their fields and get `response`.
speechllm-hf generate --model "$WORK/stage2" --prompts blsp --dtype bfloat16 \
    --input_file "$TEST_FILE" --output_file "$WORK/responses.jsonl" --batch_size 16

# 5. The Gradio chat demo (the `demo` extra) on the stage-2 model; it blocks until Ctrl+C, so it is left for you:
#    speechllm-hf demo --model "$WORK/stage2" --prompts blsp --dtype bfloat16

# 6. Publish the adapter (about 47M parameters; the encoder and the LLM are referenced by id and revision).
if [[ -n "$HUB_REPO" ]]; then
    speechllm-hf push --model "$WORK/stage2" --repo_id "$HUB_REPO"
fi
