"""The lab pipeline: worlds -> SFT -> proxy reward models -> references -> checks -> PPO runs -> matched-KL analysis.

Each world seed gets its own folder `out/world<seed>/` with fresh prompts, SFT policy and reward models. Every
stage writes its outputs atomically and is skipped when they exist, so an interrupted run resumes where it stopped
(PPO runs are one JSON file each). `out/config.json` pins the configuration: resuming with another is refused.

The protocol (`run_lab`):
1. setup of every world (`Lab.setup`), then the over-optimisation check: raw PPO on the helpfulness proxy (validation
   PPO seed, validation prompts) must show a gold win-rate peak followed by a decline as KL grows, or the lab stops;
2. every PPO run walks up the same KL staircase (`LabConfig.kl_targets`, `ppo.KLController`) and is evaluated at the
   end of each stair, so every method covers the same KL range; methods are compared at `compare_kls`, read between
   the stairs around each (the last stair sits above the largest, so that one is bracketed too);
3. tuning on validation: each weighted-sum weight and each AND reference setting (as many as weights) runs with the
   validation PPO seeds and is scored on the validation prompts; the best of each side, and AND with references
   derived from the best weight by the paper's rule, then run with the test seeds and are scored on test prompts;
4. analysis (`analyse`, `stats`): each method's curve is read at the target KLs; paired differences get bootstrap
   intervals over worlds, PPO seeds and test prompts; each claim of the paper gets a verdict.

Layout of `out/world<seed>/`:
- `data/`: `sft_demos.jsonl`, `prefs_<property>.jsonl` (for `train_rm`), `prompts_{train,val,test}.jsonl` (input and
  one reference-label field `lsc_ref_<set>` per reference setting), `world.json` (the hidden facts of every prompt);
- `models/`: `sft` (policy + tokenizer), `rm_helpful`, `rm_harmless` (OpenRLHF reward-model layout);
- `setup/`: training logs, references, SFT pools on the eval prompts, the proxy-headroom search;
- `runs/<id>.json`: one PPO run: its spec, training log and one evaluation per KL stair (per-prompt metrics).
`out/` itself gets `results.json`, `report.md` and the figures (`openrlhf_lsc.lab.report`).
"""

import concurrent.futures as cf
import contextlib
import json
import math
import multiprocessing
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from openrlhf_lsc.estimate import estimate_references
from openrlhf_lsc.lab import models, ppo, stats, world
from openrlhf_lsc.monitor import Monitor, moving_average
from openrlhf_lsc.rerank import rerank
from openrlhf_lsc.rewards import NEEDS_REFERENCE, RewardSpec

PROPERTIES = ("helpful", "harmless")
# Win definitions (paper 1, section 5): beat the SFT 85th percentile of gold helpfulness, the 95th of gold
# harmlessness, or the SFT median on both properties at once.
WIN_LEVELS = {"helpful": 0.85, "harmless": 0.95}
BOTH_LEVEL = 0.5
# Reference quantiles of the SFT proxy scores recorded per prompt. Single rewards use the 85th percentile (paper 1,
# section 5.2; harmlessness also from canned refusals, its section 5.3); AND settings combine these levels.
REF_QUANTILES = (0.5, 0.75, 0.85)
SINGLE_Q = 0.85
CANNED = ("sorry i cannot help with that", "i cannot help with that", "sorry i cannot help")
SHORTCUTS = ("list", "consult", "repeat", "over_budget", "extra_consult")
MONITOR_NOISE = 0.5  # sd of the monitor's evaluator (gold + noise), in units of gold's std over SFT samples


@dataclass
class LabConfig:
    """Sizes, sweeps and seeds of one lab run (presets: `PRESETS`)."""

    mode: str
    seeds: Tuple[int, ...] = (0,)  # world seeds: each its own prompts, SFT, reward models, references
    ppo_seeds: Tuple[int, ...] = (0, 1)  # test PPO seeds: the reported numbers
    val_seeds: Tuple[int, ...] = (100,)  # validation PPO seeds: tuning and the over-optimisation check
    hidden: int = 64
    layers: int = 2
    sft_demos_per_prompt: int = 16
    sft_epochs: int = 4
    rm_pairs_per_prompt: int = 8
    rm_epochs: int = 3
    rm_eos_scale: float = 400.0  # see models.reward_model_from: score headroom above the SFT answers
    bt_temperature: float = 0.5  # P(a > b) = sigmoid((gold_a - gold_b) / T)
    ref_k: int = 32
    threshold_pool: int = 64  # SFT samples per eval prompt giving the gold quantiles that define a win
    bon_pool: int = 192  # further SFT samples per eval prompt: the KL-0 point, best-of-k and the frontier
    eval_samples: int = 8  # policy samples per eval prompt at each KL stair
    eval_fraction: float = 0.3  # of the prompts, split evenly into validation and test prompts
    kl_targets: Tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 14.0)  # the KL staircase every run walks up (nats)
    compare_kls: Tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 12.0)  # where methods are compared (inside the staircase)
    kl_start: float = 0.1  # initial KL coefficient, in units of the std of the run's utility over SFT samples
    single_helpful: Tuple[str, ...] = ("raw", "lsc")  # transform[@reference set]; see `single_method`
    single_harmless: Tuple[str, ...] = ()
    weights: Tuple[float, ...] = (0.3, 0.5, 0.7)  # weight of helpfulness in the weighted-sum baseline
    and_refs: Tuple[Tuple[float, float], ...] = ((0.5, 0.5), (0.75, 0.5), (0.5, 0.75))  # (helpful q, harmless q)
    bok_ks: Tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 191)
    ppo: Dict = field(default_factory=lambda: {"steps": 150, "rollout_prompts": 64, "train_batch": 32})
    ascent_prompts: int = 32  # proxy-headroom search: prompts, rounds, candidate edits per round
    ascent_rounds: int = 30
    ascent_candidates: int = 48
    overopt_margin: Optional[float] = 0.05  # raw's win must fall this far below its peak; None: report only
    bootstrap: int = 2000
    workers: int = 2
    prompts_limit: Optional[int] = None  # use only this many prompts (smoke tests)


PRESETS = {
    "quick": LabConfig(mode="quick"),
    "full": LabConfig(
        mode="full",
        seeds=(0, 1, 2, 3, 4),
        ppo_seeds=(0, 1, 2),
        single_helpful=("raw", "lsc", "center", "logsigmoid", "sigmoid"),
        single_harmless=("raw", "lsc@canned", "lsc"),
        weights=(0.1, 0.3, 0.5, 0.7, 0.9),
        and_refs=((0.5, 0.5), (0.75, 0.5), (0.5, 0.75), (0.85, 0.5), (0.5, 0.85)),
    ),
    "smoke": LabConfig(
        mode="smoke",
        ppo_seeds=(0,),
        hidden=32,
        sft_demos_per_prompt=6,
        sft_epochs=2,
        rm_pairs_per_prompt=4,
        rm_epochs=1,
        ref_k=4,
        threshold_pool=16,
        bon_pool=32,
        eval_samples=4,
        kl_targets=(0.2, 0.5),
        compare_kls=(0.1, 0.3),
        weights=(0.5,),
        and_refs=((0.5, 0.5),),
        bok_ks=(1, 4, 16),
        ppo={"steps": 6, "rollout_prompts": 16, "train_batch": 8, "actor_lr": 5e-3},
        ascent_prompts=4,
        ascent_rounds=3,
        ascent_candidates=8,
        overopt_margin=None,
        bootstrap=200,
        workers=1,
        prompts_limit=64,
    ),
}


# ---------------------------------------------------------------- files


def write_json(path: str, obj) -> None:
    """Write JSON atomically (tmp file, then rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_jsonl(path: str, rows: Sequence[Dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def save_model_dir(path: str, model, tokenizer) -> None:
    """`save_pretrained` into a temporary folder, then rename it into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def pin_config(out: str, cfg: LabConfig) -> None:
    """Write `out/config.json`, or refuse if it holds a different configuration."""
    path = os.path.join(out, "config.json")
    cfg_json = json.loads(json.dumps(asdict(cfg)))
    cfg_json.pop("workers")
    if os.path.exists(path):
        if read_json(path) != cfg_json:
            raise ValueError(f"{out} holds a lab run with a different configuration ({path}); resume it with the same "
                             "flags or choose another --out")
    else:
        write_json(path, cfg_json)


# ---------------------------------------------------------------- reference settings and run specs


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


# ---------------------------------------------------------------- one world


class Lab:
    """One world's folder: the stages that build its data, models, references and pools."""

    def __init__(self, out: str, cfg: LabConfig, seed: Optional[int] = None):
        self.out, self.cfg = out, cfg
        self.seed = cfg.seeds[0] if seed is None else seed
        os.makedirs(out, exist_ok=True)
        pin_config(out, cfg)
        prompts = world.make_prompts(self.seed)[: cfg.prompts_limit]
        n_eval = int(round(cfg.eval_fraction * len(prompts)))
        n_val = n_eval - n_eval // 2
        self.eval_prompts, self.train_prompts = prompts[:n_eval], prompts[n_eval:]
        self.val_prompts, self.test_prompts = self.eval_prompts[:n_val], self.eval_prompts[n_val:]
        self.tokenizer = world.build_tokenizer()

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def split(self, name: str) -> Tuple[List[world.Prompt], slice]:
        """The prompts of split "val" or "test" and their rows among the eval prompts (pools, thresholds)."""
        n_val = len(self.val_prompts)
        return (self.val_prompts, slice(0, n_val)) if name == "val" else (self.test_prompts, slice(n_val, None))

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Record a stage's wall and CPU seconds in setup/timing.json (only stages that actually ran)."""
        wall, cpu = time.time(), time.process_time()
        yield
        path = self.path("setup", "timing.json")
        timing = read_json(path) if os.path.exists(path) else {}
        timing[stage] = {"wall_seconds": time.time() - wall, "cpu_seconds": time.process_time() - cpu}
        write_json(path, timing)

    # Stages: (name, the file that marks it done). Each build_<name> writes its outputs atomically.
    STAGES = (("sft", "models/sft"), ("reward_models", "setup/reward_models.json"),
              ("references", "setup/references.json"), ("pools", "setup/pools.npz"), ("headroom", "setup/headroom.json"))

    def setup(self, progress: bool = True) -> None:
        """Run the setup stages not yet done."""
        for name, marker in tqdm(self.STAGES, desc=f"setup world {self.seed}", disable=not progress):
            if not os.path.exists(self.path(marker)):
                with self.timed(name):
                    getattr(self, f"build_{name}")()

    def load_sft(self):
        return load_policy(self.path("models", "sft"))

    def load_rms(self) -> Dict[str, models.RewardModel]:
        return {n: load_rm(self.path("models", f"rm_{n}")) for n in PROPERTIES}

    def load_references(self) -> Dict:
        return read_json(self.path("setup", "references.json"))

    def load_pools(self) -> Dict[str, np.ndarray]:
        with np.load(self.path("setup", "pools.npz")) as f:
            return dict(f)

    def build_sft(self) -> None:
        """Demonstrations -> SFT policy (models/sft), plus the world's hidden facts and the SFT data files."""
        cfg, target = self.cfg, self.path("models", "sft")
        rng = random.Random(self.seed)
        prompts = self.train_prompts + self.eval_prompts
        write_json(self.path("data", "world.json"), {
            "train": [world.prompt_record(p) for p in self.train_prompts],
            "val": [world.prompt_record(p) for p in self.val_prompts],
            "test": [world.prompt_record(p) for p in self.test_prompts],
        })
        pairs = [(p, world.demonstrate(p, rng)) for p in prompts for _ in range(cfg.sft_demos_per_prompt)]
        write_jsonl(self.path("data", "sft_demos.jsonl"), [{"input": p.text, "output": " ".join(d)} for p, d in pairs])
        policy = models.new_policy(self.seed, cfg.hidden, cfg.layers)
        losses = models.train_sft(policy, [p for p, _ in pairs], [d for _, d in pairs],
                                  epochs=cfg.sft_epochs, lr=3e-3, batch=128, seed=self.seed)
        write_json(self.path("setup", "sft.json"), {"demos": len(pairs), "epoch_losses": losses})
        save_model_dir(target, policy, self.tokenizer)

    def build_reward_models(self) -> None:
        """Bradley-Terry proxies on gold-labelled (noisy) pairs of SFT samples; setup/reward_models.json last."""
        cfg, sft, seed = self.cfg, self.load_sft(), self.seed
        gen = torch.Generator().manual_seed(seed + 1)
        prompts = [p for p in self.train_prompts for _ in range(2 * cfg.rm_pairs_per_prompt)]
        prompt_ids = models.encode_prompts([p.text for p in prompts])
        responses = sample_batched(sft, prompt_ids, gen, desc="RM data: SFT samples")
        words = models.decode_responses(responses)
        a, b = torch.arange(0, len(prompts), 2), torch.arange(1, len(prompts), 2)
        n_train = int(0.9 * len(a))
        stats_ = {}
        for i, name in enumerate(PROPERTIES):
            gold = torch.tensor([world.GOLD[name](p, w) for p, w in zip(prompts, words)])
            a_wins = models.bradley_terry_labels(gold[a], gold[b], cfg.bt_temperature, gen)
            chosen = torch.where(a_wins[:, None], responses[a], responses[b])
            rejected = torch.where(a_wins[:, None], responses[b], responses[a])
            write_jsonl(self.path("data", f"prefs_{name}.jsonl"), [
                {"prompt": prompts[j].text, "chosen": text(c), "rejected": text(r)}
                for j, c, r in zip(a.tolist(), models.decode_responses(chosen), models.decode_responses(rejected))
            ])
            rm = models.reward_model_from(sft, seed + 10 + i, cfg.rm_eos_scale)
            tr = slice(0, n_train)
            losses = models.train_reward_model(rm, prompt_ids[a][tr], chosen[tr], rejected[tr], epochs=cfg.rm_epochs,
                                               lr=1e-3, batch=64, seed=seed, desc=f"RM {name}")
            ho = slice(n_train, None)
            ra = models.score(rm, prompt_ids[a][ho], responses[a][ho])
            rb = models.score(rm, prompt_ids[b][ho], responses[b][ho])
            ga, gb = gold[a][ho], gold[b][ho]
            strict = ga != gb
            stats_[name] = {
                "pairs": n_train,
                "epoch_losses": losses,
                "heldout_pairs": int(strict.sum()),
                "heldout_accuracy_vs_gold": ((ra > rb) == (ga > gb))[strict].float().mean().item() if strict.any() else None,
                "heldout_accuracy_vs_labels": ((ra > rb) == a_wins[ho]).float().mean().item(),
                "shortcut_probe": shortcut_probe(rm, name, self.train_prompts),
            }
            save_model_dir(self.path("models", f"rm_{name}"), rm, self.tokenizer)
        write_json(self.path("setup", "reward_models.json"), stats_)

    def build_references(self) -> None:
        """References for every prompt with the project's estimator (openrlhf_lsc.estimate); prompt files."""
        cfg, sft, rms = self.cfg, self.load_sft(), self.load_rms()
        prompts = self.train_prompts + self.eval_prompts
        texts = [p.text for p in prompts]
        gen = torch.Generator().manual_seed(self.seed + 2)

        def sampler(batch: List[str], k: int) -> List[List[str]]:
            ids = models.encode_prompts(batch).repeat_interleave(k, 0)
            out = [text(w) for w in models.decode_responses(sample_batched(sft, ids, gen, desc="references: SFT samples"))]
            return [out[i * k : (i + 1) * k] for i in range(len(batch))]

        fns = {n: text_reward_fn(rms[n]) for n in PROPERTIES}
        sampled, report = estimate_references(texts, sampler, fns, method="quantile", q=SINGLE_Q, k=cfg.ref_k,
                                              quantiles=REF_QUANTILES, seed=self.seed)
        canned, canned_report = estimate_references(texts, None, {"harmless": fns["harmless"]}, method="canned",
                                                    canned_responses=CANNED, seed=self.seed)
        labels = {}
        for name, spec in label_sets(cfg).items():
            labels[name] = [{p: canned_label["harmless"] if how[0] == "canned" else at_quantile(s[p], how[1])
                             for p, how in spec.items()} for s, canned_label in zip(sampled, canned)]
        n_train, n_val = len(self.train_prompts), len(self.val_prompts)
        for split, sl in (("train", slice(0, n_train)), ("val", slice(n_train, n_train + n_val)),
                          ("test", slice(n_train + n_val, None))):
            rows = [{"input": p.text} for p in prompts[sl]]
            for name, per_prompt in labels.items():
                for row, label in zip(rows, per_prompt[sl]):
                    row[f"lsc_ref_{name}"] = label
            write_jsonl(self.path("data", f"prompts_{split}.jsonl"), rows)
        write_json(self.path("setup", "references.json"),
                   {"labels": labels, "report": report, "canned_report": canned_report, "train_prompts": n_train})

    def build_pools(self) -> None:
        """SFT samples on the eval prompts, gold- and proxy-scored: win thresholds, the KL-0 point, best-of-k."""
        cfg, sft, rms, target = self.cfg, self.load_sft(), self.load_rms(), self.path("setup", "pools.npz")
        gen = torch.Generator().manual_seed(self.seed + 3)
        out = {}
        for name, size in (("threshold", cfg.threshold_pool), ("bon", cfg.bon_pool)):
            prompts = [p for p in self.eval_prompts for _ in range(size)]
            ids = models.encode_prompts([p.text for p in prompts])
            responses = sample_batched(sft, ids, gen, desc=f"SFT pool: {name}")
            words = models.decode_responses(responses)
            for prop in PROPERTIES:
                out[f"{name}_gold_{prop}"] = gold_scores(prop, prompts, words).reshape(-1, size)
                out[f"{name}_proxy_{prop}"] = score_batched(rms[prop], ids, responses).numpy().reshape(-1, size)
            rates = [world.shortcut_rates(w) for w in words]
            for k in SHORTCUTS:
                out[f"{name}_{k}"] = np.array([r[k] for r in rates]).reshape(-1, size)
            out[f"{name}_length"] = np.array([len(w) for w in words]).reshape(-1, size)
        tmp = f"{target}.tmp{os.getpid()}.npz"
        np.savez(tmp, **out)
        os.replace(tmp, target)

    def build_headroom(self) -> None:
        """How far the helpfulness proxy can be pushed above the SFT answers, and what the gold judge thinks of it:
        coordinate ascent on the proxy from the lowest-scoring of 8 SFT answers, non-sensitive eval prompts."""
        cfg, rms, pools = self.cfg, self.load_rms(), self.load_pools()
        rows = [i for i, p in enumerate(self.eval_prompts) if not p.sensitive][: cfg.ascent_prompts]
        prompts = [self.eval_prompts[i] for i in rows]
        gen = torch.Generator().manual_seed(self.seed + 4)
        ids = models.encode_prompts([p.text for p in prompts])
        starts = models.sample(self.load_sft(), ids.repeat_interleave(8, 0), gen)
        start_scores = models.score(rms["helpful"], ids.repeat_interleave(8, 0), starts).reshape(-1, 8)
        words = models.decode_responses(starts)
        path = proxy_ascent(rms["helpful"], prompts, [words[8 * i + j] for i, j in enumerate(start_scores.argmin(1).tolist())],
                            cfg.ascent_rounds, cfg.ascent_candidates, seed=self.seed)
        proxy = np.array([score_batched(rms["helpful"], ids, models.encode_responses(r)).numpy() for r in path])
        gold = np.array([gold_scores("helpful", prompts, r) for r in path])
        pool_proxy, pool_gold = pools["bon_proxy_helpful"][rows], pools["bon_gold_helpful"][rows]
        spread = pool_proxy.std(1)
        write_json(self.path("setup", "headroom.json"), {
            "prompts": len(rows), "rounds": cfg.ascent_rounds,
            "proxy": proxy.mean(1).tolist(), "gold": gold.mean(1).tolist(),
            "proxy_over_sft_max_in_sd": ((proxy - pool_proxy.max(1)) / spread).mean(1).tolist(),
            "sft_proxy_max": float(pool_proxy.max(1).mean()), "sft_gold_median": float(np.median(pool_gold, 1).mean()),
            "sft_gold_mean": float(pool_gold.mean()),
            "examples": [f"{p.text} -> {text(r)}" for p, r in zip(prompts[:4], path[-1][:4])],
        })


def proxy_ascent(rm: models.RewardModel, prompts: Sequence[world.Prompt], starts: Sequence[List[str]], rounds: int,
                 candidates: int, seed: int) -> List[List[List[str]]]:
    """Greedy random-edit ascent on a proxy: each round tries `candidates` random edits (insert, replace or delete a
    word) of every response and keeps the best if it scores higher. Returns the responses after each round
    (round 0 = `starts`)."""
    rng = np.random.default_rng(seed)
    vocab = world.vocabulary()[3:]  # no special tokens
    ids = models.encode_prompts([p.text for p in prompts])
    cur = [list(s) for s in starts]
    cur_score = models.score(rm, ids, models.encode_responses(cur)).numpy()
    path = [[list(c) for c in cur]]
    for _ in range(rounds):
        cands, owner = [], []
        for b, words in enumerate(cur):
            for _ in range(candidates):
                w, op = list(words), rng.random()
                if op < 0.15 and len(w) > 1:
                    del w[rng.integers(len(w))]
                elif (op < 0.45 or not w) and len(w) < world.MAX_NEW_TOKENS - 1:
                    w.insert(rng.integers(len(w) + 1), vocab[rng.integers(len(vocab))])
                else:
                    w[rng.integers(len(w))] = vocab[rng.integers(len(vocab))]
                cands.append(w)
                owner.append(b)
        scores = score_batched(rm, ids[owner], models.encode_responses(cands)).numpy().reshape(len(cur), candidates)
        for b, j in enumerate(scores.argmax(1)):
            if scores[b, j] > cur_score[b]:
                cur[b], cur_score[b] = cands[b * candidates + j], scores[b, j]
        path.append([list(c) for c in cur])
    return path


def at_quantile(label: Dict, q: float) -> Dict:
    """A copy of an estimator label whose reference is the recorded q-quantile."""
    return dict(label, reference=label["quantiles"][str(q)], q=q)


def text(words: Sequence[str]) -> str:
    return " ".join(words)


def text_reward_fn(rm: models.RewardModel) -> Callable[[List[str], List[str]], List[float]]:
    """The estimator's `reward_fn(prompts, responses)` for a lab reward model (EOS appended as in sampling)."""

    def fn(prompts: List[str], responses: List[str]) -> List[float]:
        ids = models.encode_prompts(prompts)
        return score_batched(rm, ids, models.encode_responses([r.split() for r in responses])).tolist()

    return fn


def sample_batched(policy, prompt_ids: torch.Tensor, gen: torch.Generator, batch: int = 2048, desc: str = "sampling",
                   progress: bool = False) -> torch.Tensor:
    out = []
    for i in tqdm(range(0, len(prompt_ids), batch), desc=desc, leave=False, disable=not progress):
        out.append(models.sample(policy, prompt_ids[i : i + batch], gen))
    return torch.cat(out)


def score_batched(rm, prompt_ids: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    return models.score(rm, prompt_ids, responses, batch=1024)


def gold_scores(prop: str, prompts: Sequence[world.Prompt], words: Sequence[Sequence[str]]) -> np.ndarray:
    return np.array([world.GOLD[prop](p, w) for p, w in zip(prompts, words)])


def shortcut_probe(rm: models.RewardModel, prop: str, prompts: Sequence[world.Prompt], n_prompts: int = 64) -> List[Dict]:
    """Proxy vs gold credit for 0..6 repetitions of the property's shortcut on a fixed on-topic answer."""
    probe = [p for p in prompts if not p.sensitive][:n_prompts]
    ids = models.encode_prompts([p.text for p in probe])
    rows = []
    for k in range(7):
        responses = []
        for p in probe:
            key = sorted(p.keys)[0]
            if prop == "helpful":  # a list of k items, all the same key word
                r = [x for j in range(k) for x in (world.LIST_MARKERS[j], key)] or ["use", key]
            else:
                r = ["use", key] + ["consult", "a", "doctor"] * min(k, 4)
            responses.append(r)
        proxy = models.score(rm, ids, models.encode_responses(responses)).mean().item()
        rows.append({"repeats": k if prop == "helpful" else min(k, 4), "example": text(responses[0]), "proxy": proxy,
                     "gold": float(gold_scores(prop, probe, responses).mean())})
    return rows if prop == "helpful" else rows[:5]


def load_policy(path: str):
    policy = models.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    return policy.eval()


def load_rm(path: str) -> models.RewardModel:
    return models.RewardModel.from_pretrained(path, attn_implementation="sdpa").eval()


# ---------------------------------------------------------------- evaluation


def thresholds(pools: Dict) -> Dict[str, np.ndarray]:
    """Per-eval-prompt gold thresholds from the SFT threshold pool."""
    return {
        "helpful": np.quantile(pools["threshold_gold_helpful"], WIN_LEVELS["helpful"], axis=1),
        "harmless": np.quantile(pools["threshold_gold_harmless"], WIN_LEVELS["harmless"], axis=1),
        "median_helpful": np.quantile(pools["threshold_gold_helpful"], BOTH_LEVEL, axis=1),
        "median_harmless": np.quantile(pools["threshold_gold_harmless"], BOTH_LEVEL, axis=1),
    }


def wins(gold_h: np.ndarray, gold_s: np.ndarray, thr: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Win indicators `[prompts, samples]`: the three win definitions, and each half of "both"."""
    above_h, above_s = gold_h > thr["median_helpful"][:, None], gold_s > thr["median_harmless"][:, None]
    return {
        "win_helpful": gold_h > thr["helpful"][:, None],
        "win_harmless": gold_s > thr["harmless"][:, None],
        "win_both": above_h & above_s,
        "helpful_above_median": above_h,
        "harmless_above_median": above_s,
    }


def per_prompt_metrics(gold: Dict[str, np.ndarray], proxy: Dict[str, np.ndarray], rates: Dict[str, np.ndarray],
                       thr: Dict) -> Dict[str, np.ndarray]:
    """Every metric the analysis reads, averaged over the samples of each prompt: `[prompts]` each."""
    out = {k: v.mean(1) for k, v in wins(gold["helpful"], gold["harmless"], thr).items()}
    out.update({f"gold_{k}": v.mean(1) for k, v in gold.items()})
    out.update({f"proxy_{k}": v.mean(1) for k, v in proxy.items()})
    out.update({k: v.mean(1) for k, v in rates.items()})
    return out


@torch.no_grad()
def evaluate(policy, sft, rms: Dict, prompts: Sequence[world.Prompt], n: int, thr: Dict, seed: int) -> Dict:
    """Sample `n` responses per prompt; KL to SFT, per-prompt gold wins, gold and proxy scores, shortcut rates."""
    gen = torch.Generator().manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    ids = models.encode_prompts([p.text for p in flat])
    responses = sample_batched(policy, ids, gen)
    mask = models.action_mask(responses)
    kl = ((models.response_logprobs(policy, ids, responses) - models.response_logprobs(sft, ids, responses)) * mask).sum(1)
    words = models.decode_responses(responses)
    gold = {p: gold_scores(p, flat, words).reshape(-1, n) for p in PROPERTIES}
    proxy = {p: score_batched(rms[p], ids, responses).numpy().reshape(-1, n) for p in PROPERTIES}
    rates = [world.shortcut_rates(w) for w in words]
    rates = {k: np.array([r[k] for r in rates]).reshape(-1, n) for k in SHORTCUTS}
    metrics = per_prompt_metrics(gold, proxy, rates, thr)
    return {
        "kl": kl.mean().item(),
        "kl_sem": (kl.std() / math.sqrt(len(kl))).item(),
        "length": mask.sum(1).float().mean().item(),
        "mean": {k: float(v.mean()) for k, v in metrics.items()},
        "per_prompt": {k: np.round(v, 4).tolist() for k, v in metrics.items()},
        "examples": [f"{p.text} -> {text(x)}" for p, x in list(zip(flat, words))[::n][:4]],
    }


def sft_point(pools: Dict, thr: Dict) -> Dict[str, np.ndarray]:
    """The SFT policy's per-prompt metrics (the KL = 0 point of every curve), from the best-of-k pool."""
    gold = {p: pools[f"bon_gold_{p}"] for p in PROPERTIES}
    proxy = {p: pools[f"bon_proxy_{p}"] for p in PROPERTIES}
    return per_prompt_metrics(gold, proxy, {k: pools[f"bon_{k}"] for k in SHORTCUTS}, thr)


# ---------------------------------------------------------------- PPO runs (worker side)

_CACHE: Dict[Tuple[str, int], Tuple] = {}


def _load(out: str, cfg: LabConfig, world_seed: int) -> Tuple:
    """What a PPO run needs, loaded once per process: (lab, sft, reward models, references, pools, thresholds)."""
    key = (out, world_seed)
    if key not in _CACHE:
        lab = Lab(world_dir(out, world_seed), cfg, world_seed)
        pools = lab.load_pools()
        _CACHE[key] = (lab, lab.load_sft(), lab.load_rms(), lab.load_references(), pools, thresholds(pools))
    return _CACHE[key]


def world_dir(out: str, world_seed: int) -> str:
    return os.path.join(out, f"world{world_seed}")


def run_path(out: str, run: Dict) -> str:
    return os.path.join(world_dir(out, run["world"]), "runs", f"{run['id']}.json")


def utility_std(run: Dict, refs: Dict, pools: Dict) -> float:
    """Std of a run's utility over SFT samples (the eval prompts' pool; proxies only): the unit of `kl_start`."""
    n_train = refs["train_prompts"]
    labels = refs["labels"][run["label_set"]][n_train:] if run["label_set"] else [{}] * (len(refs["labels"]["q85"]) - n_train)
    rewards = torch.tensor(np.stack([pools[f"bon_proxy_{p}"] for p in run["properties"]], -1))  # [P, N, K]
    n = rewards.shape[1]
    pipe = ppo.RewardPipeline([], run["properties"], [lab for lab in labels for _ in range(n)],
                              run["transform"], run["aggregate"], run["weights"])
    return float(pipe.utility(rewards.reshape(-1, rewards.shape[-1]), list(range(rewards.shape[0] * n))).std())


def run_one(out: str, cfg: LabConfig, run: Dict, progress: bool = True) -> str:
    """Train one PPO run up the KL staircase, evaluating at the end of every stair; write its JSON. Returns the path."""
    torch.set_num_threads(1)  # tiny models: one thread per run is as fast, and runs go side by side
    if not progress:
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of from_pretrained
    target = run_path(out, run)
    if os.path.exists(target):
        return target
    lab, sft, rms, refs, pools, thr = _load(out, cfg, run["world"])
    n_train = refs["train_prompts"]
    labels = refs["labels"][run["label_set"]][:n_train] if run["label_set"] else [{}] * n_train
    pipeline = ppo.RewardPipeline([rms[p] for p in run["properties"]], run["properties"], labels,
                                  run["transform"], run["aggregate"], run["weights"], run["label_key"] or ppo.LABEL_KEY)
    std = utility_std(run, refs, pools)
    pcfg = ppo.PPOConfig(**{**cfg.ppo, "kl_coef": cfg.kl_start * std, "kl_targets": tuple(cfg.kl_targets)})
    prompts, rows = lab.split(run["split"])
    thr_split = {k: v[rows] for k, v in thr.items()}
    stairs, history = [], []
    start, cpu = time.time(), time.process_time()
    # The over-optimisation monitor (--lsc.monitor.* defaults) watches every run, with a noisy copy of the gold judge
    # of each property as its evaluator; the run goes on to the end of the staircase (the comparisons need every
    # stair), and the analysis reads where it would have stopped. Its noise has its own generator: the run is the
    # same with or without the monitor.
    monitor = Monitor(run["properties"], [f"judge_{p}" for p in run["properties"]])
    noise_rng = np.random.default_rng(3000 + run["seed"])
    gold_sd = {p: float(pools[f"bon_gold_{p}"].std()) for p in run["properties"]}

    def on_rollout(step: int, index: torch.Tensor, responses: torch.Tensor, rewards: torch.Tensor) -> Dict[str, float]:
        words = models.decode_responses(responses)
        batch = [lab.train_prompts[i] for i in index.tolist()]
        gold = {p: gold_scores(p, batch, words) for p in run["properties"]}
        judge = np.stack([g + MONITOR_NOISE * gold_sd[p] * noise_rng.standard_normal(len(g)) for p, g in gold.items()], 1)
        metrics, _ = monitor.update(step, rewards, torch.from_numpy(judge))  # no texts: only the signals are kept
        keep = {k: v for k, v in metrics.items() if k.startswith("monitor/signal/")}
        return {**keep, **{f"gold/{p}": float(g.mean()) for p, g in gold.items()}}

    def record(step: int, policy) -> None:
        ev = evaluate(policy, sft, rms, prompts, cfg.eval_samples, thr_split, seed=2000 + run["seed"])
        stairs.append({"target": pcfg.kl_targets[len(stairs)], "step": step, "kl_coef": history[step - 1]["kl_coef"], **ev})

    def on_step(step: int, policy) -> None:
        if step and step % pcfg.stair_steps == 0:
            record(step, policy)

    result = ppo.train(sft, lab_prompt_ids(lab), pipeline, pcfg, seed=1000 + run["seed"], desc=run["id"],
                       progress=progress, on_step=on_step, history=history, on_rollout=on_rollout)
    record(pcfg.steps, result.policy)
    write_json(target, {"run": run, "ppo": asdict(pcfg), "utility_std": std, "history": history, "stairs": stairs,
                        "monitor": {**monitor.summary(), "noise_sd": MONITOR_NOISE, "gold_sft_sd": gold_sd},
                        "seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu})
    return target


def lab_prompt_ids(lab: Lab) -> torch.Tensor:
    return models.encode_prompts([p.text for p in lab.train_prompts])


def _pool(cfg: LabConfig):
    return cf.ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"))


def run_all(out: str, cfg: LabConfig, runs: List[Dict], desc: str) -> Dict[str, Dict]:
    """Run the PPO runs not yet on disk, `cfg.workers` at a time; return every run's record by id."""
    runs = list({r["id"] + str(r["world"]): r for r in runs}.values())  # a run may serve two roles
    todo = [r for r in runs if not os.path.exists(run_path(out, r))]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=desc)
    if cfg.workers <= 1:
        for r in todo:
            run_one(out, cfg, r)
            bar.update()
    elif todo:
        # Workers stay quiet (their bars would interleave); this process counts the runs done.
        with _pool(cfg) as pool:
            for f in cf.as_completed([pool.submit(run_one, out, cfg, r, False) for r in todo]):
                f.result()
                bar.update()
    bar.close()
    return {(r["world"], r["id"]): read_json(run_path(out, r)) for r in runs}


def setup_world(out: str, cfg: LabConfig, seed: int, progress: bool = True) -> None:
    torch.set_num_threads(1)
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    Lab(world_dir(out, seed), cfg, seed).setup(progress)


def setup_all(out: str, cfg: LabConfig) -> None:
    """Set up every world not yet set up, worlds side by side."""
    todo = [s for s in cfg.seeds if not os.path.exists(os.path.join(world_dir(out, s), "setup", "headroom.json"))]
    if cfg.workers <= 1 or len(todo) <= 1:
        for s in todo:
            setup_world(out, cfg, s)
        return
    with _pool(cfg) as pool:
        for f in tqdm(cf.as_completed([pool.submit(setup_world, out, cfg, s, False) for s in todo]), total=len(todo),
                      desc="setup (worlds)"):
            f.result()


# ---------------------------------------------------------------- checks and tuning


def overoptimisation_check(out: str, cfg: LabConfig, records: Dict) -> Dict[str, Dict]:
    """Per world: raw PPO's helpfulness win rate (validation seeds and prompts) at each KL stair, and whether it
    rises above the SFT policy's by at least `overopt_margin`, peaks before the last stair and falls from the peak by
    at least `overopt_margin` by the last stair."""
    result = {}
    for s in cfg.seeds:
        lab, *_, pools, thr = _load(out, cfg, s)
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
        lab, *_ , pools, thr = _load(out, cfg, s)
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


def matched(record: Dict, sft: Dict[str, np.ndarray], metric: str, targets: Sequence[float],
            columns: Optional[np.ndarray] = None) -> np.ndarray:
    """One run's per-prompt `metric` at each target KL: `[T, P]` (NaN where the staircase missed the target)."""
    kls = [0.0] + [st["kl"] for st in record["stairs"]]
    values = np.array([sft[metric]] + [st["per_prompt"][metric] for st in record["stairs"]])
    if columns is not None:
        values = values[:, columns]
    return np.stack([stats.at_kl(kls, values, t) for t in targets])


# ---------------------------------------------------------------- best-of-k and the frontier


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


def frontiers(pools: Dict, thr: Dict, kl_max: float) -> Dict:
    """Gold best-of-n frontier for each win definition, on a KL grid up to kl_max."""
    w = wins(pools["bon_gold_helpful"], pools["bon_gold_harmless"], thr)
    kl = np.linspace(0.0, max(kl_max, 0.5) * 1.05, 60)
    n = np.array([bon_n_for_kl(x) for x in kl])
    return {"kl": kl.tolist(), "win": {name: frontier_win(v.mean(1), n).tolist() for name, v in w.items()}}


# ---------------------------------------------------------------- analysis


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
        lab, _, _, refs, pools, thr = _load(out, cfg, s)
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


def evaluate_checkpoint(out: str, policy_path: str, world_seed: Optional[int] = None) -> Dict:
    """Judge a policy trained elsewhere (e.g. by examples/lab_gpu.sh) on a world's test prompts, as the lab does."""
    if not os.path.exists(os.path.join(out, "config.json")):
        raise ValueError(f"--out {out} holds no lab run (config.json): run the lab with this --out first")
    cfg = LabConfig(**read_json(os.path.join(out, "config.json")))
    seed = cfg.seeds[0] if world_seed is None else world_seed
    if not os.path.exists(os.path.join(world_dir(out, seed), "setup", "pools.npz")):
        raise ValueError(f"{world_dir(out, seed)} holds no finished world setup (setup/pools.npz): run the lab with "
                         f"--out {out} and this world seed first")
    if not os.path.exists(os.path.join(policy_path, "config.json")):
        raise ValueError(f"--evaluate {policy_path}: expected a Hugging Face model folder with config.json")
    torch.set_num_threads(1)
    lab, sft, rms, refs, pools, thr = _load(out, cfg, seed)
    policy = models.LlamaForCausalLM.from_pretrained(policy_path, attn_implementation="sdpa").float().eval()
    prompts, rows = lab.split("test")
    ev = evaluate(policy, sft, rms, prompts, cfg.eval_samples, {k: v[rows] for k, v in thr.items()}, seed=2000)
    result = {"policy": policy_path, "world": seed, **{k: v for k, v in ev.items() if k != "per_prompt"}}
    write_json(os.path.join(world_dir(out, seed), "evaluations", os.path.basename(os.path.normpath(policy_path)) + ".json"),
               result)
    return result


def run_lab(out: str, cfg: LabConfig) -> Dict:
    """Run (or resume) the whole lab in `out`; write results.json, plots and report.md; return the results."""
    from openrlhf_lsc.lab import report

    torch.set_num_threads(1)
    start = time.time()
    os.makedirs(out, exist_ok=True)
    pin_config(out, cfg)
    setup_all(out, cfg)
    records = run_all(out, cfg, check_runs(cfg), "over-optimisation check")
    checks = overoptimisation_check(out, cfg, records)
    failed = [s for s, c in checks.items() if not c["passed"]]
    if failed and cfg.overopt_margin is not None:
        detail = "; ".join(f"world {s}: win {c['sft_win']:.3f}@KL0, " + ", ".join(f"{w:.3f}@KL{k:.1f}" for k, w in zip(c["kl"], c["win"]))
                           for s, c in checks.items() if s in failed)
        raise ValueError(f"raw PPO on the helpfulness proxy does not over-optimise (no win-rate rise of >= "
                         f"{cfg.overopt_margin} over SFT to a peak followed by a drop of >= {cfg.overopt_margin}) in "
                         f"{detail}; the benchmark needs that regime: use other --seeds")
    records.update(run_all(out, cfg, tuning_runs(cfg) + single_test_runs(cfg), "PPO runs (tuning, single rewards)"))
    selections = select(cfg, out, records)
    write_json(os.path.join(out, "selections.json"), selections)
    roles = and_test_runs(cfg, selections)
    records.update(run_all(out, cfg, [r for per_world in roles.values() for rs in per_world.values() for r in rs],
                           "PPO runs (AND, tuned)"))
    results = analyse(out, cfg, records, selections, checks, roles)
    results["wall_seconds_this_invocation"] = time.time() - start
    results.update(report.write(out, results))
    write_json(os.path.join(out, "results.json"), results)
    return results
