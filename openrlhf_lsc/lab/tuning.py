"""The lab's checks and tuning on validation: does raw PPO over-optimise in every world, and which weight and which
AND reference setting score best on the validation prompts."""

import math
from typing import Dict

import numpy as np

from openrlhf_lsc.lab.config import LabConfig
from openrlhf_lsc.lab.evaluation import matched, sft_point
from openrlhf_lsc.lab.run_specs import check_runs, paper_rule, tuning_runs
from openrlhf_lsc.lab.world_setup import load_world


def overoptimisation_check(out: str, cfg: LabConfig, records: Dict) -> Dict[str, Dict]:
    """Per world: raw PPO's helpfulness win rate (validation seeds and prompts) at each KL stair, and whether it
    rises above the SFT policy's by at least `overopt_margin`, peaks before the last stair and falls from the peak by
    at least `overopt_margin` by the last stair."""
    result = {}
    for s in cfg.seeds:
        lab, *_, pools, thr = load_world(out, cfg, s)
        sft = float(sft_point(pools, thr)["win_helpful"][lab.split("val")[1]].mean())
        recs = [records[(s, r["id"])] for r in check_runs(cfg) if r["world"] == s]
        kl = np.mean([[st["kl"] for st in rec["stairs"]] for rec in recs], 0)
        win = np.mean([[st["mean"]["win_helpful"] for st in rec["stairs"]] for rec in recs], 0)
        gold = np.mean([[st["mean"]["gold_helpful"] for st in rec["stairs"]] for rec in recs], 0)
        peak = int(np.argmax(win))
        rise, drop = float(win[peak] - sft), float(win[peak] - win[-1])
        margin = cfg.overopt_margin or 0.0
        result[str(s)] = {"sft_win": sft, "kl": kl.tolist(), "win": win.tolist(), "gold": gold.tolist(),
                          "peak_kl": float(kl[peak]), "rise_to_peak": rise, "drop_after_peak": drop,
                          "passed": bool(peak < len(win) - 1 and min(rise, drop) >= margin and drop > 0)}
    return result


def select(cfg: LabConfig, out: str, records: Dict) -> Dict[str, Dict]:
    """Per world: validation score of every weight and AND setting (mean over the target KLs and validation seeds of
    the win rate on both properties), the best of each side, and the paper-rule references from the best weight."""
    sel = {}
    for s in cfg.seeds:
        lab, *_ , pools, thr = load_world(out, cfg, s)
        sft = {k: v[lab.split("val")[1]] for k, v in sft_point(pools, thr).items()}
        curves = {}
        for r in tuning_runs(cfg):
            if r["world"] == s:
                curve = matched(records[(s, r["id"])], sft, "win_both", cfg.compare_kls).mean(-1)
                curves.setdefault(r["method"], []).append(curve)
        # Scored over the KLs every setting reached: skipping a hard-to-reach (usually worse) KL is no advantage.
        common = np.all([np.isfinite(c).all(0) for c in map(np.array, curves.values())], 0)
        scores = {m: float(np.mean(np.array(c)[:, common])) if common.any() else None for m, c in curves.items()}

        def score(m: str) -> float:  # a setting that reached no target KL ranks last
            return -math.inf if scores[m] is None else scores[m]

        best_w = max(cfg.weights, key=lambda w: score(f"weighted w={w:g}"))
        best_ref = max(map(tuple, cfg.and_refs), key=lambda q: score(f"lsc AND q=({q[0]:g},{q[1]:g})"))
        sel[str(s)] = {"scores": scores, "scored_kls": [k for k, c in zip(cfg.compare_kls, common) if c], "weight": best_w, "and_ref": list(best_ref), "paper_rule": list(paper_rule(best_w))}
    return sel
