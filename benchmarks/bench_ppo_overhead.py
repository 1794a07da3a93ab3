"""Plugin overhead on OpenRLHF's reward/advantage step, measured side by side in one run.

Same batch (default 1024 prompts x 8 samples, K = 2 reward models, 64 response tokens, micro-batches of 8):
stock `compute_advantages_and_returns` on the summed raw reward vs the patched one with
`--lsc.transform lsc --lsc.aggregate and --lsc.reference label` (references parsed from JSON labels).
Runs alternate and the median of each is reported with their ratio (target <= 1.05x).

    python benchmarks/bench_ppo_overhead.py [--prompts 1024] [--samples 8] [--estimator gae] [--repeats 5]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "stubs"))  # CPU: flash-attn/vLLM stand-ins


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--micro_batch", type=int, default=8)
    ap.add_argument("--estimator", default="gae")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    opt = ap.parse_args()

    import openrlhf.trainer.ppo_utils.experience_maker as em
    from openrlhf.trainer.ppo_utils.experience import Experience

    from openrlhf_lsc.integration import register

    register()
    stock = em.RemoteExperienceMaker.compute_advantages_and_returns.__lsc_original__
    patched = em.RemoteExperienceMaker.compute_advantages_and_returns

    n, total, T = opt.samples, opt.prompts * opt.samples, opt.tokens
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(total, 2, generator=g).to(torch.bfloat16)
    refs = torch.randn(opt.prompts, 2, generator=g)
    labels = [json.dumps({"helpful": {"reference": refs[i // n, 0].item()}, "harmless": {"reference": refs[i // n, 1].item()}})
              for i in range(total)]

    def batch(two_rms):
        out = []
        for start in range(0, total, opt.micro_batch):
            idx = list(range(start, start + opt.micro_batch))
            r = rewards[idx] if two_rms else rewards[idx].float().sum(1)
            out.append(Experience(index=idx, rewards=r.clone(), labels=[labels[i] for i in idx],
                                  action_mask=torch.ones(len(idx), T), kl=torch.zeros(len(idx), T),
                                  values=torch.zeros(len(idx), T), info={}))
        return out

    def maker(lsc):
        m = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
        m.advantage_estimator = opt.estimator
        m.kl_ctl = SimpleNamespace(value=0.01)
        args = SimpleNamespace(
            rollout=SimpleNamespace(n_samples_per_prompt=n),
            reward=SimpleNamespace(clip_range=(-10, 10), overlong_buffer_len=None, stop_properly_penalty_coef=None),
            data=SimpleNamespace(label_key="lsc_ref"),
            algo=SimpleNamespace(advantage=SimpleNamespace(estimator=opt.estimator, gamma=1.0, lambd=1.0, no_std_norm=False)),
        )
        if lsc:
            args.lsc = SimpleNamespace(transform="lsc", aggregate="and", weights=None, reference="label", quantile=None,
                                       reference_value=None, reward_names=["helpful", "harmless"], dump_rewards=None)
        m.strategy = SimpleNamespace(args=args)
        return m

    from openrlhf_lsc.integration.ppo import apply_lsc_rewards

    def transform_only(m, exps):
        apply_lsc_rewards(exps, m.strategy.args)

    times = {"stock": [], "plugin": [], "transform_only": []}
    for _ in range(opt.repeats):
        for name, fn, lsc in (("stock", stock, False), ("plugin", patched, True), ("transform_only", transform_only, True)):
            exps, m = batch(lsc), maker(lsc)
            t0 = time.perf_counter()
            fn(m, exps)
            times[name].append(time.perf_counter() - t0)
    result = {"config": vars(opt), "times": times}
    for name in times:
        result[f"{name}_median_s"] = statistics.median(times[name])
    result["ratio"] = result["plugin_median_s"] / result["stock_median_s"]
    print(f"{opt.prompts} prompts x {n} samples, K=2, {T} tokens, {opt.estimator}: stock {result['stock_median_s']:.3f}s, "
          f"plugin {result['plugin_median_s']:.3f}s (of which the LSC transform {result['transform_only_median_s']:.3f}s), "
          f"ratio {result['ratio']:.3f}x (target <= 1.05x)")
    if opt.out:
        Path(opt.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
