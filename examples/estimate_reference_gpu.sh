#!/usr/bin/env bash
# Per-prompt references r_ref(x) for LSC PPO (paper 1, section 5.2 / appendix A.1) on one 8-GPU node:
# 4 vLLM engines sample k = 64 responses per prompt from the SFT policy, each reward model is scored on
# 2 Ray actors (one GPU each). Helpfulness: 0.75-quantile of the 64 scores; harmlessness: the median
# (the paper's RLHF setting). Rerun the same command to resume after an interruption; --overwrite restarts.
#
# Cheaper at scale: --ref.method learned samples only --learned.num_prompts prompts and predicts the rest
# from MiniLM prompt embeddings (report.json gives its held-out MAE / Spearman against empirical quantiles).
#
# Local reward models score in Ray actors (--rm.num_actors): with vLLM engines on the node, the driver may not load
# them itself. If some prompts end without a reference the run exits 1 and lists them in $OUT/errors.jsonl; rerun
# the same command to retry them, or add --output.drop_failed to write references.jsonl without them.
#
# Then train with: --data.prompt_dataset $OUT/references.jsonl --data.label_key lsc_ref --lsc.reference label
set -euo pipefail
SFT=${SFT:-OpenRLHF/Llama-3-8b-sft-mixture}
RM_HELPFUL=${RM_HELPFUL:-/ckpt/rm_helpful}
RM_HARMLESS=${RM_HARMLESS:-/ckpt/rm_harmless}
PROMPTS=${PROMPTS:-OpenRLHF/prompt-collection-v0.1}
OUT=${OUT:-/data/refs}

python -m openrlhf_lsc.cli.estimate_reference \
   --data.prompt_dataset "$PROMPTS" --data.input_key context_messages --data.apply_chat_template \
   --data.max_samples 100000 --data.max_len 2048 --data.label_key lsc_ref \
   --actor.model_name_or_path "$SFT" \
   --rollout.max_new_tokens 1024 --rollout.temperature 1.0 --rollout.top_p 1.0 \
   --vllm.num_engines 4 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.9 \
   --rm.paths "$RM_HELPFUL,$RM_HARMLESS" --rm.names helpful,harmless \
   --rm.num_actors 2 --rm.num_gpus_per_actor 1 --rm.batch_size 64 \
   --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2 \
   --ref.method quantile --ref.q 0.75,0.5 --ref.k 64 --ref.quantiles 0.5,0.75,0.85 \
   --output.dir "$OUT" --output.shard_size 512 \
   "$@"
