#!/usr/bin/env bash
# GPUs:   1 node x 8 GPUs, 80 GB each (A100/H100 80GB)
# Models: policy 8B (OpenRLHF/Llama-3-8b-sft-mixture), reference = policy, critic 8B (initialised from the
#         Advantage Model), 1 reward model 8B (the Advantage Model of examples/train_am_rm.sh)
# Layout: OpenRLHF's hybrid engine (--train.colocate_all, as its examples/scripts/train_ppo_ray_hybrid_engine.sh):
#         actor, reference, critic and reward model (ZeRO-3 over the 8 GPUs) and 4 vLLM engines (tensor
#         parallel 2) share the 8 GPUs; vLLM and DeepSpeed take turns (--vllm.enable_sleep --ds.enable_sleep).
#         The rehearsal NLL is a second forward of the actor in each training step (ZeRO-3 gathers the
#         weights again for it): budget activation memory for --lsc.rehearsal.micro_batch_size pairs more.
#
# Selective Rehearsal, step 2 (paper 2): PPO on the selected prompts with the rehearsal loss
# L = L_PPO + 0.01 * NLL(D_R), computed in the actor's single backward pass. Only the module, the prompt file
# and --lsc.rehearsal.* differ from a stock OpenRLHF 0.11.x launch.
# Logs train/rehearsal_nll and train/rehearsal_coef; --ckpt.load_enable resumes D_R where it stopped.
# Every actor reads --lsc.rehearsal.dataset itself: on several nodes the file must exist at the same path on
# each of them (shared storage), like --data.prompt_dataset on the driver.
# Step 1 (selection): examples/select_rehearsal.sh.
set -euo pipefail
SFT=${SFT:-OpenRLHF/Llama-3-8b-sft-mixture}
RM=${RM:-/ckpt/llama3-8b-am}
SPLIT=${SPLIT:-/data/rehearsal_split}   # output of step 1

python -m openrlhf_lsc.cli.train_ppo_ray \
   --actor.num_nodes 1 --actor.num_gpus_per_node 8 \
   --ref.num_nodes 1 --ref.num_gpus_per_node 8 \
   --critic.num_nodes 1 --critic.num_gpus_per_node 8 \
   --reward.num_nodes 1 --reward.num_gpus_per_node 8 \
   --vllm.num_engines 4 --vllm.tensor_parallel_size 2 --vllm.gpu_memory_utilization 0.5 \
   --train.colocate_all --vllm.enable_sleep --ds.enable_sleep --vllm.sync_backend nccl --vllm.enforce_eager \
   --actor.model_name_or_path "$SFT" --reward.model_name_or_path "$RM" \
   --ckpt.output_dir /ckpt/llama3-8b-ppo-rehearsal --ckpt.path /ckpt/llama3-8b-ppo-rehearsal/ds --ckpt.save_steps 20 \
   --train.micro_batch_size 8 --train.batch_size 128 \
   --rollout.micro_batch_size 16 --rollout.batch_size 1024 \
   --data.max_samples 100000 --train.max_epochs 1 --data.max_len 2048 --rollout.max_new_tokens 1024 \
   --ds.zero_stage 3 --ds.param_dtype bf16 \
   --actor.adam.lr 5e-7 --critic.adam.lr 9e-6 --algo.kl.init_coef 0.01 \
   --data.prompt_dataset "$SPLIT/ppo_prompts.jsonl" --data.input_key input --data.apply_chat_template \
   --actor.gradient_checkpointing_enable --ds.packing_samples \
   --lsc.rehearsal.dataset "$SPLIT/rehearsal.jsonl" --lsc.rehearsal.coef 0.01 \
   --lsc.rehearsal.input_key input --lsc.rehearsal.output_key output --lsc.rehearsal.micro_batch_size 2 \
   "$@"
