"""Test-only harness that runs OpenRLHF's real `train_ppo_ray` on a CPU machine (no GPU, no vLLM).

- `tiny_models`: tiny Llama policy, two reward models, tokenizer and prompts built from configs;
- `fake_vllm`: a Ray rollout actor with the vLLM engine interface, generating with HF `generate`;
- `worker_shims`: per-process CPU shims (loaded in the driver and every Ray worker);
- `driver`: starts Ray with logical GPUs and runs the plugin CLI on them.
"""
