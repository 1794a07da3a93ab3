#!/usr/bin/env bash
# PPO with one helpfulness reward model, LSC-transformed against the SFT policy's 85th percentile
# (paper 1, section 5). Stock OpenRLHF 0.11.x launch on one 8-GPU node; only the module and --lsc.* differ.
#
# 1. References (once): k = 64 SFT samples per prompt, 0.85-quantile, written to the label field lsc_ref:
#    python -m openrlhf_lsc.cli.estimate_reference --data.prompt_dataset $RAW_PROMPTS --data.apply_chat_template \
#        --actor.model_name_or_path $SFT --rm.paths $RM_HELPFUL --rm.names helpful \
#        --ref.method quantile --ref.k 64 --ref.q 0.85 --vllm.num_engines 8 --rm.num_actors 8 --output.dir /data/refs
#    (writes /data/refs/references.jsonl with the label field lsc_ref)
# 2. PPO:
set -euo pipefail
SFT=${SFT:-OpenRLHF/Llama-3-8b-sft-mixture}
RM_HELPFUL=${RM_HELPFUL:-/ckpt/rm_helpful}
PROMPTS=${PROMPTS:-/data/refs/references.jsonl}   # output of step 1

python -m openrlhf_lsc.cli.train_ppo_ray \
   --ref.num_nodes 1 --ref.num_gpus_per_node 2 \
   --reward.num_nodes 1 --reward.num_gpus_per_node 2 \
   --critic.num_nodes 1 --critic.num_gpus_per_node 2 \
   --actor.num_nodes 1 --actor.num_gpus_per_node 2 \
   --vllm.num_engines 2 --vllm.tensor_parallel_size 1 \
   --actor.model_name_or_path "$SFT" \
   --ckpt.output_dir /ckpt/llama3-8b-ppo-lsc \
   --train.micro_batch_size 8 --train.batch_size 128 \
   --rollout.micro_batch_size 16 --rollout.batch_size 1024 \
   --data.max_samples 100000 --train.max_epochs 1 --data.max_len 2048 --rollout.max_new_tokens 1024 \
   --ds.zero_stage 3 --ds.param_dtype bf16 \
   --actor.adam.lr 5e-7 --critic.adam.lr 9e-6 --algo.kl.init_coef 0.01 \
   --data.prompt_dataset "$PROMPTS" --data.input_key input --data.apply_chat_template \
   --actor.gradient_checkpointing_enable --ds.packing_samples \
   --lsc.reward_models "$RM_HELPFUL" --lsc.reward_names helpful \
   --lsc.transform lsc --lsc.reference label --data.label_key lsc_ref \
   "$@"
