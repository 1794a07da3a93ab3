"""What the lab's two paper-2 experiments (`am_vs_bt`, `forgetting`) share: their jobs run side by side in worker
processes, and paired comparisons go through the main lab's bootstrap and verdicts (`stats`) into claim tables.

A comparison is A - B of one metric, paired by world, replicate seed and prompt (or pair): per world an `[S, P]`
array at each compared KL (or once, with no KL). `stats.bootstrap` gives its interval (resampling worlds, then seeds
and prompts within each), `stats.verdict` its verdict, and a claim is `stats.combine` of its comparisons.
"""

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from openrlhf_lsc.lab import stats
from openrlhf_lsc.lab.files import pin_json


def run_jobs(fn: Callable, jobs: Sequence, workers: int, desc: str, done: Callable[[object], bool]) -> List:
    """`fn(job)` for every job, `workers` processes side by side (spawned: each imports torch afresh), or in this
    process when `workers` <= 1; jobs for which `done(job)` holds (their output is on disk: `fn` only reads it) run
    here, so a resumed run starts no processes for them. Results in the order of `jobs`."""
    todo = [i for i, j in enumerate(jobs) if not done(j)]
    results = {i: fn(j) for i, j in enumerate(jobs) if i not in set(todo)}
    if workers <= 1 or len(todo) <= 1:
        results.update({i: fn(jobs[i]) for i in tqdm(todo, desc=desc)})
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, jobs[i]): i for i in todo}
            for f in tqdm(cf.as_completed(futures), total=len(futures), desc=desc):
                results[futures[f]] = f.result()
    return [results[i] for i in range(len(jobs))]


def start(out: str, cfg, setup_world: Callable, what: str) -> Tuple[float, Dict, Dict]:
    """An experiment's start: `cfg` (but its worker count) pinned in `out/config.json`, so resuming with another is
    refused; every world set up by `setup_world((out, cfg, w))`, which writes `world<w>/setup.json` last.

    Returns:
        (the start time, the pinned configuration, {world: setup}).
    """
    started = time.time()
    torch.set_num_threads(1)
    pinned = pin_json(os.path.join(out, "config.json"),
                      {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"}, what)
    setups = run_jobs(setup_world, [(out, cfg, w) for w in cfg.worlds], cfg.workers, "setup (worlds)",
                      lambda j: os.path.exists(os.path.join(out, f"world{j[2]}", "setup.json")))
    return started, pinned, dict(zip(cfg.worlds, setups))


def win_rate_vs(policy_gold: np.ndarray, sft_gold: np.ndarray) -> np.ndarray:
    """Per prompt, P(gold of a policy sample > gold of an SFT sample) + P(tie) / 2 over all pairs of the two.

    Args:
        policy_gold: `[P, n]` gold scores of n policy samples per prompt.
        sft_gold: `[P, m]` gold scores of m SFT samples of the same prompts.

    Returns:
        `[P]` win rates (1/2: no better than SFT).

    Example:
        >>> win_rate_vs(np.array([[1.0, 3.0]]), np.array([[2.0, 3.0]])).tolist()
        [0.375]
    """
    a, b = policy_gold[:, :, None], sft_gold[:, None, :]
    return ((a > b) + 0.5 * (a == b)).mean((1, 2))


def compare(claim: str, label: str, a: Dict[int, np.ndarray], b: Dict[int, np.ndarray], n: int, seed: int,
            targets: Optional[Sequence[float]] = None, margin: float = 0.0) -> Dict:
    """One paired comparison A - B with its bootstrap interval(s) and verdict.

    Args:
        claim: the claim it belongs to ("info" for context rows that make no claim).
        label: what is compared, for the report (say which sign favours whom).
        a, b: per world, `[S, T, P]` arrays (S replicate seeds, T compared KLs, P prompts or pairs) or, with
            `targets` None, `[S, P]`; NaN where a run did not reach a KL.
        n: bootstrap resamples; seed: the resampling's seed.
        targets: the compared KLs (None: a single comparison).
        margin: `stats.verdict`'s margin (non-inferiority).

    Returns:
        {"claim", "label", "margin", "bootstrap_seed", "per_target": [{"target", "reached", "mean", "lo", "hi"}],
        "per_world": {world: [mean difference per target]}, "verdict"}; the interval at target t is
        `stats.bootstrap(..., seed=100 * seed + t)`.
    """
    worlds = sorted(a)
    if sorted(b) != worlds:
        raise ValueError(f"{label}: A has worlds {worlds}, B has {sorted(b)}")
    diffs = {w: np.asarray(a[w], float) - np.asarray(b[w], float) for w in worlds}
    if targets is None:
        diffs = {w: d[:, None, :] for w, d in diffs.items()}
    per_target, per_world = [], {str(w): [] for w in worlds}
    for t, target in enumerate([None] if targets is None else targets):
        d = [diffs[w][:, t, :] for w in worlds]
        if not all(np.isfinite(x).all() for x in d):
            per_target.append({"target": target, "reached": False})
            for w in worlds:
                per_world[str(w)].append(None)
            continue
        if len(d) == 1 and d[0].size == 1:  # one value: nothing to resample, no interval, no verdict
            per_target.append({"target": target, "reached": True, "mean": float(d[0].mean()), "lo": None, "hi": None})
        else:
            per_target.append({"target": target, "reached": True, **stats.bootstrap(d, n, seed=seed * 100 + t)})
        for w, x in zip(worlds, d):
            per_world[str(w)].append(float(x.mean()))
    intervals = [(p["lo"], p["hi"]) if p["reached"] and p["lo"] is not None else None for p in per_target]
    return {"claim": claim, "label": label, "margin": margin, "bootstrap_seed": seed, "per_target": per_target,
            "per_world": per_world, "verdict": stats.verdict(intervals, margin)}


def claim_verdicts(claims: Dict[str, str], comparisons: List[Dict]) -> Dict[str, Dict]:
    """Each claim's verdict: `stats.combine` of its comparisons' verdicts."""
    out = {}
    for key, text in claims.items():
        rows = [c for c in comparisons if c["claim"] == key]
        out[key] = {"text": text, "verdict": stats.combine([c["verdict"] for c in rows]) if rows else "not run"}
    return out


def interval(p: Dict) -> str:
    """A bootstrap result as the main lab's report writes it."""
    if not p["reached"]:
        return "not reached"
    return f"{p['mean']:+.3f} (one value)" if p["lo"] is None else f"{p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]"


def md_table(head: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def claims_markdown(verdicts: Dict[str, Dict], comparisons: List[Dict], columns: Sequence[str]) -> List[str]:
    """The report's claim table, then every comparison with its interval per column (KL) and verdict."""
    lines = ["Intervals: 95% paired bootstrap over worlds, replicate seeds and prompts (or pairs), the main lab's "
             "(`lab.stats`). A comparison is *reproduced* when no interval lies wholly below 0 (below -margin for a "
             "non-inferiority claim) and one lies wholly above it, *not reproduced* when one lies wholly below it, "
             "*inconclusive* otherwise; a claim is reproduced when all its comparisons are.", ""]
    lines += md_table(["claim", "verdict"], [[f"{k}: {v['text']}", f"**{v['verdict']}**"] for k, v in verdicts.items()])
    lines += ["", "Paired differences (A - B as labelled; `info` rows make no claim):", ""]
    lines += md_table(["claim", "comparison"] + list(columns) + ["verdict"],
                      [[c["claim"], c["label"] + (f" (margin {c['margin']:g})" if c["margin"] else "")]
                       + [interval(p) for p in c["per_target"]] + [c["verdict"]] for c in comparisons])
    return lines
