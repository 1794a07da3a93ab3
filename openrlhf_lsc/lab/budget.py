"""The practitioner's protocol (`python -m openrlhf_lsc.lab --protocol budget`): one fixed KL coefficient, a step
budget, the last checkpoint (issue 23; PAR's protocol, Fu et al. 2025).

Every method trains from the same SFT policy with the same absolute KL coefficient beta (no KL controller) for the
same number of steps, on each beta of a grid that spans "stops before raw PPO's gold peak" to "far past it", and is
evaluated every `eval_every` steps on the test prompts. Methods: on the helpfulness proxy raw / lsc / sigmoid / par,
the bounded ones also with `--lsc.scale match` (the utility rescaled to raw's spread on the run's first batch); on
helpfulness and harmlessness the untuned weighted sum (w = 0.5), AND-LSC with SFT-median references and GDPO.

The analysis (`analyse`) resamples worlds, then PPO seeds and test prompts (`stats.resample_means`, paired across
methods, betas and checkpoints) and reads from each resample: (a) the last checkpoint's gold win per beta; (b) its
regret against the oracle, the best beta and checkpoint of any method; (c) the width, in decades of beta, of the
range whose last checkpoint is within `near` of the oracle (linear in log beta between grid points); (d) the average
win over checkpoints (PAR's metric); (e) the win of the checkpoint where the monitor's stop rule would have stopped
the run (the last one if it never fired). A verdict per claim (`CLAIMS`) from the intervals (`stats.verdict`,
`stats.combine`).

Layout: the lab's (`out/world<seed>/runs/<id>.json`, one file per run), `out/results.json` and `out/report.md`.
"""

import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from openrlhf_lsc.lab import ppo, stats
from openrlhf_lsc.lab.analysis import timing
from openrlhf_lsc.lab.config import MONITOR_NOISE, PRESETS, PROPERTIES, LabConfig, pin_config
from openrlhf_lsc.lab.evaluation import evaluate, sft_point
from openrlhf_lsc.lab.files import write_json, write_text
from openrlhf_lsc.lab.run_specs import and_set, make_run, single_method
from openrlhf_lsc.lab.runner import begin_run, lab_prompt_ids, monitored, reward_pipeline, run_all, run_path, setup_all
from openrlhf_lsc.lab.world_setup import load_world
from openrlhf_lsc.rewards import PAR_M

SINGLE = ("raw", "lsc", "sigmoid", "par", "lsc+match", "sigmoid+match", "par+match")
PAIR = ("weighted w=0.5", "lsc AND q=(0.5,0.5)", "gdpo")
METRIC = {"single": "win_helpful", "pair": "win_both"}


@dataclass
class BudgetConfig(LabConfig):
    """The lab's world sizes and seeds (`LabConfig`) plus the budget protocol's grid, budget and evaluation."""

    betas: Tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # absolute KL coefficients, increasing
    eval_every: int = 15  # steps between checkpoints (the last step is always one)
    eval_prompts: Optional[int] = None  # evaluate on the first N test prompts (None: all)
    par_m: int = PAR_M  # PAR's M SFT scores per prompt (recorded by the world setup's estimator)
    single: Tuple[str, ...] = SINGLE
    pair: Tuple[str, ...] = PAIR
    near: float = 0.03  # (c): a beta is good when its last checkpoint is within this of the oracle

    def __post_init__(self):
        betas = list(self.betas)
        if len(betas) < 2 or any(not b > 0 for b in betas) or betas != sorted(set(betas)):
            raise ValueError(f"budget betas must be >= 2 positive, increasing KL coefficients, got {self.betas}")
        if not 0 < self.eval_every <= self.ppo["steps"]:
            raise ValueError(f"eval_every must be in [1, steps = {self.ppo['steps']}], got {self.eval_every}")
        unknown = [m for m in self.single if m not in SINGLE] + [m for m in self.pair if m not in PAIR]
        if unknown:
            raise ValueError(f"unknown budget methods {unknown}: expected some of {SINGLE + PAIR}")
        if any(m.startswith("par") for m in self.single) and not 1 <= self.par_m <= self.ref_k:
            raise ValueError(f"par_m ({self.par_m}) must be in [1, ref_k = {self.ref_k}]: the world setup records PAR's "
                             "scores among its ref_k SFT samples per prompt")


_SMOKE = {k: v for k, v in asdict(PRESETS["smoke"]).items() if k != "mode"}
BUDGET_PRESETS = {
    # 5 worlds x 3 PPO seeds x 10 methods x 6 betas = 900 runs of 120 steps (about 15 s of CPU each). Raw PPO at
    # beta 0.003 peaked within 15 steps and had collapsed by step 45 in exploratory runs; at 0.3 it still rose at 120.
    "full": BudgetConfig(mode="budget", seeds=(0, 1, 2, 3, 4), ppo_seeds=(0, 1, 2), eval_samples=4,
                         ppo={"steps": 120, "rollout_prompts": 8, "n_samples_per_prompt": 4, "train_batch": 32}),
    "quick": BudgetConfig(mode="budget-quick", seeds=(0,), ppo_seeds=(0,), eval_samples=4, betas=(0.003, 0.03, 0.3),
                          single=("raw", "lsc", "lsc+match"), pair=("weighted w=0.5", "lsc AND q=(0.5,0.5)"),
                          ppo={"steps": 120, "rollout_prompts": 8, "n_samples_per_prompt": 4, "train_batch": 32}),
    "smoke": BudgetConfig(**{**_SMOKE, "mode": "budget-smoke", "betas": (0.01, 0.1), "eval_every": 3, "par_m": 4,
                             "ppo": {"steps": 6, "rollout_prompts": 4, "n_samples_per_prompt": 2, "train_batch": 8,
                                     "actor_lr": 5e-3}}),
}


def checkpoints(cfg: BudgetConfig) -> List[int]:
    """The steps at which every run is evaluated."""
    steps = cfg.ppo["steps"]
    return sorted(set(range(cfg.eval_every, steps + 1, cfg.eval_every)) | {steps})


def method_spec(method: str) -> Dict:
    """A budget method's reward: transform, aggregate, weights, reference label set, scale."""
    if method in SINGLE:
        name, _, scale = method.partition("+")
        transform, label_set = single_method(name)
        return dict(properties=["helpful"], transform=transform, aggregate="and", weights=None,
                    label_set="par" if transform == "par" else label_set, scale=scale or None)
    if method.startswith("weighted"):
        w = float(method.split("=")[1])
        return dict(properties=list(PROPERTIES), transform="raw", aggregate="weighted", weights=[w, round(1 - w, 6)],
                    label_set=None, scale=None)
    if method.startswith("lsc AND"):
        return dict(properties=list(PROPERTIES), transform="lsc", aggregate="and", weights=None,
                    label_set=and_set(0.5, 0.5), scale=None)
    return dict(properties=list(PROPERTIES), transform="raw", aggregate="gdpo", weights=None, label_set=None, scale=None)


def budget_runs(cfg: BudgetConfig) -> List[Dict]:
    """Every run of the protocol, world by world (a worker keeps one world's models loaded)."""
    out = []
    for s in cfg.seeds:
        for experiment, methods in (("single", cfg.single), ("pair", cfg.pair)):
            for m in methods:
                spec = method_spec(m)
                for beta in cfg.betas:
                    for seed in cfg.ppo_seeds:
                        run = make_run(s, "budget", spec["properties"], m, spec["transform"], spec["aggregate"],
                                       spec["weights"], spec["label_set"], "test", seed)
                        run.update(experiment=experiment, scale=spec["scale"], beta=beta,
                                   id=run["id"].replace("-test-", f"-b{beta:g}-").replace("+", "_"))
                        out.append(run)
    return out


def run_budget_one(out: str, cfg: BudgetConfig, run: Dict, progress: bool = True) -> str:
    """Train one run at its fixed beta for the step budget, evaluating every `eval_every` steps; write its JSON."""
    target = begin_run(out, run, progress)
    if os.path.exists(target):
        return target
    lab, sft, rms, refs, pools, thr = load_world(out, cfg, run["world"])
    pipeline = reward_pipeline(run, rms, refs, cfg.par_m)
    pcfg = ppo.PPOConfig(**{**cfg.ppo, "kl_coef": run["beta"]})
    prompts, rows = eval_split(lab, cfg)
    thr_split = {k: v[rows] for k, v in thr.items()}
    history, evals = [], []
    start, cpu = time.time(), time.process_time()
    monitor, on_rollout, gold_sd = monitored(run, lab, pools)
    steps = set(checkpoints(cfg))

    def on_rollout_logged(step, index, responses, rewards) -> Dict[str, float]:
        return {**on_rollout(step, index, responses, rewards), **{f"lsc/{k}": v for k, v in pipeline.spread.items()}}

    def record(step: int, policy) -> None:
        ev = evaluate(policy, sft, rms, prompts, cfg.eval_samples, thr_split, seed=2000 + run["seed"])
        evals.append({"step": step, **ev})

    def on_step(step: int, policy) -> None:
        if step in steps:
            record(step, policy)

    result = ppo.train(sft, lab_prompt_ids(lab), pipeline, pcfg, seed=1000 + run["seed"], desc=run["id"],
                       progress=progress, on_step=on_step, history=history, on_rollout=on_rollout_logged)
    record(pcfg.steps, result.policy)
    write_json(target, {"run": run, "ppo": asdict(pcfg), "history": history, "checkpoints": evals,
                        "monitor": {**monitor.summary(), "noise_sd": MONITOR_NOISE, "gold_sft_sd": gold_sd},
                        "seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu})
    return target


def eval_split(lab, cfg: BudgetConfig):
    """The evaluation prompts (the first `eval_prompts` test prompts) and their rows among the eval prompts."""
    prompts, rows = lab.split("test")
    n = len(prompts) if cfg.eval_prompts is None else min(cfg.eval_prompts, len(prompts))
    return prompts[:n], slice(rows.start, rows.start + n)


# ---------------------------------------------------------------- statistics


def range_width(x: Sequence[float], y: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """Length of the part of [x_0, x_-1] where y, linear between the points, is at least `threshold`.

    Args:
        x: `[B]` increasing positions (log10 of the KL coefficients: the length is then in decades).
        y: `[..., B]` values at the points (the last checkpoint's win at each coefficient).
        threshold: `[...]` (or a scalar) level per curve (the oracle minus `near`).

    Returns:
        `[...]` lengths, in x's units.

    Example:
        >>> float(range_width([0.0, 1.0, 2.0], np.array([0.0, 1.0, 0.0]), 0.5))  # from 0.5 to 1.5
        1.0
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    t = np.asarray(threshold, dtype=float)[..., None]
    a, b, dx = y[..., :-1] - t, y[..., 1:] - t, np.diff(x)  # segment ends, relative to the threshold
    # The fraction of each segment above the threshold: all, none, or up to / from the crossing.
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.where(a >= 0, a / (a - b), b / (b - a))
    frac = np.where((a >= 0) & (b >= 0), 1.0, np.where((a < 0) & (b < 0), 0.0, cross))
    return (frac * dx).sum(-1)


def statistics(curves: np.ndarray, stop: np.ndarray, betas: Sequence[float], near: float,
               oracle: Optional[Tuple[int, int, int]] = None) -> Dict[str, np.ndarray]:
    """The protocol's statistics from pooled mean wins, for `n` resamples (or the observed data, n = 1).

    Args:
        curves: `[n, M, B, C]` win of each method at each beta and checkpoint.
        stop: `[n, M, B]` win at the checkpoint where the monitor would have stopped.
        betas: the B KL coefficients.
        near: a beta is good when its last checkpoint is within `near` of the oracle.
        oracle: the (method, beta, checkpoint) cell that is the oracle; None: the best cell of each of the n. The
            analysis picks the cell on the observed data and reads that cell in every resample: a maximum taken
            again in each resample is biased upwards, and its percentile interval misses the observed value.

    Returns:
        `last` `[n, M, B]` (a), `oracle` `[n]`, `regret` `[n, M, B]` (b), `width` `[n, M]` in decades (c),
        `average` `[n, M, B]` over checkpoints (d), `stop` (e).

    Example:
        >>> st = statistics(np.array([[[[0.2, 0.5], [0.6, 0.4]]]]), np.zeros((1, 1, 2)), [0.01, 0.1], near=0.15)
        >>> st["oracle"].tolist(), st["regret"].round(2).tolist(), st["width"].round(2).tolist()
        ([0.6], [[[0.1, 0.2]]], [[0.5]])
    """
    last = curves[..., -1]
    best = curves.reshape(len(curves), -1).max(1) if oracle is None else curves[(slice(None), *oracle)]
    return {"last": last, "oracle": best, "regret": best[:, None, None] - last,
            "width": range_width(np.log10(betas), last, (best - near)[:, None]),
            "average": curves.mean(-1), "stop": stop}


CLAIMS = {
    "B1": "bounded shaping keeps more gold at a fixed budget: the last checkpoint of lsc / sigmoid / par >= raw's at "
          "every beta",
    "B2": "bounded shaping widens the range of good coefficients: width (c) of lsc / sigmoid / par >= raw's",
    "B3": "at matched scale the bounded transforms still protect a run whose beta is too small (else they are a beta "
          "rescale): lsc / sigmoid / par with --lsc.scale match >= raw at every beta that is too small for raw (below "
          "raw's best, and raw's regret interval there wholly above the tolerance of (c))",
    "B4": "untuned AND >= untuned weighted (w = 0.5) at every beta",
    "B5": "AND >= GDPO at every beta",
}


def wins_per_world(out: str, cfg: BudgetConfig, records: Dict, experiment: str) -> Dict[int, np.ndarray]:
    """Per world `[S, P, M, B, C + 1]`: the experiment's win per eval prompt at every checkpoint, then at the
    checkpoint where the monitor would have stopped (the last one at or before the step it fired; the SFT policy if
    it fired before the first)."""
    metric, steps = METRIC[experiment], checkpoints(cfg)
    methods = cfg.single if experiment == "single" else cfg.pair
    by_key = {(r["run"]["world"], r["run"]["method"], r["run"]["beta"], r["run"]["seed"]): r for r in records.values()}
    out_ = {}
    for s in cfg.seeds:
        lab, *_, pools, thr = load_world(out, cfg, s)
        sft = sft_point(pools, thr)[metric][eval_split(lab, cfg)[1]]
        x = np.empty((len(cfg.ppo_seeds), len(sft), len(methods), len(cfg.betas), len(steps) + 1))
        for i, seed in enumerate(cfg.ppo_seeds):
            for j, m in enumerate(methods):
                for k, beta in enumerate(cfg.betas):
                    rec = by_key[(s, m, beta, seed)]
                    if [c["step"] for c in rec["checkpoints"]] != steps:
                        raise ValueError(f"{run_path(out, rec['run'])} has checkpoints at steps "
                                         f"{[c['step'] for c in rec['checkpoints']]}, the configuration {steps}")
                    wins = np.array([c["per_prompt"][metric] for c in rec["checkpoints"]])  # [C, P]
                    fired = rec["monitor"]["fired_step"]
                    kept = [c for c, st in enumerate(steps) if fired is None or st <= fired]
                    x[i, :, j, k] = np.concatenate([wins, (wins[kept[-1]] if kept else sft)[None]]).T
        out_[s] = x
    return out_


def _interval(samples: np.ndarray, point: np.ndarray, level: float = 0.95) -> Dict:
    """{"mean", "lo", "hi"} (nested lists for arrays): the observed statistic and the percentile interval."""
    alpha = (1 - level) / 2
    lo, hi = np.quantile(samples, [alpha, 1 - alpha], axis=0)
    return {"mean": np.asarray(point).tolist(), "lo": lo.tolist(), "hi": hi.tolist()}


def _diff_row(claim: str, label: str, a: np.ndarray, b: np.ndarray, pa: np.ndarray, pb: np.ndarray,
              columns: Sequence[str], use: Optional[Sequence[bool]] = None) -> Dict:
    """A paired comparison A - B: one interval per column (betas, or one column) and a verdict from those in `use`."""
    iv = _interval(a - b, pa - pb)
    per = [{"column": c, "mean": iv["mean"][i], "lo": iv["lo"][i], "hi": iv["hi"][i]} for i, c in enumerate(columns)]
    use = [True] * len(columns) if use is None else list(use)
    return {"claim": claim, "comparison": label, "per_column": per, "used": use,
            "verdict": stats.verdict([(p["lo"], p["hi"]) for p, u in zip(per, use) if u])}


def analyse(out: str, cfg: BudgetConfig, records: Dict) -> Dict:
    """Everything the report needs: tables (a)-(e) with intervals, the oracle, the comparisons and the verdicts."""
    betas, bcols = list(cfg.betas), [f"beta {b:g}" for b in cfg.betas]
    results = {"config": asdict(cfg), "checkpoints": checkpoints(cfg), "experiments": {}, "comparisons": []}
    samples, points = {}, {}
    for e, experiment in enumerate(("single", "pair")):
        methods = list(cfg.single if experiment == "single" else cfg.pair)
        if not methods:
            continue
        per_world = wins_per_world(out, cfg, records, experiment)
        draws = stats.resample_means(list(per_world.values()), cfg.bootstrap, seed=e)  # [n, M, B, C + 1]
        observed = np.mean([x.mean((0, 1)) for x in per_world.values()], 0)[None]
        curve = observed[0, ..., :-1]
        best = np.unravel_index(curve.argmax(), curve.shape)
        points[experiment] = {k: v[0] for k, v in statistics(observed[..., :-1], observed[..., -1], betas, cfg.near).items()}
        samples[experiment] = statistics(draws[..., :-1], draws[..., -1], betas, cfg.near, best)
        sm, pt = samples[experiment], points[experiment]
        kl = {m: [float(np.mean([c["kl"] for r in records.values() if r["run"]["method"] == m
                                 and r["run"]["beta"] == b for c in r["checkpoints"][-1:]])) for b in betas]
              for m in methods}
        results["experiments"][experiment] = {
            "metric": METRIC[experiment], "methods": methods,
            "oracle": {**_interval(sm["oracle"], pt["oracle"]), "method": methods[best[0]], "beta": betas[best[1]],
                       "step": checkpoints(cfg)[best[2]]},
            "tables": {name: {m: _interval(sm[name][:, j], pt[name][j]) for j, m in enumerate(methods)}
                       for name in ("last", "regret", "width", "average", "stop")},
            "curves": {m: curve[j].tolist() for j, m in enumerate(methods)},  # [B, C] pooled win per checkpoint
            "kl_last": kl,
            "monitor_fired": {m: [sum(r["monitor"]["fired_step"] is not None for r in records.values()
                                      if r["run"]["method"] == m and r["run"]["beta"] == b) for b in betas]
                              for m in methods},
            "scale": {m: float(np.mean([r["history"][0]["lsc/scale"] for r in records.values() if r["run"]["method"] == m]))
                      for m in methods},
        }

    def idx(experiment: str, m: str) -> Optional[int]:
        methods = results["experiments"].get(experiment, {}).get("methods", [])
        return methods.index(m) if m in methods else None

    rows = results["comparisons"]
    if "single" in samples and idx("single", "raw") is not None:
        sm, pt, raw = samples["single"], points["single"], idx("single", "raw")
        # Too small: below raw's best beta, where raw's last checkpoint is clearly (interval) more than `near` short of
        # the oracle.
        best = int(np.argmax(pt["last"][raw]))
        regret_lo = np.quantile(sm["regret"][:, raw], 0.025, axis=0)
        too_small = [bool(i < best and regret_lo[i] > cfg.near) for i in range(len(betas))]
        results["raw_best_beta"], results["too_small_betas"] = betas[best], [b for b, t in zip(betas, too_small) if t]
        for t in ("lsc", "sigmoid", "par"):
            j, jm = idx("single", t), idx("single", f"{t}+match")
            if j is not None:
                rows.append(_diff_row("B1", f"{t} - raw, last checkpoint", sm["last"][:, j], sm["last"][:, raw],
                                      pt["last"][j], pt["last"][raw], bcols))
                rows.append(_diff_row("B2", f"{t} - raw, width (decades)", sm["width"][:, j:j + 1],
                                      sm["width"][:, raw:raw + 1], pt["width"][j:j + 1], pt["width"][raw:raw + 1],
                                      ["width"]))
                for name, what in (("average", "average over checkpoints"), ("stop", "at the monitor's stop")):
                    rows.append(_diff_row("info", f"{t} - raw, {what}", sm[name][:, j], sm[name][:, raw],
                                          pt[name][j], pt[name][raw], bcols))
            if jm is not None:
                rows.append(_diff_row("B3", f"{t}+match - raw, last checkpoint (betas too small for raw)",
                                      sm["last"][:, jm], sm["last"][:, raw], pt["last"][jm], pt["last"][raw], bcols,
                                      use=too_small))
            if j is not None and jm is not None:
                rows.append(_diff_row("info", f"{t}+match - {t}, last checkpoint", sm["last"][:, jm], sm["last"][:, j],
                                      pt["last"][jm], pt["last"][j], bcols))
    if "pair" in samples and idx("pair", "lsc AND q=(0.5,0.5)") is not None:
        sm, pt, a = samples["pair"], points["pair"], idx("pair", "lsc AND q=(0.5,0.5)")
        for claim, other in (("B4", "weighted w=0.5"), ("B5", "gdpo")):
            j = idx("pair", other)
            if j is not None:
                rows.append(_diff_row(claim, f"AND - {other}, last checkpoint", sm["last"][:, a], sm["last"][:, j],
                                      pt["last"][a], pt["last"][j], bcols))
                rows.append(_diff_row("info", f"AND - {other}, average over checkpoints", sm["average"][:, a],
                                      sm["average"][:, j], pt["average"][a], pt["average"][j], bcols))
    results["claims"] = {c: {"text": text, "verdict": stats.combine([r["verdict"] for r in rows if r["claim"] == c])
                             if any(r["claim"] == c for r in rows) else "not run"} for c, text in CLAIMS.items()}
    return results


# ---------------------------------------------------------------- report


def _cell(iv: Dict, i: Optional[int] = None, signed: bool = False) -> str:
    m, lo, hi = (iv["mean"], iv["lo"], iv["hi"]) if i is None else (iv["mean"][i], iv["lo"][i], iv["hi"][i])
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"


def _table(head: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def plot(out: str, results: Dict) -> str:
    """Last checkpoint's win vs beta per method (a), one panel per experiment, and raw's and each method's win along
    training at the smallest beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openrlhf_lsc.lab.files import save_figure

    exps = results["experiments"]
    betas, steps = results["config"]["betas"], results["checkpoints"]
    fig, axes = plt.subplots(2, len(exps), figsize=(6 * len(exps), 8), squeeze=False)
    for col, (name, e) in enumerate(exps.items()):
        ax, ax2 = axes[0, col], axes[1, col]
        for i, m in enumerate(e["methods"]):
            t = e["tables"]["last"][m]
            style = dict(color=f"C{i}", ls="--" if "match" in m else "-", marker="o", label=m)
            ax.plot(betas, t["mean"], **style)
            ax.fill_between(betas, t["lo"], t["hi"], color=f"C{i}", alpha=0.12)
            ax2.plot(steps, e["curves"][m][0], **style)
        ax.axhline(e["oracle"]["mean"], color="gray", ls=":", label="oracle (best beta and step, any method)")
        ax.set_xscale("log")
        ax.set_xlabel("KL coefficient beta (absolute)")
        ax.set_ylabel(f"{e['metric']} at the last checkpoint")
        ax.set_title(f"{name}: last checkpoint (step {steps[-1]}) vs beta", fontsize=9)
        ax2.set_xlabel("PPO step")
        ax2.set_ylabel(e["metric"])
        ax2.set_title(f"{name}: along training at the smallest beta ({betas[0]:g})", fontsize=9)
        for a in (ax, ax2):
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, os.path.join(out, "budget.png"), dpi=110)


def markdown(results: Dict, fig: str) -> str:
    cfg, t = results["config"], results["timing"]
    betas = cfg["betas"]
    lines = [
        "# openrlhf_lsc CPU lab — budget protocol: one KL coefficient, a step budget, the last checkpoint",
        "",
        "The practitioner's question (issue 23; PAR's protocol, Fu et al. 2025): with one absolute KL coefficient beta "
        "(no KL controller) and a fixed number of PPO steps, does turning a transform or an aggregation on keep more "
        "gold at the last checkpoint? Every number comes from the runs beside this file (`world*/runs/*.json`).",
        "",
        f"- worlds {list(cfg['seeds'])} x PPO seeds {list(cfg['ppo_seeds'])}; betas {list(betas)}; "
        f"{cfg['ppo']['steps']} steps of {cfg['ppo']['rollout_prompts']} prompts x "
        f"{cfg['ppo'].get('n_samples_per_prompt', 1)} samples; checkpoints every {cfg['eval_every']} steps, each "
        f"judged on {results['eval_prompts']} test prompts x {cfg['eval_samples']} samples",
        "- win: single reward, gold helpfulness above the SFT 85th percentile; two rewards, above the SFT median on both "
        "properties.",
        f"- {t['runs']} PPO runs; CPU time: setup {t['setup_cpu_seconds'] / 60:.1f} min, runs "
        f"{t['runs_cpu_seconds'] / 60:.1f} min ({t['runs_cpu_seconds'] / max(t['runs'], 1):.1f} s per run; the "
        f"workers' process time); wall time of the invocation that wrote this report "
        f"{results['wall_seconds_this_invocation'] / 60:.1f} min",
    ]
    if "budget_check" in results:
        b = results["budget_check"]
        lines += [f"- step budget: raw PPO at the smallest beta peaks at step {b['raw_peak_step']} (pooled win "
                  f"{b['raw_peak_win']:.3f}); the budget is {b['ratio']:.1f}x that step (the protocol asks for >= 3x)"]
    lines += [
        "",
        "## Verdicts",
        "",
        "Intervals: 95% paired bootstrap over worlds, PPO seeds and test prompts (one resampling for every statistic of "
        "an experiment, so differences, the oracle and widths stay paired). A comparison is *reproduced* when no "
        "interval lies wholly below 0 and at least one wholly above 0, *not reproduced* when one lies wholly below 0, "
        "*inconclusive* otherwise; a claim is reproduced when all its comparisons are.",
        "",
    ]
    lines += _table(["claim", "verdict"], [[f"{k}: {v['text']}", f"**{v['verdict']}**"] for k, v in results["claims"].items()])
    too_small = ", ".join(f"{b:g}" for b in results.get("too_small_betas", [])) or "none on this grid"
    lines += ["", "Paired differences (positive: the first method ahead). B3 reads only the betas too small for raw: below "
              f"raw's best (beta {results.get('raw_best_beta', '—')}) with raw's regret interval wholly above "
              f"{cfg['near']}: {too_small}; its other columns are in parentheses. *info* rows are not claims (their "
              "verdict, in parentheses, reads the same rule).", ""]
    rows = []
    for c in results["comparisons"]:
        cells = [_cell(p, signed=True) if u else f"({_cell(p, signed=True)})" for p, u in zip(c["per_column"], c["used"])]
        cells += [""] * (len(betas) - len(cells))
        rows.append([c["claim"], c["comparison"]] + cells + [c["verdict"] if c["claim"] != "info" else f"({c['verdict']})"])
    lines += _table(["claim", "comparison"] + [f"beta {b:g}" for b in betas] + ["verdict"], rows)
    for name, e in results["experiments"].items():
        o = e["oracle"]
        tables = e["tables"]
        lines += ["", f"## {'Single reward (helpfulness)' if name == 'single' else 'Two rewards (helpful + harmless)'}: "
                  f"{e['metric']}", "",
                  f"Oracle: {_cell(o)} ({o['method']}, beta {o['beta']:g}, step {o['step']}: the best pooled "
                  "win of any method, beta and checkpoint; this cell is the oracle in every resample).", "",
                  "(a) Last checkpoint's win per beta (mean KL to SFT of the last checkpoint after the interval):", ""]
        lines += _table(["method"] + [f"beta {b:g}" for b in betas],
                        [[m] + [f"{_cell(tables['last'][m], i)} KL {e['kl_last'][m][i]:.1f}" for i in range(len(betas))]
                         for m in e["methods"]])
        lines += ["", "(b) Regret of the last checkpoint against the oracle (lower is better):", ""]
        lines += _table(["method"] + [f"beta {b:g}" for b in betas],
                        [[m] + [_cell(tables["regret"][m], i) for i in range(len(betas))] for m in e["methods"]])
        lines += ["", f"(c) Width, in decades of beta, of the range whose last checkpoint is within {cfg['near']} of the "
                  f"oracle (linear in log beta between grid points; the grid spans {np.log10(betas[-1] / betas[0]):.1f} "
                  "decades), and (scale match) the factor on the utility fixed on the first batch (mean over runs):", ""]
        lines += _table(["method", "width [decades]", "scale factor"],
                        [[m, _cell(tables["width"][m]), f"{e['scale'][m]:.2f}"] for m in e["methods"]])
        lines += ["", "(d) Average win over checkpoints (PAR's metric):", ""]
        lines += _table(["method"] + [f"beta {b:g}" for b in betas],
                        [[m] + [_cell(tables["average"][m], i) for i in range(len(betas))] for m in e["methods"]])
        lines += ["", "(e) Win at the checkpoint where `--lsc.monitor.stop` would have stopped the run (the last "
                  "checkpoint at or before the step the rule fired; the last checkpoint if it never fired), and how many "
                  "runs it fired in:", ""]
        lines += _table(["method"] + [f"beta {b:g}" for b in betas],
                        [[m] + [f"{_cell(tables['stop'][m], i)} fired {e['monitor_fired'][m][i]}/{results['runs_per_cell']}"
                                for i in range(len(betas))] for m in e["methods"]])
    lines += ["", "## Figure", "", f"![{fig}]({fig})", "",
              "## How to read this", "",
              "- beta is absolute: the same number multiplies the KL penalty of every method, so a transform that shrinks "
              "the utility's spread (sigmoid, par: bounded in (0, 1)) makes the same beta relatively stronger. "
              "`+match` (`--lsc.scale match`) multiplies the utility by std(raw reward) / std(utility) of the run's first "
              "batch, which undoes that; B3 asks whether the bounded shape still protects a run whose beta is too small "
              "once the scale is matched (if not, the protection was a rescaled beta).",
              "- (c) measures how forgiving a method is of the choice of beta; (d) rewards methods that are good early; "
              "(e) is what a run with the monitor's stop rule would keep.",
              "- This is a toy (a 100k-parameter policy, 15-word answers): mechanics and directions, not sizes on LLMs."]
    return "\n".join(lines) + "\n"


def run_budget(out: str, cfg: BudgetConfig, ray: Optional[str] = None) -> Dict:
    """Run (or resume) the budget protocol in `out`: world setups, every run, the analysis; write results.json,
    budget.png and report.md; return the results. `ray`: a Ray cluster's address (default: the local process pool)."""
    torch.set_num_threads(1)
    start = time.time()
    os.makedirs(out, exist_ok=True)
    pin_config(out, cfg)
    setup_all(out, cfg, ray)
    records = run_all(out, cfg, budget_runs(cfg), "PPO runs (budget protocol)", run_budget_one, ray)
    results = analyse(out, cfg, records)
    lab = load_world(out, cfg, cfg.seeds[0])[0]
    results["eval_prompts"] = len(eval_split(lab, cfg)[0])
    results["runs_per_cell"] = len(cfg.seeds) * len(cfg.ppo_seeds)
    results["timing"] = {**timing(out, cfg, records), "runs": len(records)}
    if "raw" in cfg.single:
        raw = np.array(results["experiments"]["single"]["curves"]["raw"][0])  # smallest beta, per checkpoint
        peak = checkpoints(cfg)[int(raw.argmax())]
        results["budget_check"] = {"raw_peak_step": peak, "raw_peak_win": float(raw.max()), "ratio": cfg.ppo["steps"] / peak}
    results["wall_seconds_this_invocation"] = time.time() - start
    fig = plot(out, results)
    write_text(os.path.join(out, "report.md"), markdown(results, fig))
    write_json(os.path.join(out, "results.json"), results)
    print()
    for k, v in results["claims"].items():
        print(f"{k} {v['verdict']:>15}: {v['text']}")
    return results
