#!/usr/bin/env bash
# Advantage Model (AM) reward model with OpenRLHF 0.11.x on GPUs, and the plain BT model to compare.
#
# DATASET: preference pairs with prompt/chosen/rejected fields and a task field (TASK_KEY, e.g. the
# category or source of each pair). Each run writes <output_dir>/rm_eval_metrics.json (pairwise accuracy,
# ECE with 10 bins, per-task score mean/std after every evaluation) and saves a stock OpenRLHF reward
# model whose config.json holds the per-task statistics (lsc_am_task_stats); PPO loads it unchanged.
set -euo pipefail

MODEL=${MODEL:-OpenRLHF/Llama-3-8b-sft-mixture}
DATASET=${DATASET:?set DATASET to a preference dataset with a task field}
EVAL_DATASET=${EVAL_DATASET:?set EVAL_DATASET to a held-out split of it}
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
deepspeed --module openrlhf_lsc.cli.train_rm "${common[@]}" \
  --ckpt.output_dir "$OUT/rm_am" \
  --model.loss_type am --am.margin 2.5 \
  --am.expected_coef 1.0 --am.bound_coef 1.0 --am.task_coef 1.0 --am.task_std 1.0

# Plain Bradley-Terry on the same data, with the same evaluation (accuracy, ECE, per-task mean/std).
deepspeed --module openrlhf_lsc.cli.train_rm "${common[@]}" \
  --ckpt.output_dir "$OUT/rm_bt" \
  --model.loss_type sigmoid
