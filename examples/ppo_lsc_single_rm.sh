#!/usr/bin/env bash
# GPUs:   1 node x 8 GPUs, 80 GB each (A100/H100 80GB)
# Models: policy 8B (OpenRLHF/Llama-3-8b-sft-mixture), reference = policy, critic 8B (initialised from the
#         reward model), 1 reward model 8B
# Layout: OpenRLHF's hybrid engine, as its own examples/scripts/train_ppo_ray_hybrid_engine.sh: actor,
#         reference, critic and reward model (ZeRO-3 over the 8 GPUs) and 4 vLLM engines (tensor parallel 2)
#         share the 8 GPUs (--train.colocate_all); vLLM sleeps while DeepSpeed trains and DeepSpeed's states
#         leave the GPUs while vLLM generates (--vllm.enable_sleep --ds.enable_sleep).
#
# PPO with one helpfulness reward model, LSC-transformed against the SFT policy's 85th percentile
# (paper 1, section 5). Only the module and the --lsc.* flags differ from a stock OpenRLHF 0.11.x launch.
#
# 1. References (once, same 8 GPUs: 4 vLLM engines + 4 reward-model actors): k = 64 SFT samples per prompt,
#    0.85-quantile, written to the label field lsc_ref:
#    python -m openrlhf_lsc.cli.estimate_reference --data.prompt_dataset OpenRLHF/prompt-collection-v0.1 \
#        --data.input_key context_messages --data.apply_chat_template \
#        --actor.model_name_or_path $SFT --rm.paths $RM_HELPFUL --rm.names helpful \
#        --ref.method quantile --ref.k 64 --ref.q 0.85 --vllm.num_engines 4 --rm.num_actors 4 --output.dir /data/refs
#    (writes /data/refs/references.jsonl with the label field lsc_ref)
# 2. PPO:
set -euo pipefail
SFT=${SFT:-OpenRLHF/Llama-3-8b-sft-mixture}
RM_HELPFUL=${RM_HELPFUL:-/ckpt/rm_helpful}
PROMPTS=${PROMPTS:-/data/refs/references.jsonl}   # output of step 1

python -m openrlhf_lsc.cli.train_ppo_ray \
   --actor.num_nodes 1 --actor.num_gpus_per_node 8 \
   --ref.num_nodes 1 --ref.num_gpus_per_node 8 \
   --critic.num_nodes 1 --critic.num_gpus_per_node 8 \
   --reward.num_nodes 1 --reward.num_gpus_per_node 8 \
   --vllm.num_engines 4 --vllm.tensor_parallel_size 2 --vllm.gpu_memory_utilization 0.5 \
   --train.colocate_all --vllm.enable_sleep --ds.enable_sleep --vllm.sync_backend nccl --vllm.enforce_eager \
   --actor.model_name_or_path "$SFT" \
   --ckpt.output_dir /ckpt/llama3-8b-ppo-lsc \
   --train.micro_batch_size 8 --train.batch_size 128 \
   --rollout.micro_batch_size 16 --rollout.batch_size 1024 \
   --data.max_samples 100000 --train.max_epochs 1 --data.max_len 2048 --rollout.max_new_tokens 1024 \
   --ds.zero_stage 3 --ds.param_dtype bf16 \
   --actor.adam.lr 5e-7 --critic.adam.lr 9e-6 --algo.kl.init_coef 0.01 \
   --data.prompt_dataset "$PROMPTS" --data.input_key context_messages --data.apply_chat_template \
   --actor.gradient_checkpointing_enable --ds.packing_samples \
   --lsc.reward_models "$RM_HELPFUL" --lsc.reward_names helpful \
   --lsc.transform lsc --lsc.reference label --data.label_key lsc_ref \
   "$@"
