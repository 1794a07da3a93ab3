"""The lab's PPO runs: one run up the KL staircase (`run_one`, worker side), and the process pool (or Ray cluster,
`RayPool`) that runs the runs (`run_all`) and sets up the worlds (`setup_all`) side by side."""

import concurrent.futures as cf
import multiprocessing
import os
import socket
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Tuple

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
    target = begin_run(out, run, progress)
    if os.path.exists(target):
        return target
    lab, sft, rms, refs, pools, thr = load_world(out, cfg, run["world"])
    pipeline = reward_pipeline(run, rms, refs)
    std = utility_std(run, refs, pools)
    pcfg = ppo.PPOConfig(**{**cfg.ppo, "kl_coef": cfg.kl_start * std, "kl_targets": tuple(cfg.kl_targets)})
    prompts, rows = lab.split(run["split"])
    thr_split = {k: v[rows] for k, v in thr.items()}
    stairs, history = [], []
    start, cpu = time.time(), time.process_time()
    monitor, on_rollout, gold_sd = monitored(run, lab, pools)

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


def begin_run(out: str, run: Dict, progress: bool) -> str:
    """The path of a run's JSON (it exists when the run is done: a resume skips it); one CPU thread per run."""
    torch.set_num_threads(1)  # tiny models: one thread per run is as fast, and runs go side by side
    if not progress:
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of from_pretrained
    return run_path(out, run)


def reward_pipeline(run: Dict, rms: Dict, refs: Dict, par_m: Optional[int] = None) -> ppo.RewardPipeline:
    """The plugin's reward pipeline a run optimises: its properties' proxies, reference labels, transform,
    aggregation, weights and (budget runs) `--lsc.scale` and PAR's M."""
    n_train = refs["train_prompts"]
    labels = refs["labels"][run["label_set"]][:n_train] if run["label_set"] else [{}] * n_train
    return ppo.RewardPipeline([rms[p] for p in run["properties"]], run["properties"], labels, run["transform"],
                              run["aggregate"], run["weights"], run["label_key"] or ppo.LABEL_KEY, run.get("scale"),
                              par_m if run["transform"] == "par" else None)


def monitored(run: Dict, lab: Lab, pools: Dict) -> Tuple[Monitor, Callable, Dict[str, float]]:
    """The over-optimisation monitor (--lsc.monitor.* defaults) every lab run carries, with a noisy copy of the gold
    judge of each property as its evaluator; the run goes on to its end, and the analysis reads where it would have
    stopped. Its noise has its own generator: the run is the same with or without the monitor.

    Returns:
        (monitor, on_rollout for `ppo.train`, gold's std over the SFT pool per property).
    """
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

    return monitor, on_rollout, gold_sd


def lab_prompt_ids(lab: Lab) -> torch.Tensor:
    return models.encode_prompts([p.text for p in lab.train_prompts])


def connect_ray(address: str) -> bool:
    """Connect this process to the Ray cluster at `address` (`auto`: the one `ray start` started on this machine)
    unless it is connected; returns whether this call connected. The driver's `openrlhf_lsc` is shipped to the
    workers (`py_modules`), so they run the same code."""
    import ray

    import openrlhf_lsc

    if ray.is_initialized():
        return False
    target = address
    if address == "auto":  # RAY_ADDRESS or the head `ray start` recorded (it may be gone)
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address(address) or address
        except Exception:  # no cluster recorded: ray.init says so at once
            pass
    host, _, port = target.rpartition("://")[2].rpartition(":")
    if host:  # ray.init retries an unreachable address for many minutes: probe it first
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as e:
            raise ValueError(f"--ray {address}: nothing answers at {host}:{port} ({e}); start a Ray head there "
                             "(`ray start --head --port PORT`) or give its address") from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"py_modules": [os.path.dirname(openrlhf_lsc.__file__)]})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ValueError(f"--ray {address}: could not connect to a Ray cluster ({str(e).splitlines()[0]}); start one "
                         "(`ray start --head`) or give its address, e.g. --ray 10.0.0.1:6379") from None
    return True


class RayPool:
    """`submit(fn, *args)` as a Ray task of one CPU, returning a `concurrent.futures.Future`: the process pool's
    interface on a Ray cluster. The tasks read and write `out` as the pool's workers do, so every node must see it
    (a shared filesystem)."""

    def __init__(self, address: str):
        import ray

        self.ray, self.owned = ray, connect_ray(address)
        self.remote: Dict[Callable, object] = {}

    def submit(self, fn: Callable, *args) -> cf.Future:
        if fn not in self.remote:
            self.remote[fn] = self.ray.remote(num_cpus=1)(fn)
        return self.remote[fn].remote(*args).future()

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.ray.shutdown()


def _pool(cfg: LabConfig, ray: Optional[str] = None):
    if ray is not None:
        return RayPool(ray)
    return cf.ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"))


def run_all(out: str, cfg: LabConfig, runs: List[Dict], desc: str, run_fn: Callable = run_one,
            ray: Optional[str] = None) -> Dict[str, Dict]:
    """Run the PPO runs not yet on disk with `run_fn(out, cfg, run, progress)`, `cfg.workers` at a time (or as
    tasks of the Ray cluster at address `ray`); return every run's record by id."""
    runs = list({r["id"] + str(r["world"]): r for r in runs}.values())  # a run may serve two roles
    todo = [r for r in runs if not os.path.exists(run_path(out, r))]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=desc)
    if cfg.workers <= 1 and ray is None:
        for r in todo:
            run_fn(out, cfg, r)
            bar.update()
    elif todo:
        # Workers stay quiet (their bars would interleave); this process counts the runs done.
        with _pool(cfg, ray) as pool:
            for f in cf.as_completed([pool.submit(run_fn, out, cfg, r, False) for r in todo]):
                f.result()
                bar.update()
    bar.close()
    return {(r["world"], r["id"]): read_json(run_path(out, r)) for r in runs}


def setup_world(out: str, cfg: LabConfig, seed: int, progress: bool = True) -> None:
    torch.set_num_threads(1)
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    Lab(world_dir(out, seed), cfg, seed).setup(progress)


def setup_all(out: str, cfg: LabConfig, ray: Optional[str] = None) -> None:
    """Set up every world not yet set up, worlds side by side (on the Ray cluster at address `ray`, if given)."""
    todo = [s for s in cfg.seeds if not os.path.exists(os.path.join(world_dir(out, s), "setup", "headroom.json"))]
    if (cfg.workers <= 1 and ray is None) or len(todo) <= 1:
        for s in todo:
            setup_world(out, cfg, s)
        return
    with _pool(cfg, ray) as pool:
        for f in tqdm(cf.as_completed([pool.submit(setup_world, out, cfg, s, False) for s in todo]), total=len(todo),
                      desc="setup (worlds)"):
            f.result()
