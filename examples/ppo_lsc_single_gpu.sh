#!/usr/bin/env bash
# GPUs:   1 node x 1 GPU, 80 GB (A100/H100 80GB)
# Models: policy ~0.5B (Qwen/Qwen2.5-0.5B-Instruct), reference = policy, critic ~0.5B (initialised from the
#         reward model), 1 reward model ~0.5B (e.g. trained from the same base with examples/train_am_rm.sh)
# Layout: everything on the one GPU (--train.colocate_all): actor, reference, critic, reward model and one
#         vLLM engine each hold a 0.2 share of it in Ray; vLLM sleeps while DeepSpeed trains and DeepSpeed's
#         states leave the GPU while vLLM generates (--vllm.enable_sleep --ds.enable_sleep).
#
# A first LSC run that needs no precomputed references: the reference of each prompt is the median reward
# of its own 4 rollouts (--lsc.reference group: a moving reference, not the paper's SFT reference; for that,
# compute labels with python -m openrlhf_lsc.cli.estimate_reference and use --lsc.reference label).
set -euo pipefail
SFT=${SFT:-Qwen/Qwen2.5-0.5B-Instruct}
RM=${RM:-/ckpt/qwen2.5-0.5b-rm}
PROMPTS=${PROMPTS:-OpenRLHF/prompt-collection-v0.1}
OUT=${OUT:-/ckpt/qwen2.5-0.5b-ppo-lsc}

python -m openrlhf_lsc.cli.train_ppo_ray \
   --actor.num_nodes 1 --actor.num_gpus_per_node 1 \
   --ref.num_nodes 1 --ref.num_gpus_per_node 1 \
   --critic.num_nodes 1 --critic.num_gpus_per_node 1 \
   --reward.num_nodes 1 --reward.num_gpus_per_node 1 \
   --vllm.num_engines 1 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.4 \
   --train.colocate_all --vllm.enable_sleep --ds.enable_sleep --vllm.sync_backend nccl --vllm.enforce_eager \
   --actor.model_name_or_path "$SFT" --reward.model_name_or_path "$RM" \
   --ckpt.output_dir "$OUT" \
   --train.micro_batch_size 8 --train.batch_size 64 \
   --rollout.micro_batch_size 16 --rollout.batch_size 64 --rollout.n_samples_per_prompt 4 \
   --data.max_samples 20000 --train.max_epochs 1 --data.max_len 1024 --rollout.max_new_tokens 512 \
   --ds.zero_stage 2 --ds.param_dtype bf16 \
   --actor.adam.lr 1e-6 --critic.adam.lr 9e-6 --algo.kl.init_coef 0.01 \
   --data.prompt_dataset "$PROMPTS" --data.input_key context_messages --data.apply_chat_template \
   --actor.gradient_checkpointing_enable --ds.packing_samples \
   --lsc.transform lsc --lsc.reference group --lsc.quantile 0.5 \
   "$@"
