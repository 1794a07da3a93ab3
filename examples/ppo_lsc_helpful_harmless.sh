#!/usr/bin/env bash
# PPO with helpfulness AND harmlessness (paper 1, section 4): two local reward models scored in OpenRLHF's
# reward actors, each LSC-transformed against its own reference, summed (log P(good on both)).
# References from the estimator: helpfulness at q = 0.75, harmlessness at the median (the paper's RLHF setting):
#    python -m openrlhf_lsc.cli.estimate_reference --data.prompt_dataset $RAW_PROMPTS --data.apply_chat_template \
#        --actor.model_name_or_path $SFT --rm.paths $RM_HELPFUL,$RM_HARMLESS --rm.names helpful,harmless \
#        --ref.method quantile --ref.k 64 --ref.q 0.75,0.5 --vllm.num_engines 8 --rm.num_actors 8 --output.dir /data/refs
# Baseline for comparison: the same launch with --lsc.transform raw --lsc.aggregate weighted --lsc.weights 0.5,0.5
set -euo pipefail
SFT=${SFT:-OpenRLHF/Llama-3-8b-sft-mixture}
RM_HELPFUL=${RM_HELPFUL:-/ckpt/rm_helpful}
RM_HARMLESS=${RM_HARMLESS:-/ckpt/rm_harmless}
PROMPTS=${PROMPTS:-/data/refs/references.jsonl}

python -m openrlhf_lsc.cli.train_ppo_ray \
   --ref.num_nodes 1 --ref.num_gpus_per_node 2 \
   --reward.num_nodes 1 --reward.num_gpus_per_node 2 \
   --critic.num_nodes 1 --critic.num_gpus_per_node 2 \
   --actor.num_nodes 1 --actor.num_gpus_per_node 2 \
   --vllm.num_engines 2 --vllm.tensor_parallel_size 1 \
   --actor.model_name_or_path "$SFT" \
   --critic.model_name_or_path "$RM_HELPFUL" \
   --ckpt.output_dir /ckpt/llama3-8b-ppo-lsc-and \
   --train.micro_batch_size 8 --train.batch_size 128 \
   --rollout.micro_batch_size 16 --rollout.batch_size 1024 \
   --data.max_samples 100000 --train.max_epochs 1 --data.max_len 2048 --rollout.max_new_tokens 1024 \
   --ds.zero_stage 3 --ds.param_dtype bf16 \
   --actor.adam.lr 5e-7 --critic.adam.lr 9e-6 --algo.kl.init_coef 0.01 \
   --data.prompt_dataset "$PROMPTS" --data.input_key input --data.apply_chat_template \
   --actor.gradient_checkpointing_enable --ds.packing_samples \
   --lsc.reward_models "$RM_HELPFUL,$RM_HARMLESS" --lsc.reward_names helpful,harmless \
   --lsc.transform lsc --lsc.aggregate and --lsc.reference label --data.label_key lsc_ref \
   --logger.wandb.project openrlhf_lsc \
   "$@"
