"""Best-of-k reranking of SFT samples (the lab's Figure 6a) and the gold best-of-n frontier of the plots."""

from typing import Dict, Sequence

import numpy as np
import torch

from openrlhf_lsc.lab import ppo, stats
from openrlhf_lsc.lab.config import PROPERTIES
from openrlhf_lsc.lab.evaluation import wins
from openrlhf_lsc.lab.world_setup import Lab
from openrlhf_lsc.rerank import rerank
from openrlhf_lsc.rewards import RewardSpec


def bon_kl(n: np.ndarray) -> np.ndarray:
    """KL(best-of-n || base) = log n - (n - 1) / n for a continuous ranking (an upper bound with ties)."""
    n = np.asarray(n, dtype=float)
    return np.log(n) - (n - 1) / n


def bon_n_for_kl(kl: float) -> float:
    """The (real) n whose best-of-n KL is `kl` (bisection; bon_kl is increasing in n >= 1)."""
    lo, hi = 1.0, 2.0
    while bon_kl(hi) < kl:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bon_kl(mid) < kl else (lo, mid)
    return (lo + hi) / 2


def bon_pick_probs(utility: np.ndarray, k: float) -> np.ndarray:
    """P(best-of-k with replacement from the pool picks each item), ties broken uniformly. `[..., N]` -> `[..., N]`."""
    n = utility.shape[-1]
    probs = np.empty_like(utility, dtype=float)
    for idx in np.ndindex(utility.shape[:-1]):
        u = utility[idx]
        order = np.argsort(u, kind="stable")
        su = u[order]
        # rank range [lo, hi) of each item's tie group
        lo = np.searchsorted(su, su, side="left")
        hi = np.searchsorted(su, su, side="right")
        p_group = (hi / n) ** k - (lo / n) ** k
        p = np.empty(n)
        p[order] = p_group / (hi - lo)
        probs[idx] = p
    return probs


def frontier_win(p_win: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Gold best-of-n win rate: mean over prompts of 1 - (1 - p_x)^n, p_x the SFT win probability of prompt x."""
    n = np.atleast_1d(np.asarray(n, dtype=float))
    return np.array([np.mean(1 - (1 - p_win) ** m) for m in n])


def best_of_k(lab: Lab, pools: Dict, refs: Dict, ks: Sequence[int], weights: Sequence[float], thr: Dict) -> Dict:
    """Best-of-k reranking of SFT samples (Figure 6a) with the utilities of `openrlhf_lsc.rerank.rerank`, the function
    `python -m openrlhf_lsc.cli.rerank` keeps its argmax of: AND-LSC (median references), weighted raw sums, and raw
    helpfulness alone. Per eval prompt, the expected gold win (both properties) of the answer kept from k draws."""
    n_train = refs["train_prompts"]
    labels = refs["labels"]["bok"][n_train:]
    proxy = torch.tensor(np.stack([pools["bon_proxy_helpful"], pools["bon_proxy_harmless"]], -1))  # [P, N, 2]
    win = wins(pools["bon_gold_helpful"], pools["bon_gold_harmless"], thr)["win_both"]
    specs = {"lsc AND": RewardSpec(names=PROPERTIES, transform="lsc", reference="label", label_key=ppo.LABEL_KEY)}
    specs.update({f"weighted w={w:g}": RewardSpec(names=PROPERTIES, aggregate="weighted", weights=(w, round(1 - w, 6)))
                  for w in weights})
    specs["raw helpful"] = RewardSpec(names=("helpful",))
    out = {"k": list(ks), "kl_formula": bon_kl(np.array(ks)).tolist(), "methods": {}}
    for name, spec in specs.items():
        _, u = rerank(proxy[..., : len(spec.names)], spec, labels if spec.reference == "label" else None)
        u = u.numpy()
        per_prompt = np.stack([np.sum(bon_pick_probs(u, k) * win, -1) for k in ks])  # [k values, P]
        out["methods"][name] = {split: per_prompt[:, lab.split(split)[1]] for split in ("val", "test")}
    return out


def best_of_k_summary(bok: Sequence[Dict], weights: Sequence[float], n_boot: int) -> Dict:
    """Pool the worlds' best-of-k: each method's mean test win per k, and AND-LSC minus the weighted sum whose weight
    won on the validation prompts (chosen per world and k) and minus raw helpfulness, with bootstrap intervals over
    worlds and test prompts."""
    names = list(bok[0]["methods"])
    out = {"k": bok[0]["k"], "kl_formula": bok[0]["kl_formula"],
           "methods": {m: {"win_both": np.mean([b["methods"][m]["test"].mean(1) for b in bok], 0).tolist()} for m in names},
           "diffs": {}}
    tuned, out["tuned_weight"] = [], []
    for b in bok:
        val = np.stack([b["methods"][f"weighted w={w:g}"]["val"].mean(1) for w in weights])  # [weights, k values]
        best = val.argmax(0)
        tuned.append(np.stack([b["methods"][f"weighted w={weights[c]:g}"]["test"][t] for t, c in enumerate(best)]))
        out["tuned_weight"].append([weights[c] for c in best])  # per world, per k
    for label, other in (("lsc AND - weighted (weight tuned on val)", tuned),
                         ("lsc AND - raw helpful", [b["methods"]["raw helpful"]["test"] for b in bok])):
        out["diffs"][label] = [stats.bootstrap([(b["methods"]["lsc AND"]["test"][t] - o[t])[None] for b, o in zip(bok, other)],
                                               n_boot, seed=t) for t in range(len(out["k"]))]
    return out


def frontiers(pools: Dict, thr: Dict, kl_max: float) -> Dict:
    """Gold best-of-n frontier for each win definition, on a KL grid up to kl_max."""
    w = wins(pools["bon_gold_helpful"], pools["bon_gold_harmless"], thr)
    kl = np.linspace(0.0, max(kl_max, 0.5) * 1.05, 60)
    n = np.array([bon_n_for_kl(x) for x in kl])
    return {"kl": kl.tolist(), "win": {name: frontier_win(v.mean(1), n).tolist() for name, v in w.items()}}
