"""Forgetting with and without Selective Rehearsal (Peng et al. 2023) in the CPU lab.

`python -m openrlhf_lsc.lab.forgetting --out DIR [--smoke]` builds the lab's SFT policy and proxy reward
models (the lab's own stages, in `DIR/lab`), then runs PPO on gold-free proxy helpfulness in arms:
- `stock`: all training prompts, no rehearsal;
- `select`: prompt selection alone (`openrlhf_lsc.rehearsal.select`: per k-means cluster of bag-of-words
  prompt features, the prompts whose expert answer the proxy already scores low);
- `rehearse g=<gamma>`: selection plus gamma * NLL of the rehearsal set D_R (per cluster the top-k expert
  pairs) added to the PPO actor loss in the same backward.
Over training it tracks gold helpfulness/harmlessness of samples on a fixed subset of training prompts and
the NLL of a held-out expert set: fresh demonstrations (`world.demonstrate`, a seed the SFT data did not use)
on the lab's eval prompts, which neither SFT nor PPO trains on.

Rehearsal uses `ppo.train`'s `extra_loss` hook (gamma * NLL(D_R) added to every actor loss, same backward);
metrics are recorded by its `on_step` hook before each rollout.
"""

import argparse
import dataclasses
import os
import random
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from openrlhf_lsc.lab import models, ppo, world
from openrlhf_lsc.lab.config import PRESETS
from openrlhf_lsc.lab.evaluation import gold_scores
from openrlhf_lsc.lab.files import pin_json, read_json, save_figure, write_json, write_text
from openrlhf_lsc.lab.world_setup import Lab
from openrlhf_lsc.rehearsal import cluster_prompts, select, token_nll

METRICS = ("gold_helpful", "gold_harmless", "proxy_helpful", "heldout_nll")
MODES = {
    # lab preset, PPO overrides, gammas, seeds, clusters, rehearsal k, tracking cadence, tracked prompts x samples
    "default": dict(lab="quick", ppo={"steps": 60}, gammas=(0.01, 0.1, 1.0), seeds=(0, 1, 2), n_clusters=8, rehearsal_k=4,
                    ppo_fraction=0.5, track_every=6, track_prompts=96, track_samples=2),
    "smoke": dict(lab="smoke", ppo={"steps": 3, "rollout_prompts": 8, "train_batch": 8}, gammas=(0.0, 1.0),
                  seeds=(0, 1), n_clusters=4, rehearsal_k=2, ppo_fraction=0.5, track_every=1, track_prompts=16,
                  track_samples=1),
}


def loss_mask(prompt_ids: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """`token_nll`'s mask for prompt+response sequences: column t scores token t+1, so the response tokens."""
    mask = torch.zeros(len(responses), prompt_ids.shape[1] + responses.shape[1])
    mask[:, prompt_ids.shape[1] - 1 : -1] = models.action_mask(responses)
    return mask


def expert_nll(policy, prompt_ids: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of expert responses under `policy` (`rehearsal.token_nll`, with grad if enabled)."""
    seq = torch.cat([prompt_ids, responses], 1)
    return token_nll(policy(seq).logits, seq, loss_mask(prompt_ids, responses))


def bag_of_words(prompts: List[world.Prompt]) -> np.ndarray:
    """One-hot features of each prompt's words (verb, noun, modifier): the offline stand-in for a sentence encoder."""
    ids = models.encode_prompts([p.text for p in prompts])
    x = np.zeros((len(prompts), len(world.vocabulary())))
    np.put_along_axis(x, ids.numpy(), 1.0, axis=1)
    return x


class _Tracker:
    """`on_step` hook of `ppo.train`: records the probe's metrics every `every` steps."""

    def __init__(self, probe, every: int):
        self.probe, self.every, self.curve = probe, every, []

    def __call__(self, step: int, policy) -> None:
        if step % self.every == 0:
            self.curve.append({"step": step, **self.probe(policy)})


def run(out: str, mode: str = "default") -> Dict:
    """Run (or resume) the experiment in `out`; write forgetting.json/.md/.png. Returns the results."""
    torch.set_num_threads(1)
    start, m = time.time(), MODES[mode]
    cfg = dataclasses.replace(PRESETS[m["lab"]], workers=1)
    config = {"mode": mode, **m, "lab_config": dataclasses.asdict(cfg)}
    pin_json(os.path.join(out, "config.json"), config, "forgetting run")

    lab = Lab(os.path.join(out, "lab"), cfg)
    lab.setup(progress=False, last="reward_models")  # SFT and reward models only
    sft, rm = lab.load_sft(), lab.load_rms()["helpful"]

    # Expert answers (fresh draws from the lab's demonstrator): one per training prompt, for selection and
    # D_R; two per eval prompt, the held-out set.
    rng = random.Random(lab.seed + 77)
    train, held = lab.train_prompts, [p for p in lab.eval_prompts for _ in range(2)]
    train_ids, held_ids = (models.encode_prompts([p.text for p in ps]) for ps in (train, held))
    train_demo = models.encode_responses([world.demonstrate(p, rng) for p in train])
    held_demo = models.encode_responses([world.demonstrate(p, rng) for p in held])
    expert_score = models.score(rm, train_ids, train_demo).numpy()
    clusters = cluster_prompts(bag_of_words(train), m["n_clusters"], seed=lab.seed)
    sel = select(expert_score, clusters, m["rehearsal_k"], ppo_fraction=m["ppo_fraction"])
    d_r = (train_ids[sel.rehearsal], train_demo[sel.rehearsal])

    probe_prompts = train[: m["track_prompts"]]
    probe_list = [p for p in probe_prompts for _ in range(m["track_samples"])]
    probe_ids = models.encode_prompts([p.text for p in probe_list])

    @torch.no_grad()
    def probe(policy) -> Dict[str, float]:
        responses = models.sample(policy, probe_ids, torch.Generator().manual_seed(4242))
        words = models.decode_responses(responses)
        return {"gold_helpful": float(gold_scores("helpful", probe_list, words).mean()),
                "gold_harmless": float(gold_scores("harmless", probe_list, words).mean()),
                "proxy_helpful": float(models.score(rm, probe_ids, responses).mean()),
                "heldout_nll": float(expert_nll(policy.eval(), held_ids, held_demo)),
                "rehearsal_nll": float(expert_nll(policy, *d_r))}

    arms = [("stock", None, 0.0), ("select", sel.ppo, 0.0)] + [(f"rehearse g={g:g}", sel.ppo, g) for g in m["gammas"]]
    pcfg = ppo.PPOConfig(**m["ppo"])
    pipeline = ppo.RewardPipeline([rm], ["helpful"], [{}] * len(train), "raw")
    records = []
    for (name, rows, gamma), seed in tqdm([(a, s) for a in arms for s in m["seeds"]], desc="forgetting arms"):
        path = os.path.join(out, "runs", f"{name.replace(' ', '_').replace('=', '')}-s{seed}.json")
        if not os.path.exists(path):
            tracker = _Tracker(probe, m["track_every"])
            ids = train_ids if rows is None else train_ids[rows]
            t0 = time.time()
            rehearse = None
            if name.startswith("rehearse"):
                rehearse = lambda policy, g=gamma: g * expert_nll(policy, *d_r)  # noqa: E731
            result = ppo.train(sft, ids, pipeline, pcfg, seed=1000 + seed, desc=name, extra_loss=rehearse,
                               on_step=tracker)
            tracker.curve.append({"step": pcfg.steps, **probe(result.policy)})
            write_json(path, {"arm": name, "gamma": gamma, "seed": seed, "n_prompts": len(ids), "curve": tracker.curve,
                              "history": result.history, "seconds": time.time() - t0})
        records.append(read_json(path))

    results = {"config": config, "ppo": dataclasses.asdict(pcfg), "n_train_prompts": len(train),
               "n_ppo_prompts": len(sel.ppo), "n_rehearsal": len(sel.rehearsal), "n_heldout": len(held), "clusters": sel.clusters,
               "expert_score": {"ppo_mean": float(expert_score[sel.ppo].mean()),
                                "rehearsal_mean": float(expert_score[sel.rehearsal].mean())},
               "runs": records, "table": table(records), "wall_seconds": time.time() - start}
    write_report(out, results)
    write_json(os.path.join(out, "forgetting.json"), results)
    return results


def table(records: List[Dict]) -> List[Dict]:
    """Per arm: start and end (mean and std over seeds) of each tracked metric, and the end minus stock's end
    paired by seed (mean and standard error)."""
    def end(rs: List[Dict], key: str) -> np.ndarray:
        return np.array([r["curve"][-1][key] for r in sorted(rs, key=lambda r: r["seed"])])

    stock = [r for r in records if r["arm"] == "stock"]
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in records):
        rs = [r for r in records if r["arm"] == arm]
        row = {"arm": arm, "n_prompts": rs[0]["n_prompts"], "seeds": len(rs)}
        for key in METRICS:
            row[f"{key}_start"] = float(np.mean([r["curve"][0][key] for r in rs]))
            row[f"{key}_end"], row[f"{key}_end_std"] = float(end(rs, key).mean()), float(end(rs, key).std())
            diff = end(rs, key) - end(stock, key)
            row[f"{key}_vs_stock"] = float(diff.mean())
            row[f"{key}_vs_stock_sem"] = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        row["kl_end"] = float(np.mean([r["history"][-1]["kl"] for r in rs]))
        rows.append(row)
    return rows


def conclusions(rows: List[Dict]) -> List[str]:
    """One line per arm: its end values against stock's, flagged beyond / within 2 standard errors."""
    names = {"heldout_nll": "held-out expert NLL", "gold_helpful": "gold helpfulness", "gold_harmless": "gold harmlessness"}
    out = []
    for r in rows[1:]:
        parts = []
        for key, name in names.items():
            d, se = r[f"{key}_vs_stock"], r[f"{key}_vs_stock_sem"]
            verdict = "beyond 2 s.e." if abs(d) > 2 * se else "within seed noise"
            parts.append(f"{name} {d:+.3f} ({verdict})")
        out.append(f"- {r['arm']} vs stock at the last step: " + ", ".join(parts) + ".")
    return out


def write_report(out: str, results: Dict) -> None:
    """forgetting.png (curves per arm) and forgetting.md (table), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = METRICS
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for arm in dict.fromkeys(r["arm"] for r in results["runs"]):
            rs = [r for r in results["runs"] if r["arm"] == arm]
            steps = [c["step"] for c in rs[0]["curve"]]
            ax.plot(steps, np.mean([[c[key] for c in r["curve"]] for r in rs], 0), marker=".", label=arm)
        ax.set_xlabel("PPO step")
        ax.set_title(key.replace("_", " ") + (" (held-out expert set)" if key == "heldout_nll" else " (train prompts)"),
                     fontsize=9)
    axes[0].legend(fontsize=8)
    save_figure(fig, os.path.join(out, "forgetting.png"))

    head = "| arm | PPO prompts | gold helpful | gold harmless | proxy helpful | held-out expert NLL | rollout KL |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in results["table"]:
        cells = [f"{r[k + '_start']:.2f} -> {r[k + '_end']:.2f} ± {r[k + '_end_std']:.2f}" for k in METRICS]
        lines.append(f"| {r['arm']} | {r['n_prompts']} | " + " | ".join(cells) + f" | {r['kl_end']:.2f} |")
    lines += ["", "End value minus stock's, paired by seed (mean ± standard error; bold when |mean| > 2 s.e.):", "",
              "| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for r in results["table"][1:]:
        cells = []
        for k in METRICS:
            d, se = r[f"{k}_vs_stock"], r[f"{k}_vs_stock_sem"]
            cell = f"{d:+.3f} ± {se:.3f}"
            cells.append(f"**{cell}**" if abs(d) > 2 * se else cell)
        lines.append(f"| {r['arm']} | " + " | ".join(cells) + " |")
    c = results["config"]
    text = "\n".join([
        "# Forgetting with and without Selective Rehearsal (CPU lab)", "",
        f"Mode `{c['mode']}`, PPO on proxy helpfulness (raw reward, kl_coef {results['ppo']['kl_coef']:g}, "
        f"{results['ppo']['steps']} steps),"
        f" seeds {list(c['seeds'])}, {results['n_train_prompts']} training prompts; selection: {c['n_clusters']} k-means "
        f"clusters of bag-of-words prompt features, PPO gets the lower {c['ppo_fraction']:g} of each cluster by proxy score "
        f"of an expert answer ({results['n_ppo_prompts']} prompts, mean expert score "
        f"{results['expert_score']['ppo_mean']:.3f}), D_R = top {c['rehearsal_k']} per cluster ({results['n_rehearsal']} "
        f"pairs, mean {results['expert_score']['rehearsal_mean']:.3f}). Held-out expert set: {results['n_heldout']} fresh "
        "demonstrations on the eval prompts (no SFT or PPO prompt). Gold metrics on the first "
        f"{c['track_prompts']} training prompts x {c['track_samples']} samples (fixed sampling seed); start -> end "
        "(end: mean ± std over seeds).", "",
        *lines, "", "![curves](forgetting.png)", "", "## Conclusions (generated from the numbers above)", "",
        *conclusions(results["table"]), "",
        "Caveats: one synthetic world and its proxy helpfulness RM; the selected arms train on half the prompts, so "
        "their rollout KL is measured on other prompts than stock's; gold is measured on the first training prompts "
        "(some of them not in the selected arms' PPO set); the held-out expert set comes from the lab's demonstrator, "
        "the SFT policy's own teacher, so its NLL measures drift away from the SFT distribution.", "",
        f"Wall time {results['wall_seconds'] / 60:.1f} min (this invocation).", "",
    ])
    write_text(os.path.join(out, "forgetting.md"), text)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.lab.forgetting", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI (under 90 s)")
    args = p.parse_args(argv)
    try:
        results = run(args.out, "smoke" if args.smoke else "default")
    except ValueError as e:
        sys.exit(f"error: {e}")
    with open(os.path.join(args.out, "forgetting.md")) as f:
        print(f.read())
    print(f"finished in {results['wall_seconds'] / 60:.1f} min: {args.out}/forgetting.md")


if __name__ == "__main__":
    main()
