#!/usr/bin/env bash
# GPUs:   1 node x 8 GPUs, 80 GB each (A100/H100 80GB); DeepSpeed ZeRO-3 shards the model over the 8
# Models: reward models 8B, initialised from OpenRLHF/Llama-3-8b-sft-mixture (one AM run, then one BT run)
#
# Advantage Model (AM) reward model with OpenRLHF 0.11.x, and the plain BT model to compare.
# DATASET: preference pairs with prompt/chosen/rejected fields and a task field (TASK_KEY, e.g. the
# category or source of each pair). Each run writes <output_dir>/rm_eval_metrics.json (pairwise accuracy,
# ECE with 10 bins, per-task score mean/std after every evaluation, each pair counted once over all GPUs) and
# saves a stock OpenRLHF reward model whose config.json holds the per-task statistics (lsc_am_task_stats);
# PPO loads it unchanged. The AM's running per-task statistics are shared by all GPUs and saved in the
# DeepSpeed checkpoints (--ckpt.save_steps), so --ckpt.load_enable resumes them.
set -euo pipefail

MODEL=${MODEL:-OpenRLHF/Llama-3-8b-sft-mixture}
DATASET=${DATASET:-/data/preferences_train.jsonl}
EVAL_DATASET=${EVAL_DATASET:-/data/preferences_eval.jsonl}
TASK_KEY=${TASK_KEY:-task}
OUT=${OUT:-./checkpoint}

common=(
  --model.model_name_or_path "$MODEL"
  --data.dataset "$DATASET" --eval.dataset "$EVAL_DATASET"
  --data.prompt_key prompt --data.chosen_key chosen --data.rejected_key rejected
  --data.max_len 2048  # add --data.apply_chat_template when the fields hold chat messages
  --train.micro_batch_size 4 --train.batch_size 256 --train.max_epochs 1
  --adam.lr 9e-6 --ds.zero_stage 3 --ds.param_dtype bf16
  --ds.attn_implementation flash_attention_2
  --model.gradient_checkpointing_enable
  --logger.logging_steps 1 --eval.steps 100 --ckpt.save_steps -1
  --am.task_key "$TASK_KEY"
)

# Advantage Model: score = advantage, bounded by --am.margin, per-task mean 0 and std --am.task_std.
deepspeed --num_gpus 8 --module openrlhf_lsc.cli.train_rm "${common[@]}" \
  --ckpt.output_dir "$OUT/rm_am" \
  --model.loss_type am --am.margin 2.5 \
  --am.expected_coef 1.0 --am.bound_coef 1.0 --am.task_coef 1.0 --am.task_std 1.0

# Plain Bradley-Terry on the same data, with the same evaluation (accuracy, ECE, per-task mean/std).
deepspeed --num_gpus 8 --module openrlhf_lsc.cli.train_rm "${common[@]}" \
  --ckpt.output_dir "$OUT/rm_bt" \
  --model.loss_type sigmoid
