"""The lab pipeline: world -> SFT -> proxy reward models -> references -> PPO runs -> evaluation.

Every stage writes its outputs under `out/` atomically and is skipped when they exist, so an
interrupted run resumes where it stopped (PPO runs are one JSON file each). `out/config.json` pins the
configuration: resuming with a different one is refused.

Layout of `out/`:
- `data/`: `sft_demos.jsonl` (input/output), `prefs_<property>.jsonl` (prompt/chosen/rejected, for
  `train_rm`), `prompts_train.jsonl` / `prompts_eval.jsonl` (input, `lsc_ref` for helpful AND harmless,
  `lsc_ref_single` for single-reward runs), `world.json` (the hidden facts of every prompt);
- `models/`: `sft` (policy + tokenizer), `rm_helpful`, `rm_harmless` (OpenRLHF reward-model layout);
- `setup/`: training logs, references and their estimator report, the SFT sample pools on eval prompts;
- `runs/<id>.json`: one PPO run: its config, training log and evaluation (per-sample scores included);
- `results.json`, `report.md`, `*.png` (written by `openrlhf_lsc.lab.report`).
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
from openrlhf_lsc.lab import models, ppo, world

PROPERTIES = ("helpful", "harmless")
# Win definitions (paper 1, section 5): beat the SFT 85th percentile of gold helpfulness, the 95th of
# gold harmlessness, or the SFT median on both properties at once.
WIN_LEVELS = {"helpful": ("helpful", 0.85), "harmless": ("harmless", 0.95)}
BOTH_LEVEL = 0.5
# References (paper 1, sections 5.2-5.3): single-reward helpfulness at the SFT 85th percentile, single-reward
# harmlessness from canned refusals, RLHF AND at 0.75 / 0.5, best-of-k AND at the median for both.
SINGLE_Q = 0.85
AND_Q = {"helpful": 0.75, "harmless": 0.5}
BOK_Q = {"helpful": 0.5, "harmless": 0.5}
CANNED = ("sorry i cannot help with that", "i cannot help with that", "sorry i cannot help")


@dataclass
class LabConfig:
    """Sizes and sweeps of one lab run (presets: `PRESETS`)."""

    mode: str
    seed: int = 0  # world, SFT, reward models, references, pools
    ppo_seeds: Tuple[int, ...] = (0, 1)
    hidden: int = 64
    layers: int = 2
    sft_demos_per_prompt: int = 16
    sft_epochs: int = 4
    rm_pairs_per_prompt: int = 8
    rm_epochs: int = 3
    bt_temperature: float = 0.5  # P(a > b) = sigmoid((gold_a - gold_b) / T)
    ref_k: int = 32
    threshold_pool: int = 64  # SFT samples per eval prompt giving the gold quantiles that define a win
    bon_pool: int = 256  # further SFT samples per eval prompt for best-of-k and the frontier
    eval_samples: int = 8  # policy samples per eval prompt
    eval_fraction: float = 0.25
    single_properties: Tuple[str, ...] = ("helpful",)
    single_transforms: Tuple[str, ...] = ("raw", "lsc")
    weights: Tuple[float, ...] = (0.3, 0.5, 0.7)  # weight of helpfulness in the weighted-sum baseline
    kl_grid: Tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)  # KL coefficient in units of the utility's SFT std
    bok_ks: Tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 191)
    ppo: Dict = field(default_factory=dict)  # PPOConfig overrides
    workers: int = 2
    prompts_limit: Optional[int] = None  # use only this many prompts (smoke tests)


PRESETS = {
    "quick": LabConfig(mode="quick"),
    "full": LabConfig(
        mode="full",
        ppo_seeds=(0, 1, 2),
        ppo={"steps": 120},
        sft_demos_per_prompt=24,
        sft_epochs=5,
        rm_pairs_per_prompt=12,
        ref_k=64,
        bon_pool=512,
        eval_samples=16,
        single_properties=("helpful", "harmless"),
        single_transforms=("raw", "lsc", "center", "logsigmoid"),
        weights=(0.1, 0.3, 0.5, 0.7, 0.9),
        kl_grid=(0.003, 0.01, 0.03, 0.1, 0.3),
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
        weights=(0.5,),
        kl_grid=(0.05,),
        bok_ks=(1, 4, 16),
        ppo={"steps": 3, "rollout_prompts": 16, "train_batch": 16},
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


# ---------------------------------------------------------------- setup stages


class Lab:
    """One lab directory: the stages that build the world and the models, and the PPO runs."""

    def __init__(self, out: str, cfg: LabConfig):
        self.out, self.cfg = out, cfg
        os.makedirs(out, exist_ok=True)
        path = self.path("config.json")
        cfg_json = asdict(cfg)
        cfg_json.pop("workers")
        if os.path.exists(path):
            saved = read_json(path)
            if saved != json.loads(json.dumps(cfg_json)):
                raise ValueError(
                    f"{out} holds a lab run with a different configuration ({path}); resume it with the same "
                    "flags or choose another --out"
                )
        else:
            write_json(path, cfg_json)
        prompts = world.make_prompts(cfg.seed)[: cfg.prompts_limit]
        n_eval = int(round(cfg.eval_fraction * len(prompts)))
        self.eval_prompts, self.train_prompts = prompts[:n_eval], prompts[n_eval:]
        self.tokenizer = world.build_tokenizer()

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

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
              ("references", "setup/references.json"), ("pools", "setup/pools.npz"))

    def setup(self) -> None:
        """Run the setup stages not yet done."""
        for name, marker in tqdm(self.STAGES, desc="setup"):
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
        rng = random.Random(cfg.seed)
        prompts = self.train_prompts + self.eval_prompts
        write_json(self.path("data", "world.json"), {
            "train": [world.prompt_record(p) for p in self.train_prompts],
            "eval": [world.prompt_record(p) for p in self.eval_prompts],
        })
        pairs = [(p, world.demonstrate(p, rng)) for p in prompts for _ in range(cfg.sft_demos_per_prompt)]
        write_jsonl(self.path("data", "sft_demos.jsonl"), [{"input": p.text, "output": " ".join(d)} for p, d in pairs])
        policy = models.new_policy(cfg.seed, cfg.hidden, cfg.layers)
        losses = models.train_sft(policy, [p for p, _ in pairs], [d for _, d in pairs],
                                  epochs=cfg.sft_epochs, lr=3e-3, batch=128, seed=cfg.seed)
        write_json(self.path("setup", "sft.json"), {"demos": len(pairs), "epoch_losses": losses})
        save_model_dir(target, policy, self.tokenizer)

    def build_reward_models(self) -> None:
        """Bradley-Terry proxies on gold-labelled (noisy) pairs of SFT samples; setup/reward_models.json last."""
        cfg, sft = self.cfg, self.load_sft()
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        prompts = [p for p in self.train_prompts for _ in range(2 * cfg.rm_pairs_per_prompt)]
        prompt_ids = models.encode_prompts([p.text for p in prompts])
        responses = sample_batched(sft, prompt_ids, gen, desc="RM data: SFT samples")
        words = models.decode_responses(responses)
        a, b = torch.arange(0, len(prompts), 2), torch.arange(1, len(prompts), 2)
        n_train = int(0.9 * len(a))
        stats = {}
        for i, name in enumerate(PROPERTIES):
            target = self.path("models", f"rm_{name}")
            gold = torch.tensor([world.GOLD[name](p, w) for p, w in zip(prompts, words)])
            a_wins = models.bradley_terry_labels(gold[a], gold[b], cfg.bt_temperature, gen)
            chosen = torch.where(a_wins[:, None], responses[a], responses[b])
            rejected = torch.where(a_wins[:, None], responses[b], responses[a])
            write_jsonl(self.path("data", f"prefs_{name}.jsonl"), [
                {"prompt": prompts[j].text, "chosen": text(c), "rejected": text(r)}
                for j, c, r in zip(a.tolist(), models.decode_responses(chosen), models.decode_responses(rejected))
            ])
            rm = models.reward_model_from(sft, cfg.seed + 10 + i)
            tr = slice(0, n_train)
            losses = models.train_reward_model(rm, prompt_ids[a][tr], chosen[tr], rejected[tr], epochs=cfg.rm_epochs,
                                               lr=1e-3, batch=64, seed=cfg.seed, desc=f"RM {name}")
            ho = slice(n_train, None)
            ra, rb = models.score(rm, prompt_ids[a][ho], responses[a][ho]), models.score(rm, prompt_ids[b][ho], responses[b][ho])
            ga, gb = gold[a][ho], gold[b][ho]
            strict = ga != gb
            stats[name] = {
                "pairs": n_train,
                "epoch_losses": losses,
                "heldout_pairs": int(strict.sum()),
                "heldout_accuracy_vs_gold": ((ra > rb) == (ga > gb))[strict].float().mean().item() if strict.any() else None,
                "heldout_accuracy_vs_labels": ((ra > rb) == a_wins[ho]).float().mean().item(),
                "shortcut_probe": shortcut_probe(rm, name, self.train_prompts),
            }
            save_model_dir(target, rm, self.tokenizer)
        write_json(self.path("setup", "reward_models.json"), stats)

    def build_references(self) -> None:
        """References for every prompt with the project's estimator (openrlhf_lsc.estimate); prompt files."""
        cfg, sft, rms = self.cfg, self.load_sft(), self.load_rms()
        prompts = self.train_prompts + self.eval_prompts
        texts = [p.text for p in prompts]
        gen = torch.Generator().manual_seed(cfg.seed + 2)

        def sampler(batch: List[str], k: int) -> List[List[str]]:
            ids = models.encode_prompts(batch).repeat_interleave(k, 0)
            out = [text(w) for w in models.decode_responses(sample_batched(sft, ids, gen, desc="references: SFT samples"))]
            return [out[i * k : (i + 1) * k] for i in range(len(batch))]

        fns = {n: text_reward_fn(rms[n]) for n in PROPERTIES}
        levels = sorted({SINGLE_Q, *AND_Q.values(), *BOK_Q.values()})
        sampled, report = estimate_references(texts, sampler, fns, method="quantile", q=SINGLE_Q, k=cfg.ref_k,
                                              quantiles=levels, seed=cfg.seed)
        canned, canned_report = estimate_references(texts, None, {"harmless": fns["harmless"]}, method="canned",
                                                    canned_responses=CANNED, seed=cfg.seed)
        labels = {
            "single": [{"helpful": s["helpful"], "harmless": c["harmless"]} for s, c in zip(sampled, canned)],
            "and": [{n: at_quantile(s[n], AND_Q[n]) for n in PROPERTIES} for s in sampled],
            "bok": [{n: at_quantile(s[n], BOK_Q[n]) for n in PROPERTIES} for s in sampled],
        }
        n_train = len(self.train_prompts)
        for split, sl in (("train", slice(0, n_train)), ("eval", slice(n_train, None))):
            write_jsonl(self.path("data", f"prompts_{split}.jsonl"), [
                {"input": p.text, "lsc_ref": a, "lsc_ref_single": s}
                for p, a, s in zip(prompts[sl], labels["and"][sl], labels["single"][sl])
            ])
        write_json(self.path("setup", "references.json"),
                   {"labels": labels, "report": report, "canned_report": canned_report, "train_prompts": n_train})

    def build_pools(self) -> None:
        """SFT samples on the eval prompts, gold- and proxy-scored: win thresholds, best-of-k, the frontier."""
        cfg, sft, rms, target = self.cfg, self.load_sft(), self.load_rms(), self.path("setup", "pools.npz")
        gen = torch.Generator().manual_seed(cfg.seed + 3)
        out = {}
        for name, size in (("threshold", cfg.threshold_pool), ("bon", cfg.bon_pool)):
            prompts = [p for p in self.eval_prompts for _ in range(size)]
            ids = models.encode_prompts([p.text for p in prompts])
            responses = sample_batched(sft, ids, gen, desc=f"SFT pool: {name}")
            words = models.decode_responses(responses)
            for prop in PROPERTIES:
                out[f"{name}_gold_{prop}"] = gold_scores(prop, prompts, words).reshape(-1, size)
                if name == "bon":
                    out[f"{name}_proxy_{prop}"] = score_batched(rms[prop], ids, responses).numpy().reshape(-1, size)
            out[f"{name}_list"] = np.array([world.has_list(w) for w in words]).reshape(-1, size)
            out[f"{name}_consult"] = np.array([world.has_consult(w) for w in words]).reshape(-1, size)
        tmp = f"{target}.tmp{os.getpid()}.npz"
        np.savez(tmp, **out)
        os.replace(tmp, target)

    # -- the PPO runs
    def run_specs(self, refs: Dict, pools: Dict) -> List[Dict]:
        """All PPO runs of the configuration, each with its KL coefficient resolved."""
        cfg = self.cfg
        specs = []
        for prop in cfg.single_properties:
            for transform in cfg.single_transforms:
                specs += [dict(experiment="single", properties=[prop], transform=transform, aggregate="and",
                               weights=None, label_set="single")]
        specs += [dict(experiment="and", properties=list(PROPERTIES), transform="lsc", aggregate="and",
                       weights=None, label_set="and")]
        for w in cfg.weights:
            specs += [dict(experiment="and", properties=list(PROPERTIES), transform="raw", aggregate="weighted",
                           weights=[w, round(1 - w, 6)], label_set="and")]
        out = []
        for spec in specs:
            std = utility_std(spec, refs, pools)
            for c in cfg.kl_grid:
                for seed in cfg.ppo_seeds:
                    run = dict(spec, c=c, kl_coef=c * std, utility_std=std, seed=seed)
                    run["method"] = method_name(run)
                    slug = run["method"].replace(" ", "_").replace("=", "")
                    run["id"] = f"{run['experiment']}-{'+'.join(run['properties'])}-{slug}-c{c:g}-s{seed}"
                    out.append(run)
        return out


def utility_std(spec: Dict, refs: Dict, pools: Dict) -> float:
    """Std of a run's utility over SFT samples (the eval prompts' SFT pool): the unit of its KL coefficient.

    Stating the KL coefficient in this unit gives every transform a comparable reward-to-KL trade-off
    (advantages are whitened, so only this ratio matters); the plots use the KL each run reached.
    """
    labels = refs["labels"][spec["label_set"]][refs["train_prompts"] :]
    rewards = torch.tensor(np.stack([pools[f"bon_proxy_{p}"] for p in spec["properties"]], -1))  # [P, N, K]
    n = rewards.shape[1]
    pipe = ppo.RewardPipeline([], spec["properties"], [lab for lab in labels for _ in range(n)],
                              spec["transform"], spec["aggregate"], spec["weights"])
    return float(pipe.utility(rewards.reshape(-1, rewards.shape[-1]), list(range(rewards.shape[0] * n))).std())


def method_name(run: Dict) -> str:
    if run["aggregate"] == "weighted":
        return f"weighted w={run['weights'][0]:g}"
    return run["transform"] if run["experiment"] == "single" else "lsc AND"


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
                   progress: bool = True) -> torch.Tensor:
    out = []
    for i in tqdm(range(0, len(prompt_ids), batch), desc=desc, leave=False, disable=not progress):
        out.append(models.sample(policy, prompt_ids[i : i + batch], gen))
    return torch.cat(out)


def score_batched(rm, prompt_ids: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    return models.score(rm, prompt_ids, responses, batch=1024)


def gold_scores(prop: str, prompts: Sequence[world.Prompt], words: Sequence[Sequence[str]]) -> np.ndarray:
    return np.array([world.GOLD[prop](p, w) for p, w in zip(prompts, words)])


def shortcut_probe(rm: models.RewardModel, prop: str, prompts: Sequence[world.Prompt], n_prompts: int = 64) -> List[Dict]:
    """Proxy vs gold credit for 0..5 repetitions of the property's shortcut on a fixed on-topic answer."""
    probe = [p for p in prompts if not p.sensitive][:n_prompts]
    ids = models.encode_prompts([p.text for p in probe])
    rows = []
    for k in range(6):
        responses = []
        for p in probe:
            key = sorted(p.keys)[0]
            if prop == "helpful":  # a list of k items, all the same key word
                r = [x for j in range(k) for x in (world.LIST_MARKERS[j], key)] or ["use", key]
            else:
                r = ["use", key] + ["consult", "a", "doctor"] * k
            responses.append(r)
        proxy = models.score(rm, ids, models.encode_responses(responses)).mean().item()
        rows.append({"repeats": k, "example": text(responses[0]), "proxy": proxy,
                     "gold": float(gold_scores(prop, probe, responses).mean())})
    return rows


def load_policy(path: str):
    policy = models.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    return policy.eval()


def load_rm(path: str) -> models.RewardModel:
    return models.RewardModel.from_pretrained(path, attn_implementation="sdpa").eval()


# ---------------------------------------------------------------- evaluation


def thresholds(pools: Dict) -> Dict[str, np.ndarray]:
    """Per-eval-prompt gold thresholds from the SFT threshold pool."""
    return {
        "helpful": np.quantile(pools["threshold_gold_helpful"], WIN_LEVELS["helpful"][1], axis=1),
        "harmless": np.quantile(pools["threshold_gold_harmless"], WIN_LEVELS["harmless"][1], axis=1),
        "median_helpful": np.quantile(pools["threshold_gold_helpful"], BOTH_LEVEL, axis=1),
        "median_harmless": np.quantile(pools["threshold_gold_harmless"], BOTH_LEVEL, axis=1),
    }


def wins(gold_h: np.ndarray, gold_s: np.ndarray, thr: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Win indicators `[prompts, samples]`: the three win definitions, and each half of "both"."""
    above_h, above_s = gold_h > thr["median_helpful"][:, None], gold_s > thr["median_harmless"][:, None]
    return {
        "helpful": gold_h > thr["helpful"][:, None],
        "harmless": gold_s > thr["harmless"][:, None],
        "both": above_h & above_s,
        "helpful_above_median": above_h,
        "harmless_above_median": above_s,
    }


@torch.no_grad()
def evaluate(policy, sft, rms: Dict, eval_prompts: Sequence[world.Prompt], n: int, thr: Dict, seed: int,
             progress: bool = True) -> Dict:
    """Sample `n` responses per eval prompt; KL to SFT, gold wins, proxy and gold scores, shortcut rates."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [p for p in eval_prompts for _ in range(n)]
    ids = models.encode_prompts([p.text for p in prompts])
    responses = sample_batched(policy, ids, gen, desc="eval", progress=progress)
    mask = models.action_mask(responses)
    kl = ((models.response_logprobs(policy, ids, responses) - models.response_logprobs(sft, ids, responses)) * mask).sum(1)
    words = models.decode_responses(responses)
    gold = {p: gold_scores(p, prompts, words).reshape(-1, n) for p in PROPERTIES}
    proxy = {p: score_batched(rms[p], ids, responses).numpy().reshape(-1, n) for p in PROPERTIES}
    w = wins(gold["helpful"], gold["harmless"], thr)
    return {
        "kl": kl.mean().item(),
        "kl_sem": (kl.std() / math.sqrt(len(kl))).item(),
        "win": {k: float(v.mean()) for k, v in w.items()},
        "gold": {k: float(v.mean()) for k, v in gold.items()},
        "proxy": {k: float(v.mean()) for k, v in proxy.items()},
        "shortcut": {"list": float(np.mean([world.has_list(x) for x in words])),
                     "consult": float(np.mean([world.has_consult(x) for x in words]))},
        "length": mask.sum(1).mean().item(),
        "examples": [f"{p.text} -> {text(x)}" for p, x in list(zip(prompts, words))[:: n][:6]],
        "samples": {f"gold_{k}": np.round(v, 4).tolist() for k, v in gold.items()}
        | {f"proxy_{k}": np.round(v, 4).tolist() for k, v in proxy.items()},
    }


# ---------------------------------------------------------------- PPO runs (worker side)

_CACHE: Dict[str, Tuple] = {}


def _load(out: str, cfg: LabConfig) -> Tuple:
    """What a PPO run needs, loaded once per process: (lab, sft, reward models, references, thresholds)."""
    if out not in _CACHE:
        lab = Lab(out, cfg)
        _CACHE[out] = (lab, lab.load_sft(), lab.load_rms(), lab.load_references(), thresholds(lab.load_pools()))
    return _CACHE[out]


def run_one(out: str, cfg: LabConfig, run: Dict, progress: bool = True) -> str:
    """Train and evaluate one PPO run; write `runs/<id>.json`. Returns its path."""
    torch.set_num_threads(1)  # tiny models: one thread per run is as fast, and runs go side by side
    if not progress:
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of from_pretrained
    target = os.path.join(out, "runs", f"{run['id']}.json")
    if os.path.exists(target):
        return target
    lab, sft, rms, refs, thr = _load(out, cfg)
    labels = refs["labels"][run["label_set"]][: refs["train_prompts"]]
    pipeline = ppo.RewardPipeline([rms[p] for p in run["properties"]], run["properties"], labels,
                                  run["transform"], run["aggregate"], run["weights"])
    pcfg = ppo.PPOConfig(**{**cfg.ppo, "kl_coef": run["kl_coef"]})
    start, cpu = time.time(), time.process_time()
    prompt_ids = models.encode_prompts([p.text for p in lab.train_prompts])
    result = ppo.train(sft, prompt_ids, pipeline, pcfg, seed=1000 + run["seed"], desc=run["id"], progress=progress)
    evaluation = evaluate(result.policy, sft, rms, lab.eval_prompts, cfg.eval_samples, thr, seed=2000 + run["seed"],
                          progress=progress)
    write_json(target, {"run": run, "ppo": asdict(pcfg), "history": result.history, "eval": evaluation,
                        "seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu})
    return target


def run_all(lab: Lab, runs: List[Dict]) -> List[Dict]:
    """Run the PPO runs not yet on disk, `cfg.workers` at a time; return every run's record."""
    todo = [r for r in runs if not os.path.exists(lab.path("runs", f"{r['id']}.json"))]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="PPO runs")
    if lab.cfg.workers <= 1:
        for r in todo:
            run_one(lab.out, lab.cfg, r)
            bar.update()
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        # Workers stay quiet (their bars would interleave); this process counts the runs done.
        with cf.ProcessPoolExecutor(lab.cfg.workers, mp_context=ctx) as pool:
            futures = [pool.submit(run_one, lab.out, lab.cfg, r, False) for r in todo]
            for f in cf.as_completed(futures):
                f.result()
                bar.update()
    bar.close()
    return [read_json(lab.path("runs", f"{r['id']}.json")) for r in runs]


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


def empirical_bon_kl(utility: np.ndarray, k: float) -> float:
    """KL(best-of-k over the pool || uniform over the pool), averaged over prompts (rows)."""
    p = bon_pick_probs(utility, k)
    n = utility.shape[-1]
    return float(np.mean(np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) * n), 0.0), axis=-1)))


def frontier_win(p_win: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Gold best-of-n win rate: mean over prompts of 1 - (1 - p_x)^n, p_x the SFT win probability of prompt x."""
    n = np.atleast_1d(np.asarray(n, dtype=float))
    return np.array([np.mean(1 - (1 - p_win) ** m) for m in n])


def best_of_k(pools: Dict, refs: Dict, ks: Sequence[int], weights: Sequence[float], thr: Dict) -> Dict:
    """Best-of-k under the AND-aggregated LSC utility (median references) vs weighted raw sums (Figure 6a)."""
    n_train = refs["train_prompts"]
    labels = refs["labels"]["bok"][n_train:]
    proxy = torch.tensor(np.stack([pools["bon_proxy_helpful"], pools["bon_proxy_harmless"]], -1))  # [P, N, 2]
    P, N, _ = proxy.shape
    win = wins(pools["bon_gold_helpful"], pools["bon_gold_harmless"], thr)["both"]
    flat_labels = [lab for lab in labels for _ in range(N)]
    methods = {"lsc AND": ("lsc", "and", None)}
    methods.update({f"weighted w={w:g}": ("raw", "weighted", [w, round(1 - w, 6)]) for w in weights})
    out = {"k": list(ks), "kl_formula": bon_kl(np.array(ks)).tolist(), "methods": {}}
    for name, (transform, aggregate, w) in methods.items():
        pipe = ppo.RewardPipeline([], list(PROPERTIES), flat_labels, transform, aggregate, w)
        u = pipe.utility(proxy.reshape(-1, 2), list(range(P * N))).reshape(P, N).numpy()
        rates, kls = [], []
        for k in ks:
            probs = bon_pick_probs(u, k)
            rates.append(float(np.mean(np.sum(probs * win, -1))))
            kls.append(empirical_bon_kl(u, k))
        out["methods"][name] = {"win_both": rates, "kl_empirical": kls}
    return out


def frontiers(pools: Dict, thr: Dict, kl_max: float) -> Dict:
    """Gold best-of-n frontier for each win definition, on a KL grid up to kl_max."""
    w = wins(pools["bon_gold_helpful"], pools["bon_gold_harmless"], thr)
    kl = np.linspace(0.0, max(kl_max, 0.5) * 1.05, 60)
    n = np.array([bon_n_for_kl(x) for x in kl])
    return {"kl": kl.tolist(), "n": n.tolist(),
            "win": {name: frontier_win(v.mean(1), n).tolist() for name, v in w.items()},
            "p_win_sft": {name: float(v.mean()) for name, v in w.items()}}


def analyse(lab: Lab, runs: List[Dict], pools: Dict, refs: Dict) -> Dict:
    """Everything the report needs, from the runs on disk and the pools."""
    cfg = lab.cfg
    thr = thresholds(pools)
    w_bon = wins(pools["bon_gold_helpful"], pools["bon_gold_harmless"], thr)
    p_win = {k: v.mean(1) for k, v in w_bon.items()}
    rows = []
    for rec in runs:
        run, ev = rec["run"], rec["eval"]
        win_name = run["properties"][0] if run["experiment"] == "single" else "both"
        front = float(frontier_win(p_win[win_name], bon_n_for_kl(max(ev["kl"], 0.0)))[0])
        rows.append({
            "id": run["id"], "experiment": run["experiment"], "property": "+".join(run["properties"]),
            "method": run["method"], "c": run["c"], "kl_coef": run["kl_coef"], "seed": run["seed"],
            "kl": ev["kl"], "win": ev["win"][win_name], "win_name": win_name, "frontier": front,
            "fraction_of_frontier": ev["win"][win_name] / front if front > 0 else None,
            "gold": ev["gold"], "proxy": ev["proxy"], "shortcut": ev["shortcut"], "length": ev["length"],
            "all_wins": ev["win"], "seconds": rec["seconds"],
        })
    kl_max = max([r["kl"] for r in rows] + [float(bon_kl(max(cfg.bok_ks)))])
    sft_pool = {k: v.mean() for k, v in w_bon.items()}
    checks = {}
    for k in (2, 8, 32):
        if k <= max(cfg.bok_ks):
            checks[str(k)] = {"formula": float(bon_kl(k)),
                              "empirical_proxy_helpful": empirical_bon_kl(pools["bon_proxy_helpful"], k)}
    return {
        "config": asdict(cfg),
        "rows": rows,
        "best_of_k": best_of_k(pools, refs, cfg.bok_ks, cfg.weights, thr),
        "frontier": frontiers(pools, thr, kl_max),
        "bon_kl_check": checks,
        "sft_win_rates_on_pool": {k: float(v) for k, v in sft_pool.items()},
        "sft_shortcut_rates": {"list": float(pools["threshold_list"].mean()), "consult": float(pools["threshold_consult"].mean())},
        # How far apart each proxy puts two SFT answers to the same prompt: with lsc the AND sum weighs each
        # property by this scale (a Bradley-Terry probability), where the weighted sum uses w.
        "proxy_within_prompt_std": {p: float(pools[f"bon_proxy_{p}"].std(1).mean()) for p in PROPERTIES},
        "reward_models": read_json(lab.path("setup", "reward_models.json")),
        "sft": read_json(lab.path("setup", "sft.json")),
        "references": refs["report"],
        "thresholds": {k: float(np.mean(v)) for k, v in thr.items()},
        "timing": {"setup": read_json(lab.path("setup", "timing.json")) if os.path.exists(lab.path("setup", "timing.json")) else {},
                   "runs_cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in runs),
                   "runs_wall_seconds": sum(r["seconds"] for r in runs)},
    }


def evaluate_checkpoint(out: str, policy_path: str) -> Dict:
    """Judge a policy trained elsewhere (e.g. by examples/lab_gpu.sh) exactly as the lab judges its own runs."""
    if not os.path.exists(os.path.join(out, "setup", "pools.npz")):
        raise ValueError(f"{out} holds no finished lab setup (setup/pools.npz): run the lab with this --out first")
    if not os.path.exists(os.path.join(policy_path, "config.json")):
        raise ValueError(f"--evaluate {policy_path}: expected a Hugging Face model folder with config.json")
    torch.set_num_threads(1)
    lab, sft, rms, refs, thr = _load(out, LabConfig(**read_json(os.path.join(out, "config.json"))))
    policy = models.LlamaForCausalLM.from_pretrained(policy_path, attn_implementation="sdpa").float().eval()
    ev = evaluate(policy, sft, rms, lab.eval_prompts, lab.cfg.eval_samples, thr, seed=2000)
    result = {"policy": policy_path, **{k: v for k, v in ev.items() if k != "samples"}}
    write_json(os.path.join(out, "evaluations", os.path.basename(os.path.normpath(policy_path)) + ".json"), result)
    return result


def run_lab(out: str, cfg: LabConfig) -> Dict:
    """Run (or resume) the whole lab in `out`; write results.json, plots and report.md; return the results."""
    from openrlhf_lsc.lab import report

    torch.set_num_threads(1)
    start = time.time()
    lab = Lab(out, cfg)
    lab.setup()
    refs, pools = lab.load_references(), lab.load_pools()
    runs = run_all(lab, lab.run_specs(refs, pools))
    results = analyse(lab, runs, pools, refs)
    results["wall_seconds_this_invocation"] = time.time() - start
    results.update(report.write(out, results, {r["run"]["id"]: r for r in runs}, pools))
    write_json(lab.path("results.json"), results)
    return results
