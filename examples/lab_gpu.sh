#!/usr/bin/env bash
# The CPU lab's world through the REAL plugin launch (OpenRLHF + Ray + vLLM + DeepSpeed) on one GPU.
#
# 1. Build the lab world (CPU is enough; it writes the SFT policy, the two proxy reward models in OpenRLHF's
#    reward-model format, and prompt files whose field lsc_ref / lsc_ref_single holds the references):
#       python -m openrlhf_lsc.lab --quick --out lab_out
# 2. Re-run one of the lab's PPO runs with OpenRLHF: its transform, aggregation, weights and KL coefficient
#    are read from lab_out/runs/<RUN>.json (ls lab_out/runs to pick one):
#       LAB=lab_out RUN=and-helpful+harmless-lsc_AND-c0.03-s0 bash examples/lab_gpu.sh
#       LAB=lab_out RUN=and-helpful+harmless-weighted_w0.5-c0.03-s0 bash examples/lab_gpu.sh   # stock baseline
# 3. Judge the result with the lab's gold utilities (same eval prompts, thresholds and KL estimate as the lab):
#       python -m openrlhf_lsc.lab --evaluate "$OUT" --out lab_out
# The lab's own PPO mirrors these settings on CPU (gae, gamma = lambda = 1, k1 KL in the reward, constant lr);
# OpenRLHF adds vLLM sampling and bf16, so numbers match in distribution, not sample for sample.
set -euo pipefail
LAB=${LAB:-lab_out}
RUN=${RUN:-and-helpful+harmless-lsc_AND-c0.03-s0}
OUT=${OUT:-$LAB/gpu/$RUN}
SPEC="$LAB/runs/$RUN.json"
[ -f "$SPEC" ] || { echo "no lab run $SPEC: run the lab first (step 1) and pick RUN from $LAB/runs" >&2; exit 1; }

# Plugin flags for this run, from the lab's own record of it.
read -r -a LSC_FLAGS <<< "$(python - "$SPEC" "$LAB" <<'EOF'
import json, sys
spec, lab = sys.argv[1], sys.argv[2]
run = json.load(open(spec))["run"]
props = run["properties"]
flags = ["--lsc.reward_models", ",".join(f"{lab}/models/rm_{p}" for p in props), "--lsc.reward_names", ",".join(props),
         "--lsc.transform", run["transform"], "--lsc.aggregate", run["aggregate"],
         "--critic.model_name_or_path", f"{lab}/models/rm_{props[0]}", "--algo.kl.init_coef", repr(run["kl_coef"])]
if run["weights"]:
    flags += ["--lsc.weights", ",".join(map(str, run["weights"]))]
if run["transform"] in ("lsc", "center"):
    flags += ["--lsc.reference", "label", "--data.label_key", "lsc_ref" if run["experiment"] == "and" else "lsc_ref_single"]
print(" ".join(flags))
EOF
)"

# 336 training prompts / 32 per rollout = 10.5 steps per episode: 6 episodes ~ the lab's 60 PPO steps.
python -m openrlhf_lsc.cli.train_ppo_ray \
   --actor.num_nodes 1 --actor.num_gpus_per_node 1 --ref.num_nodes 1 --ref.num_gpus_per_node 1 \
   --reward.num_nodes 1 --reward.num_gpus_per_node 1 --critic.num_nodes 1 --critic.num_gpus_per_node 1 \
   --vllm.num_engines 1 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.2 \
   --train.colocate_all --vllm.enable_sleep --ds.enable_sleep \
   --actor.model_name_or_path "$LAB/models/sft" \
   --data.prompt_dataset "$LAB/data/prompts_train.jsonl" --data.input_key input \
   --data.max_len 32 --rollout.max_new_tokens 16 \
   --rollout.batch_size 32 --rollout.micro_batch_size 32 --rollout.n_samples_per_prompt 1 \
   --train.batch_size 32 --train.micro_batch_size 32 --train.max_epochs 1 --train.num_episodes 6 \
   --algo.advantage.estimator gae --algo.advantage.gamma 1 --algo.advantage.lambd 1 --algo.kl.estimator k1 \
   --actor.adam.lr 5e-4 --critic.adam.lr 1e-3 --actor.lr_scheduler constant --critic.lr_scheduler constant \
   --ds.zero_stage 2 --ds.param_dtype bf16 \
   --ckpt.output_dir "$OUT" \
   "${LSC_FLAGS[@]}" \
   "$@"
