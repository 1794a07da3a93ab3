"""Plugin overhead on OpenRLHF's reward/advantage step, plugin vs stock side by side in one run.

For each size (prompts x samples per prompt; K = 2 reward models; 64 response tokens; micro-batches of 8
samples, as the experience maker hands them over) and each advantage estimator: stock
`RemoteExperienceMaker.compute_advantages_and_returns` on the summed raw reward vs the plugin's patched step
with `--lsc.transform lsc --lsc.aggregate and --lsc.reference label` (references read from every sample's JSON
label, as `openrlhf_lsc.cli.estimate_reference` writes them). The two alternate, each --repeats times on fresh copies
of the same batch; the table gives the fastest of each (noise on a shared machine only ever adds time) and their
ratio. Target: plugin <= 1.03x stock at every size. Single timings of the same step can differ by 20% or more on a
shared machine, so the table also times the plugin's own part of its step alone (`reward_hook`: the plugin step is
this hook followed by the stock step on the utilities) as a share of the stock step: 1 + that share is the ratio
without the noise. A last column pickles 64 of the experiences each step returns, as `ray.put` does when OpenRLHF
hands them to the actors: plugin/stock time and bytes.

    python benchmarks/bench_ppo_overhead.py [--prompts 256,1024,4096,8192] [--estimators gae,group_norm]
        [--samples 8] [--repeats 5] [--labels object|string] [--device cpu|cuda] [--out results.json] [--profile]

`--profile` adds, per size, where the plugin's extra time goes (cProfile of one plugin step, top functions).
On a machine without flash-attn/vLLM/Ray/datasets the test-only stand-ins of tests/ are put on the path.
"""

import argparse
import cProfile
import gc
import io
import json
import pickle
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
for module, stubs in (("vllm", "tests/stubs"), ("ray", "tests/gpu/stubs/ray"), ("datasets", "tests/gpu/stubs/datasets")):
    try:
        __import__(module)
    except ImportError:
        sys.path.insert(0, str(ROOT / stubs))
sys.path.insert(0, str(ROOT))

NAMES = ("helpful", "harmless")
SHIP = 64  # experiences pickled for the shipping column (the cost is per experience)
FLAGS = ["--lsc.transform", "lsc", "--lsc.aggregate", "and", "--lsc.reference", "label", "--data.label_key", "lsc_ref",
         "--lsc.reward_names", ",".join(NAMES)]


def batch(prompts: int, n: int, tokens: int, micro: int, device: str, plugin: bool, labels_as: str = "object"):
    """The experiences the reward/advantage step gets: [b, 2] rewards (plugin) or their sum (stock), and labels as
    OpenRLHF hands over the estimator's JSON-object field (`object`: dicts) or a field holding a JSON string."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    g = torch.Generator().manual_seed(0)
    total = prompts * n
    rewards = torch.randn(total, len(NAMES), generator=g).to(torch.bfloat16)
    stats = torch.randn(prompts, len(NAMES), 3, generator=g).tolist()  # mean, std, 0.85-quantile
    labels = [{name: {"reference": q, "method": "quantile", "q": 0.85, "k": 64, "mean": m, "std": abs(sd),
                      "quantiles": {"0.5": m, "0.85": q}} for name, (m, sd, q) in zip(NAMES, stats[p])}
              for p in range(prompts)]
    if labels_as == "string":
        labels = [json.dumps(label) for label in labels]
    out = []
    for start in range(0, total, micro):
        idx = list(range(start, min(start + micro, total)))
        r = (rewards[idx] if plugin else rewards[idx].float().sum(1)).to(device)
        out.append(Experience(
            index=idx, rewards=r, labels=[labels[i // n] for i in idx], prompts=[f"p{i // n}" for i in idx],
            action_mask=torch.ones(len(idx), tokens, device=device), kl=torch.zeros(len(idx), tokens, device=device),
            values=torch.zeros(len(idx), tokens, device=device), info={"reward": r},  # as OpenRLHF: same tensor
        ))
    return out


def maker(estimator: str, n: int, plugin: bool, lsc):
    import openrlhf.trainer.ppo_utils.experience_maker as em

    m = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
    m.advantage_estimator = estimator
    m.kl_ctl = SimpleNamespace(value=0.01)
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=n),
        reward=SimpleNamespace(clip_range=(-10, 10), overlong_buffer_len=None, stop_properly_penalty_coef=None),
        data=SimpleNamespace(label_key="lsc_ref"),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False)),
        lsc=lsc if plugin else None,
    )
    m.strategy = SimpleNamespace(args=args)
    return m


def lsc_config(estimator: str, n: int):
    """`args.lsc` as the plugin CLI builds it from FLAGS (its own parsing and checks; no model is loaded)."""
    import contextlib

    from openrlhf_lsc.cli import train_ppo_ray as cli

    argv = FLAGS + ["--lsc.reward_models", ",".join(NAMES), "--actor.model_name_or_path", "sft",
                    "--algo.advantage.estimator", estimator, "--rollout.n_samples_per_prompt", str(n)]
    with contextlib.redirect_stdout(io.StringIO()):  # its notes about the flags
        if hasattr(cli, "stock_cli"):  # the CLI built on stock's own parser and checks
            stock = cli.stock_cli()
            flat = stock.parse(argv)
            lsc = {k[4:]: flat.pop(k) for k in list(flat) if k.startswith("lsc.")}
            flat["reward.model_name_or_path"] = lsc.pop("reward_models")
            return cli.resolve(lsc, stock.check(flat))
        flat, _ = cli.build_parser().parse_known_args(argv)
        stock = SimpleNamespace(
            reward=SimpleNamespace(model_name_or_path=None, remote_url=None, clip_range=(-10, 10),
                                   stop_properly_penalty_coef=None),
            data=SimpleNamespace(label_key="lsc_ref"), rollout=SimpleNamespace(n_samples_per_prompt=n),
            algo=SimpleNamespace(advantage=SimpleNamespace(estimator=estimator)),
        )
        return cli.resolve(cli._namespace(flat), stock)


def timed(fn, m, exps, device):
    # The garbage of earlier batches is collected before, not during, a timed step: else it lands on either side.
    gc.collect()
    gc.disable()
    try:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(m, exps)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out
    finally:
        gc.enable()


def shipped(exps, repeats=3):
    """Fastest seconds, and bytes, to pickle and unpickle experiences, as `ray.put` / `ray.get` do when OpenRLHF hands
    them to the actors (Ray pickles torch tensors with their whole storage unless told otherwise)."""
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        data = pickle.dumps(exps, protocol=5)
        pickle.loads(data)
        seconds.append(time.perf_counter() - t0)
    return min(seconds), len(data)


def profile(fn, m, exps, top=8):
    prof = cProfile.Profile()
    prof.enable()
    fn(m, exps)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="256,1024,4096,8192", help="comma-separated prompt counts")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt")
    ap.add_argument("--estimators", default="gae,group_norm")
    ap.add_argument("--labels", choices=["object", "string"], default="object",
                    help="the label field as a JSON object (what estimate_reference writes; OpenRLHF hands over dicts) "
                         "or as a string holding one (parsed every step)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--micro_batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--target", type=float, default=1.03)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    opt = ap.parse_args()

    import openrlhf.trainer.ppo_utils.experience_maker as em

    from openrlhf_lsc.integration import register
    from openrlhf_lsc.integration.reward_path import reward_hook

    register()
    patched = em.RemoteExperienceMaker.compute_advantages_and_returns
    stock = patched.__lsc_original__
    n = opt.samples
    rows = []
    print(f"reward/advantage step, K = {len(NAMES)}, {opt.tokens} tokens, micro-batches of {opt.micro_batch}, "
          f"labels as {opt.labels}s, fastest of {opt.repeats}, device {opt.device}"
          + ("" if opt.device == "cuda" else " (CPU, not a GPU result)"))
    print(f"| prompts x {n} | estimator | stock s | plugin s | plugin/stock | reward hook s | hook/stock "
          f"| shipping {SHIP} experiences: plugin/stock s (bytes) |")
    print("|---|---|---|---|---|---|---|---|")
    for prompts in map(int, opt.prompts.split(",")):
        for estimator in opt.estimators.split(","):
            lsc = lsc_config(estimator, n)
            times, outputs = {"stock": [], "plugin": [], "hook": []}, {}
            hook = lambda m, exps: reward_hook(exps, m.strategy.args)  # noqa: E731  the plugin's own part of its step
            for _ in range(opt.repeats):
                for name, fn, plugin in (("stock", stock, False), ("plugin", patched, True), ("hook", hook, True)):
                    exps = batch(prompts, n, opt.tokens, opt.micro_batch, opt.device, plugin, opt.labels)
                    seconds, outputs[name] = timed(fn, maker(estimator, n, plugin, lsc), exps, opt.device)
                    times[name].append(seconds)
            row = {"prompts": prompts, "samples": n, "estimator": estimator, "times": times,
                   **{f"{k}_s": min(v) for k, v in times.items()}}
            row["ratio"] = row["plugin_s"] / row["stock_s"]
            row["hook_share"] = row["hook_s"] / row["stock_s"]
            ship = {name: shipped(outputs[name][:SHIP]) for name in ("stock", "plugin")}
            row["ship"] = {name: {"s": t, "bytes": size} for name, (t, size) in ship.items()}
            row["ship_ratio"] = ship["plugin"][0] / ship["stock"][0]
            row["ship_bytes_ratio"] = ship["plugin"][1] / ship["stock"][1]
            if opt.profile:
                exps = batch(prompts, n, opt.tokens, opt.micro_batch, opt.device, True, opt.labels)
                row["profile"] = profile(patched, maker(estimator, n, True, lsc), exps)
            rows.append(row)
            if opt.out:  # after every row: a run cut short keeps what it measured
                write(opt, rows)
            flag = "" if row["ratio"] <= opt.target else f"  (above {opt.target}x)"
            print(f"| {prompts} | {estimator} | {row['stock_s']:.4f} | {row['plugin_s']:.4f} | {row['ratio']:.3f}x{flag} "
                  f"| {row['hook_s']:.4f} | {row['hook_share']:.3f} | {row['ship_ratio']:.2f}x "
                  f"({row['ship_bytes_ratio']:.2f}x) |", flush=True)
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.3f}x: {'meets' if worst <= opt.target else 'misses'} the target <= {opt.target}x")
    if opt.profile:
        for r in rows:
            print(f"\n--- plugin step profile, {r['prompts']} x {n}, {r['estimator']} ---\n{r['profile']}")


def write(opt, rows):
    result = {"config": vars(opt), "device_name": torch.cuda.get_device_name() if opt.device == "cuda" else "cpu",
              "rows": rows, "worst_ratio": max(r["ratio"] for r in rows)}
    Path(opt.out + ".tmp").write_text(json.dumps(result, indent=1))
    Path(opt.out + ".tmp").replace(opt.out)


if __name__ == "__main__":
    main()
