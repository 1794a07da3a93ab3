"""One world of the lab: its folder (`Lab`), the setup stages that build its data, models, references and SFT pools,
and `load_world`, which loads what runs and analyses need, one world at a time."""

import contextlib
import os
import random
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from openrlhf_lsc.estimate import estimate_references
from openrlhf_lsc.lab import models, world
from openrlhf_lsc.lab.config import CANNED, PROPERTIES, REF_QUANTILES, SHORTCUTS, SINGLE_Q, LabConfig, pin_config
from openrlhf_lsc.lab.evaluation import gold_scores, thresholds
from openrlhf_lsc.lab.files import read_json, save_model_dir, write_json, write_jsonl
from openrlhf_lsc.lab.run_specs import label_sets


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

    def setup(self, progress: bool = True, last: str = "headroom") -> None:
        """Run the setup stages up to `last` not yet done."""
        stages = self.STAGES[: [name for name, _ in self.STAGES].index(last) + 1]
        for name, marker in tqdm(stages, desc=f"setup world {self.seed}", disable=not progress):
            if not os.path.exists(self.path(marker)):
                with self.timed(name):
                    getattr(self, f"build_{name}")()

    def load_sft(self):
        return models.load_policy(self.path("models", "sft"))

    def load_rms(self) -> Dict[str, models.RewardModel]:
        return {n: models.load_rm(self.path("models", f"rm_{n}")) for n in PROPERTIES}

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
        responses = models.sample_batched(sft, prompt_ids, gen)
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
                {"prompt": prompts[j].text, "chosen": " ".join(c), "rejected": " ".join(r)}
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
            out = [" ".join(w) for w in models.decode_responses(models.sample_batched(sft, ids, gen))]
            return [out[i * k : (i + 1) * k] for i in range(len(batch))]

        fns = {n: text_reward_fn(rms[n]) for n in PROPERTIES}
        # Budget-protocol configs (lab.budget.BudgetConfig) also record PAR's M SFT sample scores per prompt.
        par_m = getattr(cfg, "par_m", 0)
        sampled, report = estimate_references(texts, sampler, fns, method="quantile", q=SINGLE_Q, k=cfg.ref_k,
                                              quantiles=REF_QUANTILES, seed=self.seed, par_m=par_m)
        canned, canned_report = estimate_references(texts, None, {"harmless": fns["harmless"]}, method="canned",
                                                    canned_responses=CANNED, seed=self.seed)
        labels = {}
        for name, spec in label_sets(cfg).items():
            labels[name] = [{p: canned_label["harmless"] if how[0] == "canned" else at_quantile(s[p], how[1])
                             for p, how in spec.items()} for s, canned_label in zip(sampled, canned)]
        if par_m:  # one label set carries the scores (`--lsc.transform par` reads them), not every set
            labels["par"] = [{p: s[p] for p in PROPERTIES} for s in sampled]
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
            responses = models.sample_batched(sft, ids, gen)
            words = models.decode_responses(responses)
            for prop in PROPERTIES:
                out[f"{name}_gold_{prop}"] = gold_scores(prop, prompts, words).reshape(-1, size)
                out[f"{name}_proxy_{prop}"] = models.score_batched(rms[prop], ids, responses).numpy().reshape(-1, size)
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
        proxy = np.array([models.score_batched(rms["helpful"], ids, models.encode_responses(r)).numpy() for r in path])
        gold = np.array([gold_scores("helpful", prompts, r) for r in path])
        pool_proxy, pool_gold = pools["bon_proxy_helpful"][rows], pools["bon_gold_helpful"][rows]
        spread = pool_proxy.std(1)
        write_json(self.path("setup", "headroom.json"), {
            "prompts": len(rows), "rounds": cfg.ascent_rounds,
            "proxy": proxy.mean(1).tolist(), "gold": gold.mean(1).tolist(),
            "proxy_over_sft_max_in_sd": ((proxy - pool_proxy.max(1)) / spread).mean(1).tolist(),
            "sft_proxy_max": float(pool_proxy.max(1).mean()), "sft_gold_median": float(np.median(pool_gold, 1).mean()),
            "sft_gold_mean": float(pool_gold.mean()),
            "examples": [f"{p.text} -> {' '.join(r)}" for p, r in zip(prompts[:4], path[-1][:4])],
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
        scores = models.score_batched(rm, ids[owner], models.encode_responses(cands)).numpy().reshape(len(cur), candidates)
        for b, j in enumerate(scores.argmax(1)):
            if scores[b, j] > cur_score[b]:
                cur[b], cur_score[b] = cands[b * candidates + j], scores[b, j]
        path.append([list(c) for c in cur])
    return path


def at_quantile(label: Dict, q: float) -> Dict:
    """A copy of an estimator label whose reference is the recorded q-quantile."""
    return {**{k: v for k, v in label.items() if k != "par_scores"}, "reference": label["quantiles"][str(q)], "q": q}


def text_reward_fn(rm: models.RewardModel) -> Callable[[List[str], List[str]], List[float]]:
    """The estimator's `reward_fn(prompts, responses)` for a lab reward model (EOS appended as in sampling)."""

    def fn(prompts: List[str], responses: List[str]) -> List[float]:
        ids = models.encode_prompts(prompts)
        return models.score_batched(rm, ids, models.encode_responses([r.split() for r in responses])).tolist()

    return fn


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
        rows.append({"repeats": k if prop == "helpful" else min(k, 4), "example": " ".join(responses[0]), "proxy": proxy,
                     "gold": float(gold_scores(prop, probe, responses).mean())})
    return rows if prop == "helpful" else rows[:5]


def world_dir(out: str, world_seed: int) -> str:
    return os.path.join(out, f"world{world_seed}")


# A process keeps the models of the world in use only: the driver walks every world, a worker takes runs of any.
_CACHE: Dict[Tuple[str, int], Tuple] = {}


def load_world(out: str, cfg: LabConfig, world_seed: int) -> Tuple:
    """What a PPO run or an analysis needs of one world of `out`, loaded once while the process stays on that world:
    (lab, sft, reward models, references, pools, thresholds)."""
    key = (out, world_seed)
    if key not in _CACHE:
        _CACHE.clear()
        lab = Lab(world_dir(out, world_seed), cfg, world_seed)
        pools = lab.load_pools()
        _CACHE[key] = (lab, lab.load_sft(), lab.load_rms(), lab.load_references(), pools, thresholds(pools))
    return _CACHE[key]
