"""The lab's run design: the reference settings of the prompt files and the spec of every PPO run it makes."""

from typing import Dict, List, Optional, Sequence, Tuple

from openrlhf_lsc.lab.config import PROPERTIES, SINGLE_Q, LabConfig
from openrlhf_lsc.rewards import NEEDS_REFERENCE


def and_set(qh: float, qs: float) -> str:
    return f"and_{qh:g}_{qs:g}"


def paper_rule(w: float) -> Tuple[float, float]:
    """AND references from the best weighted-sum weight w of helpfulness (paper 1, section 5.3): the paper's best
    weights 0.5 (best-of-k) and 0.6 (RLHF) gave the SFT median for both and (0.75, median) -- the property the
    best weight favours gets the higher (75th percentile) reference."""
    return (0.75, 0.5) if w > 0.5 else (0.5, 0.75) if w < 0.5 else (0.5, 0.5)


def label_sets(cfg: LabConfig) -> Dict[str, Dict[str, Tuple]]:
    """Reference settings: set name -> property -> ("q", quantile) or ("canned",)."""
    sets = {"q85": {p: ("q", SINGLE_Q) for p in PROPERTIES},
            "canned": {"helpful": ("q", SINGLE_Q), "harmless": ("canned",)},
            "bok": {p: ("q", 0.5) for p in PROPERTIES}}
    for qh, qs in list(map(tuple, cfg.and_refs)) + [paper_rule(w) for w in (0.3, 0.5, 0.7)]:
        sets[and_set(qh, qs)] = {"helpful": ("q", qh), "harmless": ("q", qs)}
    return sets


def single_method(method: str) -> Tuple[str, Optional[str]]:
    """"lsc@canned" -> ("lsc", "canned"); a transform that needs a reference defaults to the 85th percentile."""
    transform, _, ref = method.partition("@")
    return transform, (ref or "q85") if transform in NEEDS_REFERENCE else None


def make_run(world_seed: int, experiment: str, properties: Sequence[str], method: str, transform: str, aggregate: str,
             weights: Optional[List[float]], label_set: Optional[str], split: str, seed: int) -> Dict:
    slug = method.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "").replace(",", "_")
    return dict(world=world_seed, experiment=experiment, properties=list(properties), method=method, transform=transform,
                aggregate=aggregate, weights=weights, label_set=label_set, split=split, seed=seed,
                label_key=None if label_set is None else f"lsc_ref_{label_set}",
                id=f"{experiment}-{'+'.join(properties)}-{slug}-{split}-s{seed}")


def single_runs(cfg: LabConfig, world_seed: int, prop: str, methods: Sequence[str], split: str,
                seeds: Sequence[int]) -> List[Dict]:
    out = []
    for m in methods:
        transform, ref = single_method(m)
        out += [make_run(world_seed, "single", [prop], m, transform, "and", None, ref, split, s) for s in seeds]
    return out


def weighted_run(world_seed: int, w: float, split: str, seed: int) -> Dict:
    return make_run(world_seed, "and", PROPERTIES, f"weighted w={w:g}", "raw", "weighted", [w, round(1 - w, 6)], None,
                    split, seed)


def and_run(world_seed: int, qh: float, qs: float, split: str, seed: int) -> Dict:
    return make_run(world_seed, "and", PROPERTIES, f"lsc AND q=({qh:g},{qs:g})", "lsc", "and", None, and_set(qh, qs),
                    split, seed)


def check_runs(cfg: LabConfig) -> List[Dict]:
    """The over-optimisation check: raw PPO on helpfulness, validation seeds, every world."""
    return [r for s in cfg.seeds for r in single_runs(cfg, s, "helpful", ["raw"], "val", cfg.val_seeds)]


def tuning_runs(cfg: LabConfig) -> List[Dict]:
    """Every weight and every AND reference setting, validation seeds (scored on validation prompts)."""
    out = []
    for s in cfg.seeds:
        for v in cfg.val_seeds:
            out += [weighted_run(s, w, "val", v) for w in cfg.weights]
            out += [and_run(s, qh, qs, "val", v) for qh, qs in cfg.and_refs]
    return out


def single_test_runs(cfg: LabConfig) -> List[Dict]:
    out = []
    for s in cfg.seeds:
        out += single_runs(cfg, s, "helpful", cfg.single_helpful, "test", cfg.ppo_seeds)
        out += single_runs(cfg, s, "harmless", cfg.single_harmless, "test", cfg.ppo_seeds)
    return out


def and_test_runs(cfg: LabConfig, selections: Dict) -> Dict[str, Dict[int, List[Dict]]]:
    """The three AND-experiment methods of the report, per world: role -> world -> one run per test seed."""
    roles = {"weighted (tuned)": {}, "lsc AND (tuned)": {}, "lsc AND (paper rule)": {}}
    for s in cfg.seeds:
        sel = selections[str(s)]
        roles["weighted (tuned)"][s] = [weighted_run(s, sel["weight"], "test", v) for v in cfg.ppo_seeds]
        roles["lsc AND (tuned)"][s] = [and_run(s, *sel["and_ref"], "test", v) for v in cfg.ppo_seeds]
        roles["lsc AND (paper rule)"][s] = [and_run(s, *sel["paper_rule"], "test", v) for v in cfg.ppo_seeds]
    return roles
