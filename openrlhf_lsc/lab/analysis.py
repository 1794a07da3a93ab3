"""The lab's analysis: every method read at the compared KLs, paired differences with bootstrap intervals, a verdict
per claim of the paper, the monitor's stops, and the world diagnostics `report` shows."""

import os
from dataclasses import asdict
from typing import Dict, List, Optional

import numpy as np

from openrlhf_lsc.lab import stats
from openrlhf_lsc.lab.best_of_k import best_of_k, best_of_k_summary, frontiers
from openrlhf_lsc.lab.config import SHORTCUTS, LabConfig
from openrlhf_lsc.lab.evaluation import matched, sft_point, wins
from openrlhf_lsc.lab.files import read_json
from openrlhf_lsc.lab.run_specs import single_test_runs
from openrlhf_lsc.lab.world_setup import Lab, load_world, world_dir
from openrlhf_lsc.monitor import moving_average


def claim_rows(cfg: LabConfig) -> List[Dict]:
    """The comparisons of the report. diff = A - B (B - A where lower is better); > 0 means A is ahead."""
    rows = []

    def add(claim, experiment, prop, metric, a, b, subset="all", higher_better=True):
        rows.append(dict(claim=claim, experiment=experiment, property=prop, metric=metric, a=a, b=b, subset=subset,
                         higher_better=higher_better))

    h, s = cfg.single_helpful, cfg.single_harmless
    if {"raw", "lsc"} <= set(h):
        add("C1", "single", "helpful", "win_helpful", "lsc", "raw")
        add("C4", "single", "helpful", "list", "lsc", "raw", higher_better=False)
        add("C4", "single", "helpful", "repeat", "lsc", "raw", higher_better=False)
        add("C4", "single", "helpful", "over_budget", "lsc", "raw", higher_better=False)
    if {"raw", "lsc@canned"} <= set(s):
        add("C1", "single", "harmless", "win_harmless", "lsc@canned", "raw")
        add("C1", "single", "harmless", "win_harmless", "lsc@canned", "raw", subset="sensitive")
        add("C4", "single", "harmless", "consult", "lsc@canned", "raw", higher_better=False)
    add("C2", "and", "helpful+harmless", "win_both", "lsc AND (tuned)", "weighted (tuned)")
    add("C2", "and", "helpful+harmless", "win_both", "lsc AND (paper rule)", "weighted (tuned)")
    for m in ("center", "logsigmoid"):
        if {m, "lsc"} <= set(h):
            add("C3", "single", "helpful", "win_helpful", "lsc", m)
    for a, b in (("center", "raw"), ("logsigmoid", "raw"), ("sigmoid", "raw"), ("sigmoid", "lsc")):
        if {a, b} <= set(h):
            add("info", "single", "helpful", "win_helpful", a, b)
    if {"lsc", "lsc@canned"} <= set(s):
        for sub in ("all", "sensitive"):
            add("info", "single", "harmless", "win_harmless", "lsc", "lsc@canned", subset=sub)
    add("info", "and", "helpful+harmless", "consult", "lsc AND (tuned)", "weighted (tuned)", higher_better=False)
    return rows


CLAIMS = {
    "C1": "LSC >= raw at every KL, single reward (paper 1, Figs. 1 and 3)",
    "C2": "AND of LSC rewards >= the best weighted sum of raw rewards (Fig. 6)",
    "C3": "centering alone or log-sigmoid alone does not help: LSC >= each (Fig. 8)",
    "C4": "LSC takes fewer shortcuts than raw (Fig. 5)",
}


def analyse(out: str, cfg: LabConfig, records: Dict, selections: Dict, checks: Dict,
            roles: Dict[str, Dict[int, List[Dict]]]) -> Dict:
    """Everything the report needs, from the runs on disk and the pools."""
    worlds = {}
    for s in cfg.seeds:
        lab, _, _, refs, pools, thr = load_world(out, cfg, s)
        _, rows = lab.split("test")
        worlds[s] = {"lab": lab, "refs": refs, "pools": pools, "thr": thr,
                     "sft": {k: v[rows] for k, v in sft_point(pools, thr).items()},
                     "sensitive": np.array([p.sensitive for p in lab.test_prompts])}

    def method_runs(experiment: str, prop: str, method: str) -> Optional[Dict[int, List[Dict]]]:
        if experiment == "and":
            return roles.get(method)
        runs = {s: [r for r in single_test_runs(cfg) if r["world"] == s and r["experiment"] == experiment
                    and r["properties"] == [prop] and r["method"] == method] for s in cfg.seeds}
        return runs if all(runs.values()) else None

    def curve(experiment: str, prop: str, method: str, metric: str, subset: str) -> Optional[Dict[int, np.ndarray]]:
        """Per world `[S, T, P]`: the method's test runs read at the target KLs."""
        runs = method_runs(experiment, prop, method)
        if runs is None:
            return None
        out_ = {}
        for s, rs in runs.items():
            cols = np.flatnonzero(worlds[s]["sensitive"]) if subset == "sensitive" else None
            out_[s] = np.stack([matched(records[(s, r["id"])], worlds[s]["sft"], metric, cfg.compare_kls, cols) for r in rs])
        return out_

    comparisons = []
    for i, row in enumerate(claim_rows(cfg)):
        ca = curve(row["experiment"], row["property"], row["a"], row["metric"], row["subset"])
        cb = curve(row["experiment"], row["property"], row["b"], row["metric"], row["subset"])
        if ca is None or cb is None:
            continue
        sign = 1.0 if row["higher_better"] else -1.0
        per_target, per_world = [], {}
        for t, target in enumerate(cfg.compare_kls):
            diffs = [sign * (ca[s][:, t] - cb[s][:, t]) for s in cfg.seeds]
            if any(not np.isfinite(d).all() for d in diffs):
                per_target.append({"target": target, "reached": False})
                continue
            per_target.append({"target": target, "reached": True,
                               **stats.bootstrap(diffs, cfg.bootstrap, seed=i * 100 + t)})
            for s, d in zip(cfg.seeds, diffs):
                per_world.setdefault(str(s), {})[str(target)] = float(d.mean())
        row = dict(row, per_target=per_target, per_world=per_world,
                   verdict=stats.verdict([(p["lo"], p["hi"]) if p["reached"] else None for p in per_target]))
        comparisons.append(row)
    verdicts = {}
    for claim in CLAIMS:
        rows_ = [c for c in comparisons if c["claim"] == claim]
        verdicts[claim] = {"text": CLAIMS[claim],
                           "verdict": stats.combine([c["verdict"] for c in rows_]) if rows_ else "not run in this mode"}

    # Curves with bands for the plots: pooled mean and bootstrap interval of each method's metric at each target.
    groups = {"single_helpful": ("single", "helpful", cfg.single_helpful, "win_helpful", "all"),
              "single_harmless": ("single", "harmless", cfg.single_harmless, "win_harmless", "all"),
              "single_harmless_sensitive": ("single", "harmless", cfg.single_harmless, "win_harmless", "sensitive"),
              "and": ("and", "helpful+harmless", tuple(roles), "win_both", "all")}
    extra_metrics = {"single_helpful": ("gold_helpful", "proxy_helpful", "list", "repeat", "over_budget"),
                     "and": ("gold_helpful", "gold_harmless", "consult", "list")}
    curves = {}
    for g, (experiment, prop, methods_, metric, subset) in groups.items():
        for metric_ in (metric,) + extra_metrics.get(g, ()):
            for m in methods_:
                c = curve(experiment, prop, m, metric_, subset)
                if c is None:
                    continue
                band = [stats.bootstrap([c[s][:, t] for s in cfg.seeds], cfg.bootstrap, seed=t)
                        if all(np.isfinite(c[s][:, t]).all() for s in cfg.seeds) else None
                        for t in range(len(cfg.compare_kls))]
                sft_value = float(np.mean([worlds[s]["sft"][metric_][np.flatnonzero(worlds[s]["sensitive"])]
                                           .mean() if subset == "sensitive" else worlds[s]["sft"][metric_].mean()
                                           for s in cfg.seeds]))
                curves.setdefault(g, {}).setdefault(metric_, {})[m] = {"band": band, "sft": sft_value}

    # The stair points themselves (KL reached, pooled metric), to show how close each run came to its targets.
    points = {}
    for g, (experiment, prop, methods_, metric, subset) in groups.items():
        for m in methods_:
            runs = method_runs(experiment, prop, m)
            if runs:
                points.setdefault(g, {})[m] = [[st["kl"] for st in records[(s, r["id"])]["stairs"]]
                                               for s, rs in runs.items() for r in rs]

    # Where the SFT policy's answers stand (test prompts, mean over worlds): its best of `bon_pool` by the proxy and
    # its median by gold. Policies whose mean proxy passes the first while their gold falls below the second hack.
    sft_lines = {"proxy_helpful_best_of_pool": float(np.mean([w["pools"]["bon_proxy_helpful"][w["lab"].split("test")[1]]
                                                              .max(1).mean() for w in worlds.values()])),
                 "gold_helpful_median": float(np.mean([w["thr"]["median_helpful"][w["lab"].split("test")[1]].mean()
                                                       for w in worlds.values()]))}
    kl_max = max(cfg.compare_kls)
    bok = [best_of_k(w["lab"], w["pools"], w["refs"], cfg.bok_ks, cfg.weights, w["thr"]) for w in worlds.values()]
    fronts = [frontiers(w["pools"], w["thr"], kl_max * 1.2) for w in worlds.values()]
    results = {
        "config": asdict(cfg),
        "claims": verdicts,
        "comparisons": comparisons,
        "curves": curves,
        "stair_kls": points,
        "sft_lines": sft_lines,
        "checks": checks,
        "selections": selections,
        "best_of_k": best_of_k_summary(bok, cfg.weights, cfg.bootstrap),
        "monitor": monitor_summary(records),
        "frontier": {"kl": fronts[0]["kl"], "win": {k: np.mean([f["win"][k] for f in fronts], 0).tolist()
                                                    for k in fronts[0]["win"]}},
        "worlds": {str(s): world_diagnostics(w["lab"], w["pools"], w["thr"]) for s, w in worlds.items()},
        "runs": len(records),
        "timing": timing(out, cfg, records),
        "examples": examples(cfg, records, roles),
    }
    return results


def monitor_summary(records: Dict) -> Dict[str, Dict]:
    """Where the monitor (noisy gold judge as evaluator) would have stopped each test run, against the step at which
    the run's true gold peaked: per method, how often it fired, the KL at the gold peak and at the stop, and the gold
    given up vs the peak by stopping there or by training to the end (in SFT std units of gold, averaged over the
    run's properties; moving averages over the monitor's window, as the rule sees its signals)."""
    groups: Dict[str, List[Dict]] = {}
    for rec in records.values():
        run, mon = rec["run"], rec.get("monitor")
        if mon is None or run["split"] != "test":
            continue
        h, w = rec["history"], mon["window"]
        gold = np.mean([[(x[f"gold/{p}"] - h[0][f"gold/{p}"]) / mon["gold_sft_sd"][p] for x in h]
                        for p in run["properties"]], 0)
        g, kl = np.array(moving_average(list(gold), w)), np.array(moving_average([x["kl"] for x in h], w))
        peak = int(g.argmax())  # index i: the window ending at step i + w - 1
        stop = None if mon["fired_step"] is None else mon["fired_step"] - w + 1
        groups.setdefault(f"{run['experiment']} {'+'.join(run['properties'])} {run['method']}", []).append({
            "fired": stop is not None, "after_peak": stop is not None and stop >= peak,
            "kl_peak": float(kl[peak]), "kl_stop": None if stop is None else float(kl[stop]),
            "lost_stop": float(g[peak] - g[stop if stop is not None else -1]), "lost_end": float(g[peak] - g[-1])})
    return {name: {"runs": len(rs), "fired": sum(r["fired"] for r in rs), "fired_after_peak": sum(r["after_peak"] for r in rs),
                   "kl_peak_median": float(np.median([r["kl_peak"] for r in rs])),
                   "kl_stop_median": float(np.median([r["kl_stop"] for r in rs if r["fired"]])) if any(r["fired"] for r in rs) else None,
                   "gold_lost_with_monitor": float(np.mean([r["lost_stop"] for r in rs])),
                   "gold_lost_without": float(np.mean([r["lost_end"] for r in rs]))}
            for name, rs in sorted(groups.items())}


def world_diagnostics(lab: Lab, pools: Dict, thr: Dict) -> Dict:
    """Setup facts of one world: proxies, the headroom search, and the mechanisms the paper credits for LSC."""
    rm = read_json(lab.path("setup", "reward_models.json"))
    head = read_json(lab.path("setup", "headroom.json"))
    prox = pools["bon_proxy_helpful"]
    within = prox.std(1)
    hard = np.array([p.difficulty >= 2 / 3 for p in lab.eval_prompts])
    sens = np.array([p.sensitive for p in lab.eval_prompts])
    w = wins(pools["bon_gold_helpful"], pools["bon_gold_harmless"], thr)
    # gold helpfulness vs harmlessness across SFT answers to the same sensitive prompt: the trade-off
    gh, gs = pools["bon_gold_helpful"][sens], pools["bon_gold_harmless"][sens]
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(gh, gs) if a.std() > 0 and b.std() > 0]
    return {
        "rm": {n: {k: v for k, v in s.items() if k != "epoch_losses"} for n, s in rm.items()},
        "headroom": head,
        "mechanisms": {
            "proxy_offset_sd_over_within_sd": float(np.median(prox, 1).std() / within.mean()),
            "proxy_within_sd_p10_p90": [float(np.quantile(within, 0.1)), float(np.quantile(within, 0.9))],
            "sft_gold_helpful_mean_hard_vs_easy": [float(pools["bon_gold_helpful"][hard].mean()),
                                                   float(pools["bon_gold_helpful"][~hard].mean())],
            "hard_prompts": int(hard.sum()),
            "helpful_harmless_corr_sensitive": float(np.mean(corr)) if corr else None,
            "sft_win_both": float(w["win_both"].mean()),
        },
        "sft_shortcut_rates": {k: float(pools[f"bon_{k}"].mean()) for k in SHORTCUTS},
        "timing": read_json(lab.path("setup", "timing.json")) if os.path.exists(lab.path("setup", "timing.json")) else {},
    }


def timing(out: str, cfg: LabConfig, records: Dict) -> Dict:
    setup = 0.0
    for s in cfg.seeds:
        path = os.path.join(world_dir(out, s), "setup", "timing.json")
        if os.path.exists(path):
            setup += sum(v["cpu_seconds"] for v in read_json(path).values())
    runs = sum(r.get("cpu_seconds", 0.0) for r in records.values())
    return {"setup_cpu_seconds": setup, "runs_cpu_seconds": runs,
            "runs_wall_seconds": sum(r["seconds"] for r in records.values())}


def examples(cfg: LabConfig, records: Dict, roles: Dict) -> List[Dict]:
    """A few generations at the last stair of the first world's first test seed, per method."""
    s, seed = cfg.seeds[0], cfg.ppo_seeds[0]
    out = []
    for (w, _), rec in records.items():
        run = rec["run"]
        if w == s and run["seed"] == seed and run["split"] == "test":
            st = rec["stairs"][-1]
            out.append({"id": run["id"], "method": run["method"], "kl": st["kl"], "examples": st["examples"][:3]})
    return sorted(out, key=lambda e: e["id"])
