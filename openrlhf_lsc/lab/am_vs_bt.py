"""`python -m openrlhf_lsc.lab.am_vs_bt --out DIR [--smoke]`: PPO with a Bradley-Terry RM vs PPO with an Advantage Model.

Two-task world (issue 4): the lab's prompts split by topic into a "code" task and a "qa" task. Both are
judged by the lab's gold helpfulness, but the preference labels are clean for code (verifiable) and noisy
for qa: P(a > b) = sigmoid((gold_a - gold_b) / T_task). A BT reward model trained on the pooled pairs then
scores code on a wider scale than qa; the Advantage Model (`openrlhf_lsc.am_loss`, same pairs, same
initialisation) pulls every task to mean 0 and the same spread. PPO (`lab.ppo.train`, GAE, advantages
whitened over the whole mixed batch) then runs with each proxy at a few KL coefficients.

Measured per task t on held-out eval prompts:
- gold win rate vs SFT: P(gold(policy sample) > gold(SFT sample)) + P(tie) / 2, same prompt, averaged over prompts;
- drift = share of the proxy gain going to code: G_code / (G_code + G_qa), G_t = mean training-proxy score
  of policy samples minus that of SFT samples on task t's prompts (0.5 = no preference for either task).
Outputs in DIR: am_vs_bt.md, am_vs_bt.png, am_vs_bt.json; lab/ (world, SFT), proxies/, runs/ for resuming.
"""

import argparse
import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from openrlhf_lsc.am_loss import AdvantageModelLoss, pairwise_metrics  # noqa: E402
from openrlhf_lsc.lab import models, ppo  # noqa: E402
from openrlhf_lsc.lab.config import PRESETS as LAB_PRESETS  # noqa: E402
from openrlhf_lsc.lab.evaluation import gold_scores  # noqa: E402
from openrlhf_lsc.lab.files import (  # noqa: E402
    pin_json, read_json, save_figure, save_model_dir, write_json, write_text,
)
from openrlhf_lsc.lab.world_setup import Lab  # noqa: E402

TASKS = {"code": ("code", "bike", "home", "money"), "qa": ("cooking", "garden", "travel", "health")}
TASK_OF = {topic: task for task, topics in TASKS.items() for topic in topics}
PROXIES = ("bt", "am")


@dataclasses.dataclass
class Config:
    """Sizes of one run (presets: `PRESETS`); the world and SFT policy come from the lab preset `lab`."""

    mode: str
    lab: str = "quick"
    seed: int = 0
    temperature: Dict[str, float] = dataclasses.field(default_factory=lambda: {"code": 0.05, "qa": 2.0})
    pairs_per_prompt: int = 8
    rm_epochs: int = 6
    am: Dict = dataclasses.field(default_factory=lambda: {"margin": 2.5, "task_std": 1.0})  # AdvantageModelLoss kwargs
    kl_grid: Sequence[float] = (0.01, 0.03, 0.1)  # KL coefficient in units of the proxy's std on SFT samples
    ppo_seeds: Sequence[int] = (0, 1)
    ppo: Dict = dataclasses.field(default_factory=lambda: {"steps": 100})  # PPOConfig overrides
    sft_pool: int = 16  # SFT samples per eval prompt (the win-rate reference)
    eval_samples: int = 8


PRESETS = {
    "default": Config(mode="default"),
    "smoke": Config(mode="smoke", lab="smoke", pairs_per_prompt=4, rm_epochs=1, kl_grid=(0.05,), ppo_seeds=(0,), sft_pool=4,
                    eval_samples=4, ppo={"steps": 3, "rollout_prompts": 16, "train_batch": 16}),
}


def win_rate_vs(policy_gold: np.ndarray, sft_gold: np.ndarray) -> np.ndarray:
    """Per prompt, P(policy sample beats SFT sample) + P(tie) / 2 over all pairs. `[P, n]`, `[P, m]` -> `[P]`."""
    a, b = policy_gold[:, :, None], sft_gold[:, None, :]
    return ((a > b) + 0.5 * (a == b)).mean((1, 2))


def build_proxies(out: str, cfg: Config, lab: Lab, sft) -> Dict:
    """Pairs labelled with per-task temperatures -> BT and AM proxies (proxies/), metrics and the SFT eval pool."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    prompts = [p for p in lab.train_prompts for _ in range(2 * cfg.pairs_per_prompt)]
    ids = models.encode_prompts([p.text for p in prompts])
    responses = models.sample_batched(sft, ids, gen)
    gold = torch.tensor(gold_scores("helpful", prompts, models.decode_responses(responses)))
    a, b = torch.arange(0, len(prompts), 2), torch.arange(1, len(prompts), 2)
    tasks = [TASK_OF[prompts[i].topic] for i in a.tolist()]
    temp = torch.tensor([cfg.temperature[t] for t in tasks])
    a_wins = models.bradley_terry_labels(gold[a], gold[b], temp, gen)
    chosen = torch.where(a_wins[:, None], responses[a], responses[b])
    rejected = torch.where(a_wins[:, None], responses[b], responses[a])
    n_tr, pid = int(0.9 * len(a)), ids[a]
    tr, ho = slice(0, n_tr), slice(n_tr, None)
    # SFT pool on the eval prompts: the win-rate reference and the proxies' per-task score scales.
    pool_prompts = [p for p in lab.eval_prompts for _ in range(cfg.sft_pool)]
    pool_ids = models.encode_prompts([p.text for p in pool_prompts])
    pool = models.sample_batched(sft, pool_ids, gen)
    gold_sft = gold_scores("helpful", pool_prompts, models.decode_responses(pool)).reshape(-1, cfg.sft_pool)
    setup = {"gold_sft": gold_sft.tolist(),
             "label_agreement_with_gold": {}, "proxies": {}}
    strict = gold[a] != gold[b]
    for t in TASKS:
        sel = torch.tensor([x == t for x in tasks]) & strict
        setup["label_agreement_with_gold"][t] = (a_wins == (gold[a] > gold[b]))[sel].float().mean().item()
    eval_task = [TASK_OF[p.topic] for p in lab.eval_prompts]
    for i, name in enumerate(PROXIES):
        rm = models.reward_model_from(sft, cfg.seed + 10)  # same initialisation for both proxies
        am = AdvantageModelLoss(**cfg.am).train()
        losses = models.train_reward_model(rm, pid[tr], chosen[tr], rejected[tr], epochs=cfg.rm_epochs, lr=1e-3, batch=64,
                                           seed=cfg.seed, desc=f"RM {name}",
                                           loss_fn=None if name == "bt" else lambda c, r, idx: am(c, r, [tasks[j] for j in idx]))
        c, r = models.score(rm, pid[ho], chosen[ho]), models.score(rm, pid[ho], rejected[ho])
        s = models.score_batched(rm, pool_ids, pool).numpy().reshape(-1, cfg.sft_pool)
        setup["proxies"][name] = {
            "epoch_losses": losses,
            "heldout_vs_labels": pairwise_metrics(c, r, tasks[n_tr:]),
            "sft_pool": s.tolist(),
            "sft_pool_per_task": {t: {"mean": float(s[[x == t for x in eval_task]].mean()),
                                      "std": float(s[[x == t for x in eval_task]].std())} for t in TASKS},
        }
        save_model_dir(os.path.join(out, "proxies", name), rm, lab.tokenizer)
    return setup


def run_one(out: str, cfg: Config, lab: Lab, sft, setup: Dict, proxy: str, c: float, seed: int) -> Dict:
    """PPO with one proxy at KL coefficient c (x the proxy's SFT-pool std); per-task evaluation; runs/<id>.json."""
    target = os.path.join(out, "runs", f"{proxy}-c{c:g}-s{seed}.json")
    if os.path.exists(target):
        return read_json(target)
    rm = models.load_rm(os.path.join(out, "proxies", proxy))
    sft_proxy = np.array(setup["proxies"][proxy]["sft_pool"])
    pcfg = ppo.PPOConfig(**{**cfg.ppo, "kl_coef": c * float(sft_proxy.std())})
    pipeline = ppo.RewardPipeline([rm], [proxy], [{}] * len(lab.train_prompts))
    train_ids = models.encode_prompts([p.text for p in lab.train_prompts])
    start = time.time()
    result = ppo.train(sft, train_ids, pipeline, pcfg, seed=1000 + seed, desc=f"PPO {proxy} c={c:g} s{seed}")
    # Evaluation on the eval prompts: gold and training-proxy scores, KL to SFT.
    gen = torch.Generator().manual_seed(2000 + seed)
    prompts = [p for p in lab.eval_prompts for _ in range(cfg.eval_samples)]
    ids = models.encode_prompts([p.text for p in prompts])
    responses = models.sample_batched(result.policy, ids, gen)
    with torch.no_grad():
        kl = ((models.response_logprobs(result.policy, ids, responses) - models.response_logprobs(sft, ids, responses))
              * models.action_mask(responses)).sum(1)
    gold = gold_scores("helpful", prompts, models.decode_responses(responses)).reshape(-1, cfg.eval_samples)
    proxy_scores = models.score_batched(rm, ids, responses).numpy().reshape(-1, cfg.eval_samples)
    win = win_rate_vs(gold, np.array(setup["gold_sft"]))
    eval_task = np.array([TASK_OF[p.topic] for p in lab.eval_prompts])
    per_task = {t: {"win_vs_sft": float(win[eval_task == t].mean()),
                    "gold_gain": float(gold[eval_task == t].mean() - np.array(setup["gold_sft"])[eval_task == t].mean()),
                    "proxy_gain": float(proxy_scores[eval_task == t].mean() - sft_proxy[eval_task == t].mean())}
                for t in TASKS}
    gains = [per_task[t]["proxy_gain"] for t in TASKS]
    record = {"proxy": proxy, "c": c, "seed": seed, "ppo": dataclasses.asdict(pcfg), "history": result.history,
              "kl": kl.mean().item(), "win_vs_sft": float(win.mean()), "per_task": per_task,
              "drift_code_share": gains[0] / sum(gains) if sum(gains) > 0 else None,  # undefined without a gain
              "seconds": time.time() - start}
    write_json(target, record)
    return record


def plot(out: str, setup: Dict, runs: List[Dict]) -> str:
    """Per-task SFT score distributions of each proxy, and per-task gold win rate vs KL."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    eval_task = np.array(setup["eval_task"])
    for ax, name in zip(axes[:2], PROXIES):
        s = np.array(setup["proxies"][name]["sft_pool"])
        for t in TASKS:
            ax.hist(s[eval_task == t].ravel(), bins=30, alpha=0.55, density=True, label=t)
        ax.set(title=f"{name.upper()} proxy scores of SFT samples, per task", xlabel="proxy score")
        ax.legend()
    ax = axes[2]
    for proxy, marker in zip(PROXIES, ("x", "o")):  # one point per run (KL coefficient x seed)
        for t, color in zip(TASKS, ("C0", "C1")):
            pts = [(r["kl"], r["per_task"][t]["win_vs_sft"]) for r in runs if r["proxy"] == proxy]
            ax.plot(*zip(*pts), ls="none", marker=marker, ms=8, color=color, label=f"{proxy.upper()} / {t}")
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set(title="PPO: per-task gold win rate vs SFT", xlabel="KL(policy || SFT)", ylabel="win rate")
    ax.legend()
    return save_figure(fig, os.path.join(out, "am_vs_bt.png"))


def summarise(runs: List[Dict], setup: Dict) -> List[Dict]:
    """Mean over seeds per (proxy, c); drift also with each task's gain in units of its SFT proxy-score std."""
    rows = []
    for proxy in PROXIES:
        for c in sorted({r["c"] for r in runs}):
            rs = [r for r in runs if r["proxy"] == proxy and r["c"] == c]
            m = lambda f: float(np.mean([f(r) for r in rs]))  # noqa: E731
            shares = [r["drift_code_share"] for r in rs if r["drift_code_share"] is not None]
            sd = setup["proxies"][proxy]["sft_pool_per_task"]
            z = [[r["per_task"][t]["proxy_gain"] / sd[t]["std"] for t in TASKS] for r in rs]
            z_shares = [a / (a + b) for a, b in z if a + b > 0]
            rows.append({"proxy": proxy, "c": c, "seeds": len(rs), "kl": m(lambda r: r["kl"]),
                         "win_code": m(lambda r: r["per_task"]["code"]["win_vs_sft"]),
                         "win_qa": m(lambda r: r["per_task"]["qa"]["win_vs_sft"]),
                         "proxy_gain_code": m(lambda r: r["per_task"]["code"]["proxy_gain"]),
                         "proxy_gain_qa": m(lambda r: r["per_task"]["qa"]["proxy_gain"]),
                         "drift_code_share": float(np.mean(shares)) if shares else None,
                         "drift_code_share_std_units": float(np.mean(z_shares)) if z_shares else None})
    return rows


def report(cfg: Config, setup: Dict, rows: List[Dict], fig: str, seconds: float) -> str:
    lines = [f"# PPO with a Bradley-Terry RM vs an Advantage Model, two tasks ({cfg.mode} mode)", "",
             f"This invocation took {seconds / 60:.1f} min (finished stages and runs are reused from disk).", "",
             f"Label temperature per task: {cfg.temperature} (label agreement with the gold order: "
             + ", ".join(f"{t} {v:.2f}" for t, v in setup["label_agreement_with_gold"].items()) + ").", "",
             "## Proxies (held-out pairs, vs their labels; per-task score mean/std on SFT samples of eval prompts)", "",
             "| proxy | accuracy | ECE | code mean | code std | qa mean | qa std |", "|---|---|---|---|---|---|---|"]
    for name in PROXIES:
        p = setup["proxies"][name]
        st = p["sft_pool_per_task"]
        lines.append(f"| {name.upper()} | {p['heldout_vs_labels']['accuracy']:.3f} | {p['heldout_vs_labels']['ece']:.3f} | "
                     f"{st['code']['mean']:.2f} | {st['code']['std']:.2f} | {st['qa']['mean']:.2f} | {st['qa']['std']:.2f} |")
    lines += ["", "## PPO (means over seeds)", "",
              "Win = P(gold of a policy sample > gold of an SFT sample of the same eval prompt) + ties/2. "
              "Drift = G_code / (G_code + G_qa), G_t = mean training-proxy score of policy minus SFT samples on task t "
              "(0.5: the proxy gain is split evenly; blank when the total gain is not positive); "
              "drift (std units): the same with G_t divided by the std of the proxy's scores of SFT samples on task t.", "",
              "| proxy | c | seeds | KL | win code | win qa | proxy gain code | proxy gain qa | drift (code share) | "
              "drift (std units) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        drift = ["" if r[k] is None else f"{r[k]:.2f}" for k in ("drift_code_share", "drift_code_share_std_units")]
        lines.append(f"| {r['proxy'].upper()} | {r['c']:g} | {r['seeds']} | {r['kl']:.3f} | {r['win_code']:.3f} | "
                     f"{r['win_qa']:.3f} | {r['proxy_gain_code']:.3f} | {r['proxy_gain_qa']:.3f} | " + " | ".join(drift) + " |")
    lines += ["", f"![per-task proxy scores and win rates]({fig})", "", "## Conclusions (computed from the tables above)", ""]
    for name in PROXIES:
        st = setup["proxies"][name]["sft_pool_per_task"]
        rs = [r for r in rows if r["proxy"] == name]
        gap = np.mean([r["win_code"] - r["win_qa"] for r in rs])
        shares = [r["drift_code_share"] for r in rs if r["drift_code_share"] is not None]
        lines.append(f"- {name.upper()}: score std code/qa = {st['code']['std'] / st['qa']['std']:.2f}, mean code - qa = "
                     f"{st['code']['mean'] - st['qa']['mean']:+.2f}; over the KL grid, win code - win qa = {gap:+.3f} on average"
                     + (f", code share of the proxy gain {np.mean(shares):.2f}." if shares else "."))
    lines += ["- Caveats: runs differ in the KL they reach (compare rows at similar KL, not at equal c); "
              f"{len(cfg.ppo_seeds)} PPO seed(s) per point; one world/proxy seed; the proxies differ in held-out accuracy "
              "as well as in scale, so per-task win rates mix both effects.", ""]
    return "\n".join(lines)


def run(out: str, cfg: Config) -> Dict:
    """Run (or resume) the experiment in `out`; write am_vs_bt.{md,png,json}; return the results."""
    torch.set_num_threads(1)
    start = time.time()
    cfg_json = pin_json(os.path.join(out, "config.json"), dataclasses.asdict(cfg), "am_vs_bt run")
    lab = Lab(os.path.join(out, "lab"), dataclasses.replace(LAB_PRESETS[cfg.lab], seeds=(cfg.seed,)))
    if not os.path.exists(lab.path("models", "sft")):
        lab.build_sft()
    sft = lab.load_sft()
    setup_path = os.path.join(out, "proxies", "setup.json")
    if not os.path.exists(setup_path):
        setup = build_proxies(out, cfg, lab, sft)
        setup["eval_task"] = [TASK_OF[p.topic] for p in lab.eval_prompts]
        write_json(setup_path, setup)
    setup = read_json(setup_path)
    grid = [(p, c, s) for p in PROXIES for c in cfg.kl_grid for s in cfg.ppo_seeds]
    runs = [run_one(out, cfg, lab, sft, setup, *g) for g in tqdm(grid, desc="PPO runs")]
    rows = summarise(runs, setup)
    fig = plot(out, setup, runs)
    seconds = time.time() - start
    text = report(cfg, setup, rows, fig, seconds)
    write_text(os.path.join(out, "am_vs_bt.md"), text)
    results = {"config": cfg_json, "rows": rows, "runs": runs, "figures": [fig], "wall_seconds_this_invocation": seconds,
               "proxies": {n: {k: v for k, v in p.items() if k != "sft_pool"} for n, p in setup["proxies"].items()},
               "label_agreement_with_gold": setup["label_agreement_with_gold"]}
    write_json(os.path.join(out, "am_vs_bt.json"), results)
    print("\n" + text)
    return results


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.lab.am_vs_bt", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI (under 90 s)")
    p.add_argument("--seed", type=int, default=0, help="world/SFT/proxy seed")
    args = p.parse_args(argv)
    try:
        run(args.out, dataclasses.replace(PRESETS["smoke" if args.smoke else "default"], seed=args.seed))
    except ValueError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
