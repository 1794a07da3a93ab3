#!/usr/bin/env bash
# The CPU lab's world through the REAL plugin launch (OpenRLHF + Ray + vLLM + DeepSpeed) on one GPU.
#
# 1. Build the lab worlds (CPU is enough; each world folder holds the SFT policy, the two proxy reward models in
#    OpenRLHF's reward-model format, and prompt files whose fields lsc_ref_<setting> hold the references):
#       python -m openrlhf_lsc.lab --quick --out lab_out
# 2. Re-run one of the lab's PPO runs with OpenRLHF: its transform, aggregation, weights and reference field are
#    read from lab_out/world<seed>/runs/<RUN>.json (ls lab_out/world0/runs to pick one). The lab walks a staircase
#    of KL targets; OpenRLHF's adaptive KL controller works on the per-token KL (and its trainer marks it as
#    incompatible), so the replay uses the fixed coefficient the lab's controller held at the end of stair STAIR
#    (default: the last) and trains about as many samples as the lab did up to that stair:
#       LAB=lab_out/world0 RUN=and-helpful+harmless-lsc_AND_q0.75_0.5-test-s0 bash examples/lab_gpu.sh
#       LAB=lab_out/world0 RUN=and-helpful+harmless-weighted_w0.5-test-s0 STAIR=2 bash examples/lab_gpu.sh
# 3. Judge the result with the lab's gold utilities (same test prompts, thresholds and KL estimate as the lab):
#       python -m openrlhf_lsc.lab --evaluate "$OUT" --out lab_out --seed 0
# The lab's own PPO mirrors these settings on CPU (gae, gamma = lambda = 1, k1 KL in the reward, a critic from the
# SFT model with a fresh value head, constant lr); OpenRLHF adds vLLM sampling and bf16, so numbers match in
# distribution, not sample for sample.
set -euo pipefail
LAB=${LAB:-lab_out/world0}
RUN=${RUN:-and-helpful+harmless-lsc_AND_q0.75_0.5-test-s0}
STAIR=${STAIR:--1}
OUT=${OUT:-$LAB/gpu/$RUN-stair$STAIR}
SPEC="$LAB/runs/$RUN.json"
[ -f "$SPEC" ] || { echo "no lab run $SPEC: run the lab first (step 1) and pick RUN from $LAB/runs" >&2; exit 1; }

# Plugin flags for this run, from the lab's own record of it; the last word is the number of episodes.
read -r -a LSC_FLAGS <<< "$(python - "$SPEC" "$LAB" "$STAIR" <<'PY'
import json, math, sys
spec, lab, stair = sys.argv[1], sys.argv[2], int(sys.argv[3])
rec = json.load(open(spec))
run, st = rec["run"], rec["stairs"][stair]
props = run["properties"]
flags = ["--lsc.reward_models", ",".join(f"{lab}/models/rm_{p}" for p in props), "--lsc.reward_names", ",".join(props),
         "--lsc.transform", run["transform"], "--lsc.aggregate", run["aggregate"],
         "--critic.model_name_or_path", f"{lab}/models/sft", "--algo.kl.init_coef", repr(st["kl_coef"])]
if run["weights"]:
    flags += ["--lsc.weights", ",".join(map(str, run["weights"]))]
if run["label_key"]:
    flags += ["--lsc.reference", "label", "--data.label_key", run["label_key"]]
n_prompts = sum(1 for _ in open(f"{lab}/data/prompts_train.jsonl"))
samples = st.get("step", 150) * rec.get("ppo", {}).get("rollout_prompts", 64)
print(" ".join(flags + [str(max(1, math.ceil(samples / n_prompts)))]))
PY
)"
EPISODES=${LSC_FLAGS[-1]}
unset 'LSC_FLAGS[-1]'

python -m openrlhf_lsc.cli.train_ppo_ray \
   --actor.num_nodes 1 --actor.num_gpus_per_node 1 --ref.num_nodes 1 --ref.num_gpus_per_node 1 \
   --reward.num_nodes 1 --reward.num_gpus_per_node 1 --critic.num_nodes 1 --critic.num_gpus_per_node 1 \
   --vllm.num_engines 1 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.2 \
   --train.colocate_all --vllm.enable_sleep --ds.enable_sleep \
   --actor.model_name_or_path "$LAB/models/sft" \
   --data.prompt_dataset "$LAB/data/prompts_train.jsonl" --data.input_key input \
   --data.max_len 32 --rollout.max_new_tokens 16 \
   --rollout.batch_size 64 --rollout.micro_batch_size 64 --rollout.n_samples_per_prompt 1 \
   --train.batch_size 32 --train.micro_batch_size 32 --train.max_epochs 1 --train.num_episodes "$EPISODES" \
   --algo.advantage.estimator gae --algo.advantage.gamma 1 --algo.advantage.lambd 1 --algo.kl.estimator k1 \
   --actor.adam.lr 5e-4 --critic.adam.lr 1e-3 --actor.lr_scheduler constant --critic.lr_scheduler constant \
   --ds.zero_stage 2 --ds.param_dtype bf16 \
   --ckpt.output_dir "$OUT" \
   "${LSC_FLAGS[@]}" \
   "$@"
