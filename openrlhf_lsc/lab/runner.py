"""The lab's PPO runs: one run up the KL staircase (`run_one`, worker side), and the process pool that runs the runs
(`run_all`) and sets up the worlds (`setup_all`) side by side."""

import concurrent.futures as cf
import multiprocessing
import os
import time
from dataclasses import asdict
from typing import Dict, List

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from openrlhf_lsc.lab import models, ppo
from openrlhf_lsc.lab.config import MONITOR_NOISE, LabConfig
from openrlhf_lsc.lab.evaluation import evaluate, gold_scores
from openrlhf_lsc.lab.files import read_json, write_json
from openrlhf_lsc.lab.world_setup import Lab, load_world, world_dir
from openrlhf_lsc.monitor import Monitor


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
    lab, sft, rms, refs, pools, thr = load_world(out, cfg, run["world"])
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
