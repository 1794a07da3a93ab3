"""`python -m openrlhf_lsc.lab.am_vs_bt --out DIR [--smoke | --full]`: a Bradley-Terry RM vs an Advantage Model at
matched pairwise accuracy, and PPO with each, over several worlds.

Two-task world (issue 4): the lab's prompts split by topic into a "code" task and a "qa" task. Both are judged by
the lab's gold helpfulness, but preference labels are clean for code (verifiable) and noisy for qa:
P(a > b) = sigmoid((gold_a - gold_b) / T_task). In each world (the lab's prompts and SFT policy, `world<w>/lab`) and
for each replicate seed s:
1. pairs of SFT samples labelled with these temperatures: training pairs on the training prompts, validation pairs on
   the validation prompts (they pick the checkpoints) and test pairs on the test prompts (they measure the proxies);
2. three proxies from the same initialisation (seed s) on the same pairs: BT, the Advantage Model
   (`openrlhf_lsc.am_loss.AdvantageModelLoss`, `Config.am`) and the AM with `task_coef` 0, a checkpoint after every
   epoch;
3. `match_checkpoints` picks one checkpoint per proxy at equal validation accuracy: the target is the lowest of the
   proxies' best accuracies (the highest accuracy all of them reach); each proxy takes its checkpoint closest to it,
   the earliest on ties. ECE (10 bins), accuracy and per-task score mean/std of the matched proxies are then read on
   the test pairs and on SFT samples of the eval prompts;
4. PPO with each matched proxy (PPO seed s) up a KL staircase (`lab.ppo`, as the main lab's runs), evaluated at the
   end of every stair on the eval prompts: per prompt, the gold win rate against SFT samples of the same prompt,
   P(gold(policy sample) > gold(SFT sample)) + P(tie) / 2; per task its mean.
Comparisons are paired by world, seed and test pair / eval prompt, with the main lab's hierarchical bootstrap and
verdicts (`lab.paper2.compare`, `lab.stats`); metrics that exist once per proxy or run (ECE, |win code - win qa|) are
resampled over worlds and seeds only. Outputs in DIR: am_vs_bt.md, am_vs_bt.png, am_vs_bt.json, config.json;
world<w>/ (lab/, pairs, proxies/, runs/) for resuming: rerun the same command.
"""

import argparse
import copy
import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from openrlhf_lsc.am_loss import AdvantageModelLoss, pairwise_metrics  # noqa: E402
from openrlhf_lsc.files import write_atomic  # noqa: E402
from openrlhf_lsc.lab import models, paper2, ppo, stats  # noqa: E402
from openrlhf_lsc.lab.config import PRESETS as LAB_PRESETS  # noqa: E402
from openrlhf_lsc.lab.evaluation import gold_scores  # noqa: E402
from openrlhf_lsc.lab.files import read_json, save_figure, save_model_dir, write_json, write_text  # noqa: E402
from openrlhf_lsc.lab.world_setup import Lab  # noqa: E402

TASKS = {"code": ("code", "bike", "home", "money"), "qa": ("cooking", "garden", "travel", "health")}
TASK_OF = {topic: task for task, topics in TASKS.items() for topic in topics}
# Proxy -> AdvantageModelLoss overrides of Config.am (None: Bradley-Terry).
PROXIES = {"bt": None, "am": {}, "am_task0": {"task_coef": 0.0}}
NAMES = {"bt": "BT", "am": "AM", "am_task0": "AM (task_coef 0)"}
CLAIMS = {
    "A1": "AM is better calibrated than BT at equal accuracy: lower ECE on test pairs (paper 2, Table 1)",
    "A2": "AM keeps tasks balanced under PPO: smaller abs(win code - win qa) than BT at every KL (paper 2, Fig. 1a)",
}


@dataclasses.dataclass
class Config:
    """Sizes of one run (presets: `PRESETS`); each world's prompts and SFT policy come from the lab preset `lab`."""

    mode: str
    lab: str = "quick"
    worlds: Tuple[int, ...] = (0,)  # world seeds
    seeds: Tuple[int, ...] = (0, 1, 2)  # replicate seeds: proxy initialisation and pair order s, PPO seed s
    temperature: Dict[str, float] = dataclasses.field(default_factory=lambda: {"code": 0.05, "qa": 2.0})
    pairs_per_prompt: int = 8  # training pairs per training prompt
    eval_pairs_per_prompt: int = 16  # validation / test pairs per validation / test prompt
    rm_epochs: int = 6  # checkpoints: one after every epoch
    rm_lr: float = 1e-3
    am: Dict = dataclasses.field(default_factory=lambda: {"margin": 2.5, "task_std": 1.0})  # AdvantageModelLoss kwargs
    kl_targets: Tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)  # the KL staircase of every PPO run (nats per response)
    compare_kls: Tuple[float, ...] = (1.0, 2.0, 4.0, 6.0)  # inside the staircase: the last stair often stops short of 8
    kl_start: float = 0.1  # initial KL coefficient, in units of the proxy's std over SFT samples
    ppo: Dict = dataclasses.field(default_factory=lambda: {"steps": 160, "rollout_prompts": 64, "train_batch": 32})
    sft_pool: int = 16  # SFT samples per eval prompt (the win-rate reference)
    eval_samples: int = 8  # policy samples per eval prompt at each stair
    bootstrap: int = 2000
    workers: int = 2


PRESETS = {
    "default": Config(mode="default"),
    "full": Config(mode="full", worlds=(0, 1, 2, 3, 4)),
    "smoke": Config(mode="smoke", lab="smoke", seeds=(0,), pairs_per_prompt=4, eval_pairs_per_prompt=4, rm_epochs=2,
                    kl_targets=(0.2, 0.5), compare_kls=(0.1, 0.3), sft_pool=4, eval_samples=4, bootstrap=200, workers=1,
                    ppo={"steps": 4, "rollout_prompts": 16, "train_batch": 8, "actor_lr": 5e-3}),
}


def match_checkpoints(accuracy: Dict[str, Sequence[float]]) -> Tuple[float, Dict[str, int]]:
    """The accuracy-matching rule: one checkpoint per proxy at (as nearly as the checkpoints allow) equal accuracy.

    The target is the lowest of the proxies' best accuracies: the highest accuracy every proxy reaches. Each proxy
    takes the checkpoint whose accuracy is closest to the target, the earliest of equally close ones (so the proxy
    with the lowest best accuracy takes its first best checkpoint, and a proxy that gets there sooner is stopped
    early).

    Args:
        accuracy: proxy -> validation accuracy of each of its checkpoints, in training order.

    Returns:
        (target, proxy -> index of its matched checkpoint).

    Example:
        >>> match_checkpoints({"bt": [0.60, 0.70, 0.66], "am": [0.55, 0.62, 0.64]})
        (0.64, {'bt': 2, 'am': 2})
    """
    if not accuracy or any(len(v) == 0 for v in accuracy.values()):
        raise ValueError(f"every proxy needs at least one checkpoint, got {({k: len(v) for k, v in accuracy.items()})}")
    target = min(max(v) for v in accuracy.values())
    chosen = {}
    for name, acc in accuracy.items():
        d = np.abs(np.asarray(acc, float) - target)
        chosen[name] = int(np.flatnonzero(d <= d.min() + 1e-12)[0])  # accuracies are counts / n: exact ties happen
    return target, chosen


def world_lab(out: str, cfg: Config, w: int) -> Lab:
    return Lab(os.path.join(out, f"world{w}", "lab"), dataclasses.replace(LAB_PRESETS[cfg.lab], seeds=(w,), workers=1), w)


def _tasks(prompts) -> List[str]:
    return [TASK_OF[p.topic] for p in prompts]


def setup_world(job: Tuple[str, Config, int]) -> Dict:
    """SFT policy, labelled pairs (train / val / test) and the SFT pool on the eval prompts of world `w`
    (`world<w>/pairs.pt`; `world<w>/setup.json` last, the marker)."""
    out, cfg, w = job
    marker = os.path.join(out, f"world{w}", "setup.json")
    if os.path.exists(marker):
        return read_json(marker)
    torch.set_num_threads(1)
    cpu = time.process_time()
    lab = world_lab(out, cfg, w)
    for split, prompts in (("eval", lab.eval_prompts), ("val", lab.val_prompts), ("test", lab.test_prompts)):
        missing = set(TASKS) - set(_tasks(prompts))
        if missing:
            raise ValueError(f"world {w}: the {split} prompts have no {sorted(missing)} prompt; use more prompts "
                             f"(lab preset {cfg.lab!r}, prompts_limit) or another world seed")
    if not os.path.exists(lab.path("models", "sft")):
        lab.build_sft()
    sft = lab.load_sft()
    gen = torch.Generator().manual_seed(w + 1)
    data, agree = {}, {}
    for split, prompts, k in (("train", lab.train_prompts, cfg.pairs_per_prompt),
                              ("val", lab.val_prompts, cfg.eval_pairs_per_prompt),
                              ("test", lab.test_prompts, cfg.eval_pairs_per_prompt)):
        flat = [p for p in prompts for _ in range(2 * k)]
        ids = models.encode_prompts([p.text for p in flat])
        responses = models.sample_batched(sft, ids, gen)
        gold = torch.tensor(gold_scores("helpful", flat, models.decode_responses(responses)))
        a, b = torch.arange(0, len(flat), 2), torch.arange(1, len(flat), 2)
        tasks = _tasks(flat[::2])
        temp = torch.tensor([cfg.temperature[t] for t in tasks])
        a_wins = models.bradley_terry_labels(gold[a], gold[b], temp, gen)
        data[split] = {"prompt_ids": ids[a], "tasks": tasks,
                       "chosen": torch.where(a_wins[:, None], responses[a], responses[b]),
                       "rejected": torch.where(a_wins[:, None], responses[b], responses[a])}
        strict = gold[a] != gold[b]
        agree[split] = {t: (a_wins == (gold[a] > gold[b]))[torch.tensor([x == t for x in tasks]) & strict]
                        .float().mean().item() for t in TASKS}
    # SFT pool on the eval prompts: the win-rate reference and the proxies' per-task score scales.
    flat = [p for p in lab.eval_prompts for _ in range(cfg.sft_pool)]
    data["pool"] = {"prompt_ids": models.encode_prompts([p.text for p in flat])}
    data["pool"]["responses"] = models.sample_batched(sft, data["pool"]["prompt_ids"], gen)
    gold_sft = gold_scores("helpful", flat, models.decode_responses(data["pool"]["responses"])).reshape(-1, cfg.sft_pool)
    write_atomic(os.path.join(out, f"world{w}", "pairs.pt"), lambda f: torch.save(data, f))
    setup = {"world": w, "label_agreement_with_gold": agree, "gold_sft": gold_sft.tolist(),
             "eval_task": _tasks(lab.eval_prompts), "n_pairs": {k: len(v["tasks"]) for k, v in data.items() if k != "pool"},
             "cpu_seconds": time.process_time() - cpu}
    write_json(marker, setup)
    return setup


def proxy_dir(out: str, w: int, s: int, name: str) -> str:
    return os.path.join(out, f"world{w}", "proxies", f"s{s}", name)


def train_proxies(job: Tuple[str, Config, int, int]) -> Dict:
    """The three proxies of world `w`, seed `s`: a checkpoint per epoch, validation accuracy of each, the matched
    checkpoints (`match_checkpoints`) saved and measured (`world<w>/proxies/s<s>.json` last, the marker)."""
    out, cfg, w, s = job
    marker = os.path.join(out, f"world{w}", "proxies", f"s{s}.json")
    if os.path.exists(marker):
        return read_json(marker)
    torch.set_num_threads(1)
    cpu = time.process_time()
    lab = world_lab(out, cfg, w)
    sft = lab.load_sft()
    data = torch.load(os.path.join(out, f"world{w}", "pairs.pt"))
    tr, va, te, pool = data["train"], data["val"], data["test"], data["pool"]
    eval_task = np.array(read_json(os.path.join(out, f"world{w}", "setup.json"))["eval_task"])

    def measure(rm, split: Dict) -> Dict:
        return pairwise_metrics(models.score(rm, split["prompt_ids"], split["chosen"]),
                                models.score(rm, split["prompt_ids"], split["rejected"]), split["tasks"])

    checkpoints, curves = {}, {}
    for name, overrides in PROXIES.items():
        rm = models.reward_model_from(sft, 1000 * w + 10 + s)  # the same start for every proxy of (w, s)
        loss_fn = None
        if overrides is not None:
            am = AdvantageModelLoss(**{**cfg.am, **overrides}).train()
            loss_fn = lambda c, r, idx, am=am: am(c, r, [tr["tasks"][j] for j in idx])  # noqa: E731
        states, curve = [], []

        def on_epoch(epoch: int, rm_) -> None:
            states.append(copy.deepcopy(rm_.state_dict()))
            v, t = measure(rm_, va), measure(rm_, te)
            curve.append({"epoch": epoch, "val_accuracy": v["accuracy"], "test_accuracy": t["accuracy"],
                          "test_ece": t["ece"]})

        losses = models.train_reward_model(rm, tr["prompt_ids"], tr["chosen"], tr["rejected"], epochs=cfg.rm_epochs,
                                           lr=cfg.rm_lr, batch=64, seed=1000 * w + s, desc=f"RM {name} w{w} s{s}",
                                           loss_fn=loss_fn, on_epoch=on_epoch)
        for c, loss in zip(curve, losses):
            c["train_loss"] = loss
        checkpoints[name], curves[name] = states, curve
    target, chosen = match_checkpoints({n: [c["val_accuracy"] for c in curves[n]] for n in PROXIES})
    record = {"world": w, "seed": s, "target_val_accuracy": target, "proxies": {}}
    for name in PROXIES:
        rm = models.reward_model_from(sft, 0)
        rm.load_state_dict(checkpoints[name][chosen[name]])
        rm.eval()
        save_model_dir(proxy_dir(out, w, s, name), rm, lab.tokenizer)
        scores = models.score_batched(rm, pool["prompt_ids"], pool["responses"]).numpy().reshape(len(eval_task), -1)
        c, r = models.score(rm, te["prompt_ids"], te["chosen"]), models.score(rm, te["prompt_ids"], te["rejected"])
        record["proxies"][name] = {
            "epoch": chosen[name] + 1, "curve": curves[name],
            "val_accuracy": curves[name][chosen[name]]["val_accuracy"],
            "test": pairwise_metrics(c, r, te["tasks"]),
            "test_correct": (c > r).float().tolist(),  # per test pair, for paired intervals of the accuracy
            "sft_pool": scores.tolist(),
            "sft_pool_per_task": {t: {"mean": float(scores[eval_task == t].mean()), "std": float(scores[eval_task == t].std())}
                                  for t in TASKS},
        }
    record["cpu_seconds"] = time.process_time() - cpu
    write_json(marker, record)
    return record


def run_path(out: str, w: int, proxy: str, s: int) -> str:
    return os.path.join(out, f"world{w}", "runs", f"{proxy}-s{s}.json")


@torch.no_grad()
def evaluate_policy(policy, sft, rm, lab: Lab, cfg: Config, gold_sft: np.ndarray, seed: int) -> Dict:
    """Per eval prompt: gold win rate vs the SFT pool, gold and proxy score means; KL to SFT (mean per response)."""
    gen = torch.Generator().manual_seed(2000 + seed)
    flat = [p for p in lab.eval_prompts for _ in range(cfg.eval_samples)]
    ids = models.encode_prompts([p.text for p in flat])
    responses = models.sample_batched(policy, ids, gen)
    mask = models.action_mask(responses)
    kl = ((models.response_logprobs(policy, ids, responses) - models.response_logprobs(sft, ids, responses)) * mask).sum(1)
    gold = gold_scores("helpful", flat, models.decode_responses(responses)).reshape(-1, cfg.eval_samples)
    proxy = models.score_batched(rm, ids, responses).numpy().reshape(-1, cfg.eval_samples)
    return {"kl": kl.mean().item(), "win": paper2.win_rate_vs(gold, gold_sft).round(5).tolist(),
            "gold": gold.mean(1).round(5).tolist(), "proxy": proxy.mean(1).round(5).tolist()}


def run_one(job: Tuple[str, Config, int, str, int]) -> Dict:
    """PPO with one matched proxy up the KL staircase, evaluated at the end of every stair; `world<w>/runs/<id>.json`."""
    out, cfg, w, proxy, s = job
    target = run_path(out, w, proxy, s)
    if os.path.exists(target):
        return read_json(target)
    torch.set_num_threads(1)
    cpu, start = time.process_time(), time.time()
    lab = world_lab(out, cfg, w)
    sft, rm = lab.load_sft(), models.load_rm(proxy_dir(out, w, s, proxy))
    setup = read_json(os.path.join(out, f"world{w}", "setup.json"))
    sft_scores = np.array(read_json(os.path.join(out, f"world{w}", "proxies", f"s{s}.json"))["proxies"][proxy]["sft_pool"])
    gold_sft = np.array(setup["gold_sft"])
    pcfg = ppo.PPOConfig(**{**cfg.ppo, "kl_coef": cfg.kl_start * float(sft_scores.std()), "kl_targets": tuple(cfg.kl_targets)})
    pipeline = ppo.RewardPipeline([rm], [proxy], [{}] * len(lab.train_prompts))
    stairs, history = [], []

    def on_step(step: int, policy) -> None:
        if step and step % pcfg.stair_steps == 0:
            stairs.append({"target": pcfg.kl_targets[len(stairs)], "step": step,
                           **evaluate_policy(policy, sft, rm, lab, cfg, gold_sft, s)})

    result = ppo.train(sft, models.encode_prompts([p.text for p in lab.train_prompts]), pipeline, pcfg, seed=1000 + s,
                       desc=f"PPO {proxy} w{w} s{s}", progress=cfg.workers <= 1, on_step=on_step, history=history)
    stairs.append({"target": pcfg.kl_targets[-1], "step": pcfg.steps,
                   **evaluate_policy(result.policy, sft, rm, lab, cfg, gold_sft, s)})
    record = {"world": w, "proxy": proxy, "seed": s, "ppo": dataclasses.asdict(pcfg), "stairs": stairs,
              "history": history, "seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu}
    write_json(target, record)
    return record


def win_at_kls(run: Dict, targets: Sequence[float]) -> np.ndarray:
    """A run's per-prompt win rate at each target KL `[T, P]` (`stats.at_kl`; the SFT policy is the KL-0 point, where
    its win rate against its own samples is 1/2); NaN where the staircase missed a target."""
    kls = [0.0] + [st["kl"] for st in run["stairs"]]
    values = np.array([np.full(len(run["stairs"][0]["win"]), 0.5)] + [st["win"] for st in run["stairs"]])
    return np.stack([stats.at_kl(kls, values, t) for t in targets])


def analyse(cfg: Config, setups: Dict[int, Dict], proxies: Dict[Tuple[int, int], Dict], runs: Dict[Tuple[int, str, int], Dict]
            ) -> Dict:
    """Per-proxy tables and every paired comparison of the report."""
    worlds, seeds, kls = cfg.worlds, cfg.seeds, cfg.compare_kls
    task = {w: np.array(setups[w]["eval_task"]) for w in worlds}

    def static(name: str, fn) -> Dict[int, np.ndarray]:  # per world [S, P] of a proxy-level metric
        return {w: np.array([np.atleast_1d(fn(proxies[(w, s)]["proxies"][name])) for s in seeds], float) for w in worlds}

    def spread(p: Dict) -> float:  # how unequal the two tasks' score spreads are (0: equal)
        st = p["sft_pool_per_task"]
        return abs(np.log(st["code"]["std"] / st["qa"]["std"]))

    def win(name: str, subset: Optional[str] = None) -> Dict[int, np.ndarray]:  # per world [S, T, P]
        return {w: np.array([win_at_kls(runs[(w, name, s)], kls)[:, task[w] == subset if subset else slice(None)]
                             for s in seeds]) for w in worlds}

    def gap(name: str) -> Dict[int, np.ndarray]:  # per world [S, T, 1]: |win code - win qa|
        c, q = win(name, "code"), win(name, "qa")
        return {w: np.abs(c[w].mean(2, keepdims=True) - q[w].mean(2, keepdims=True)) for w in worlds}

    n = cfg.bootstrap
    ece = {k: static(k, lambda p: p["test"]["ece"]) for k in PROXIES}
    ece_last = {k: static(k, lambda p: p["curve"][-1]["test_ece"]) for k in PROXIES}
    acc = {k: static(k, lambda p: p["test_correct"]) for k in PROXIES}
    spr = {k: static(k, spread) for k in PROXIES}
    gaps = {k: gap(k) for k in PROXIES}
    wins = {k: win(k) for k in PROXIES}
    c = paper2.compare
    comparisons = [
        c("A1", "ECE: BT - AM (> 0: AM better calibrated)", ece["bt"], ece["am"], n, 1),
        c("info", "test accuracy: AM - BT (the matching; 0 = matched)", acc["am"], acc["bt"], n, 2),
        c("info", "ECE: BT - AM (task_coef 0)", ece["bt"], ece["am_task0"], n, 3),
        c("info", "ECE: AM - AM (task_coef 0) (> 0: task_coef 0 better calibrated)", ece["am"], ece["am_task0"], n, 4),
        c("info", "test accuracy: AM (task_coef 0) - BT", acc["am_task0"], acc["bt"], n, 5),
        c("info", f"ECE without matching (both at the last epoch, {cfg.rm_epochs}): BT - AM", ece_last["bt"], ece_last["am"],
          n, 8),
        c("info", "abs(log(std code / std qa)) of SFT-sample scores: BT - AM (> 0: AM more even)", spr["bt"], spr["am"], n, 6),
        c("info", "abs(log(std code / std qa)): BT - AM (task_coef 0)", spr["bt"], spr["am_task0"], n, 7),
    ]
    ppo_rows = [
        c("A2", "abs(win code - win qa): BT - AM (> 0: AM more balanced)", gaps["bt"], gaps["am"], n, 10, kls),
        c("info", "abs(win code - win qa): BT - AM (task_coef 0)", gaps["bt"], gaps["am_task0"], n, 11, kls),
        c("info", "win rate vs SFT, all eval prompts: AM - BT", wins["am"], wins["bt"], n, 12, kls),
        c("info", "win rate vs SFT, qa prompts: AM - BT", win("am", "qa"), win("bt", "qa"), n, 13, kls),
        c("info", "win rate vs SFT, code prompts: AM - BT", win("am", "code"), win("bt", "code"), n, 14, kls),
        c("info", "win rate vs SFT, all eval prompts: AM (task_coef 0) - BT", wins["am_task0"], wins["bt"], n, 15, kls),
    ]
    def pooled(per_world: Dict[int, np.ndarray]) -> List[Optional[float]]:  # [S, T] per world -> mean per KL
        x = np.array([per_world[w] for w in worlds])
        return [None if np.isnan(x[..., t]).all() else float(np.nanmean(x[..., t])) for t in range(len(kls))]

    # Pooled means per proxy (over worlds and seeds) for the tables and plots.
    table = {}
    for k in PROXIES:
        ps = [proxies[(w, s)]["proxies"][k] for w in worlds for s in seeds]
        m = lambda f: float(np.mean([f(p) for p in ps]))  # noqa: E731
        table[k] = {"epoch": m(lambda p: p["epoch"]), "val_accuracy": m(lambda p: p["val_accuracy"]),
                    "test_accuracy": m(lambda p: p["test"]["accuracy"]), "test_ece": m(lambda p: p["test"]["ece"]),
                    **{f"{t}_{q}": m(lambda p: p["sft_pool_per_task"][t][q]) for t in TASKS for q in ("mean", "std")},
                    "ece_at_last_epoch": m(lambda p: p["curve"][-1]["test_ece"]),
                    "test_accuracy_at_last_epoch": m(lambda p: p["curve"][-1]["test_accuracy"]),
                    "win": pooled({w: wins[k][w].mean(2) for w in worlds}),
                    **{f"win_{t}": pooled({w: v.mean(2) for w, v in win(k, t).items()}) for t in TASKS},
                    "gap": pooled({w: gaps[k][w][..., 0] for w in worlds}),
                    "stair_kls": [[st["kl"] for st in runs[(w, k, s)]["stairs"]] for w in worlds for s in seeds]}
    return {"comparisons": comparisons + ppo_rows, "claims": paper2.claim_verdicts(CLAIMS, comparisons + ppo_rows),
            "table": table}


def plot(out: str, cfg: Config, proxies: Dict, analysis: Dict) -> str:
    """Per-task SFT-sample scores of each proxy (first world and seed), ECE vs validation accuracy over the
    checkpoints (matched ones ringed), and per-task win rates and their gap vs KL (means over worlds and seeds)."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    first = proxies[(cfg.worlds[0], cfg.seeds[0])]
    eval_task = np.array(read_json(os.path.join(out, f"world{cfg.worlds[0]}", "setup.json"))["eval_task"])
    for ax, name in zip(axes[0], PROXIES):
        s = np.array(first["proxies"][name]["sft_pool"])
        for t in TASKS:
            ax.hist(s[eval_task == t].ravel(), bins=30, alpha=0.55, density=True, label=t)
        ax.set_title(f"{NAMES[name]}: scores of SFT samples per task\n(world {cfg.worlds[0]}, seed {cfg.seeds[0]}, "
                     f"matched epoch {first['proxies'][name]['epoch']})", fontsize=10)
        ax.set_xlabel("proxy score")
        ax.legend()
    ax = axes[1, 0]
    for (name, color) in zip(PROXIES, ("C0", "C1", "C2")):
        for rec in proxies.values():
            p = rec["proxies"][name]
            ax.plot([c["val_accuracy"] for c in p["curve"]], [c["test_ece"] for c in p["curve"]], ".", color=color,
                    alpha=0.35)
            ax.plot(p["val_accuracy"], p["test"]["ece"], "o", color=color, mfc="none", ms=9)
        ax.plot([], [], "o", color=color, label=NAMES[name])
    ax.set_title("every checkpoint: test ECE vs validation accuracy\n(rings: the matched ones)", fontsize=10)
    ax.set(xlabel="validation pairwise accuracy", ylabel="test ECE")
    ax.legend(fontsize=8)
    kls = [0.0] + list(cfg.compare_kls)
    tab = analysis["table"]
    for ax, keys, title in ((axes[1, 1], ("win_code", "win_qa"), "per-task gold win rate vs SFT"),
                            (axes[1, 2], ("gap",), "abs(win code - win qa)")):
        for name, color in zip(PROXIES, ("C0", "C1", "C2")):
            for key, ls in zip(keys, ("-", "--")):
                start = 0.0 if key == "gap" else 0.5
                ax.plot(kls, [start] + [np.nan if v is None else v for v in tab[name][key]], ls=ls, marker="o", color=color,
                        label=f"{NAMES[name]}" + (f" / {key[4:]}" if key != "gap" else ""))
        ax.set_title(f"PPO: {title}\n(mean over worlds and seeds)", fontsize=10)
        ax.set_xlabel("KL(policy || SFT)")
        ax.legend(fontsize=8)
    return save_figure(fig, os.path.join(out, "am_vs_bt.png"))


def report(cfg: Config, setups: Dict, analysis: Dict, fig: str, timing: Dict) -> str:
    kls = cfg.compare_kls
    tab = analysis["table"]
    agree = {t: np.mean([s["label_agreement_with_gold"]["train"][t] for s in setups.values()]) for t in TASKS}
    lines = [f"# A Bradley-Terry RM vs an Advantage Model at matched accuracy, and PPO with each ({cfg.mode} mode)", "",
             f"- worlds {list(cfg.worlds)} x replicate seeds {list(cfg.seeds)} (seed s: proxy initialisation and pair "
             "order, PPO seed); two tasks, label temperature per task "
             f"{cfg.temperature} (training labels agreeing with the gold order: "
             + ", ".join(f"{t} {v:.2f}" for t, v in agree.items()) + ")",
             f"- proxies: BT, AM (`AdvantageModelLoss({cfg.am})`), AM with task_coef 0; same pairs and initialisation; "
             f"{cfg.rm_epochs} epochs, a checkpoint after each",
             "- matching rule (`match_checkpoints`): target = the lowest of the three proxies' best validation accuracies; "
             "each proxy takes its checkpoint closest to the target (earliest on ties); ECE / accuracy then on separate "
             "test pairs (test prompts)",
             f"- PPO: each matched proxy up the KL staircase {list(cfg.kl_targets)} ({cfg.ppo.get('steps')} steps, "
             f"{cfg.ppo.get('rollout_prompts')} prompts per rollout), evaluated at every stair on the eval prompts; "
             f"compared at KL {list(kls)} (read between stairs; the SFT policy is the KL-0 point)",
             f"- CPU time of all jobs {timing['jobs_cpu_seconds'] / 60:.1f} min (setup {timing['setup_cpu_seconds'] / 60:.1f}, "
             f"proxies {timing['proxies_cpu_seconds'] / 60:.1f}, PPO {timing['runs_cpu_seconds'] / 60:.1f}); wall time of "
             f"the invocation that wrote this report {timing['wall_seconds'] / 60:.1f} min ({cfg.workers} worker(s))", "",
             "## Claims of paper 2 (Advantage Model)", ""]
    static = [c for c in analysis["comparisons"] if c["per_target"][0]["target"] is None]
    lines += paper2.claims_markdown(analysis["claims"], static, ["value"])
    lines += ["", "PPO comparisons at the compared KLs:", ""]
    lines += paper2.md_table(["claim", "comparison"] + [f"KL {x:g}" for x in kls] + ["verdict"],
                             [[c["claim"], c["label"]] + [paper2.interval(p) for p in c["per_target"]] + [c["verdict"]]
                              for c in analysis["comparisons"] if c not in static])
    if len(cfg.worlds) > 1:
        lines += ["", "Per world (mean paired difference over seeds and prompts / pairs) of the claims' comparisons:", ""]
        rows = [[c["claim"], c["label"], w, " / ".join("—" if v is None else f"{v:+.3f}" for v in vals)]
                for c in analysis["comparisons"] if c["claim"] != "info" for w, vals in c["per_world"].items()]
        lines += paper2.md_table(["claim", "comparison", "world", "value (PPO rows: at each compared KL)"], rows)
    lines += ["", "## Proxies at their matched checkpoints (means over worlds and seeds)", "",
              "Accuracy and ECE on the test pairs (vs their labels); score mean / std per task on SFT samples of the "
              "eval prompts; last epoch: the same proxies trained to the end.", ""]
    lines += paper2.md_table(
        ["proxy", "epoch", "val accuracy", "test accuracy", "test ECE", "code mean", "code std", "qa mean", "qa std",
         "test accuracy / ECE at last epoch"],
        [[NAMES[k], f"{t['epoch']:.1f}", f"{t['val_accuracy']:.3f}", f"{t['test_accuracy']:.3f}", f"{t['test_ece']:.3f}",
          f"{t['code_mean']:.2f}", f"{t['code_std']:.2f}", f"{t['qa_mean']:.2f}", f"{t['qa_std']:.2f}",
          f"{t['test_accuracy_at_last_epoch']:.3f} / {t['ece_at_last_epoch']:.3f}"] for k, t in tab.items()])
    lines += ["", "## PPO: gold win rate vs SFT at the compared KLs (means over worlds and seeds)", ""]
    lines += paper2.md_table(["proxy", "prompts"] + [f"KL {x:g}" for x in kls],
                             [[NAMES[k], sub] + ["—" if v is None else f"{v:.3f}" for v in tab[k][key]]
                              for k in PROXIES for sub, key in (("all", "win"), ("code", "win_code"), ("qa", "win_qa"),
                                                                ("abs(code - qa)", "gap"))])
    lines += ["", f"![proxies and PPO]({fig})", "",
              "Caveats: synthetic worlds; the AM formulation is the project's (`openrlhf_lsc/am_loss.py`), the paper's "
              "equations are not public; matching is as close as per-epoch checkpoints and a validation set of this "
              "size allow (the test-accuracy row shows what is left); ECE and the task gap exist once per proxy or run, "
              "so their intervals resample worlds and seeds only; PPO is evaluated on all eval prompts (validation and "
              "test prompts: only the proxies' checkpoints were chosen on the validation prompts' pairs).", ""]
    return "\n".join(lines)


def run(out: str, cfg: Config) -> Dict:
    """Run (or resume) the experiment in `out`; write am_vs_bt.{md,png,json}; return the results."""
    start, cfg_json, setups = paper2.start(out, cfg, setup_world, "am_vs_bt run")
    exists = lambda *parts: os.path.exists(os.path.join(out, *parts))  # noqa: E731
    keys = [(w, s) for w in cfg.worlds for s in cfg.seeds]
    proxies = dict(zip(keys, paper2.run_jobs(train_proxies, [(out, cfg, w, s) for w, s in keys], cfg.workers,
                                             "proxies (world x seed)",
                                             lambda j: exists(f"world{j[2]}", "proxies", f"s{j[3]}.json"))))
    run_keys = [(w, p, s) for w in cfg.worlds for s in cfg.seeds for p in PROXIES]
    runs = dict(zip(run_keys, paper2.run_jobs(run_one, [(out, cfg, *k) for k in run_keys], cfg.workers, "PPO runs",
                                              lambda j: os.path.exists(run_path(out, j[2], j[3], j[4])))))
    analysis = analyse(cfg, setups, proxies, runs)
    timing = {"setup_cpu_seconds": sum(s["cpu_seconds"] for s in setups.values()),
              "proxies_cpu_seconds": sum(p["cpu_seconds"] for p in proxies.values()),
              "runs_cpu_seconds": sum(r["cpu_seconds"] for r in runs.values()), "wall_seconds": time.time() - start}
    timing["jobs_cpu_seconds"] = timing["setup_cpu_seconds"] + timing["proxies_cpu_seconds"] + timing["runs_cpu_seconds"]
    fig = plot(out, cfg, proxies, analysis)
    text = report(cfg, setups, analysis, fig, timing)
    write_text(os.path.join(out, "am_vs_bt.md"), text)
    results = {"config": cfg_json, **analysis, "timing": timing, "figures": [fig],
               "label_agreement_with_gold": {str(w): s["label_agreement_with_gold"] for w, s in setups.items()},
               "proxies": [{k: v for k, v in p.items() if k != "proxies"} | {"proxies": {
                   n: {k: v for k, v in q.items() if k not in ("sft_pool", "test_correct")} for n, q in p["proxies"].items()}}
                   for p in proxies.values()],
               "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs.values()]}
    write_json(os.path.join(out, "am_vs_bt.json"), results)
    return results


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.lab.am_vs_bt", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it (same command)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    mode.add_argument("--full", action="store_true", help="5 worlds x 3 seeds (the report's intervals and verdicts)")
    p.add_argument("--workers", type=int, default=None, help="processes side by side (default: the mode's)")
    args = p.parse_args(argv)
    cfg = PRESETS["smoke" if args.smoke else "full" if args.full else "default"]
    if args.workers is not None:
        if args.workers < 1:
            raise SystemExit(f"error: --workers must be >= 1, got {args.workers}")
        cfg = dataclasses.replace(cfg, workers=args.workers)
    try:
        results = run(args.out, cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    with open(os.path.join(args.out, "am_vs_bt.md")) as f:
        print(f.read())
    print(f"finished in {results['timing']['wall_seconds'] / 60:.1f} min: {args.out}/am_vs_bt.md")


if __name__ == "__main__":
    main()
