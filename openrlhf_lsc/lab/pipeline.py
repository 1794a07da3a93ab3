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

import os
import time
from typing import Dict, Optional

import torch

from openrlhf_lsc.lab import models
from openrlhf_lsc.lab.analysis import analyse
from openrlhf_lsc.lab.config import LabConfig, pin_config
from openrlhf_lsc.lab.evaluation import evaluate
from openrlhf_lsc.lab.files import read_json, write_json
from openrlhf_lsc.lab.run_specs import and_test_runs, check_runs, single_test_runs, tuning_runs
from openrlhf_lsc.lab.runner import run_all, setup_all
from openrlhf_lsc.lab.tuning import overoptimisation_check, select
from openrlhf_lsc.lab.world_setup import load_world, world_dir


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
    lab, sft, rms, refs, pools, thr = load_world(out, cfg, seed)
    policy = models.LlamaForCausalLM.from_pretrained(policy_path, attn_implementation="sdpa").float().eval()
    prompts, rows = lab.split("test")
    ev = evaluate(policy, sft, rms, prompts, cfg.eval_samples, {k: v[rows] for k, v in thr.items()}, seed=2000)
    result = {"policy": policy_path, "world": seed, **{k: v for k, v in ev.items() if k != "per_prompt"}}
    write_json(os.path.join(world_dir(out, seed), "evaluations", os.path.basename(os.path.normpath(policy_path)) + ".json"),
               result)
    return result


def run_lab(out: str, cfg: LabConfig, ray: Optional[str] = None) -> Dict:
    """Run (or resume) the whole lab in `out`; write results.json, plots and report.md; return the results.
    `ray`: the address of a Ray cluster to run the world setups and PPO runs on (default: the local process pool)."""
    from openrlhf_lsc.lab import report

    torch.set_num_threads(1)
    start = time.time()
    os.makedirs(out, exist_ok=True)
    pin_config(out, cfg)
    setup_all(out, cfg, ray)
    records = run_all(out, cfg, check_runs(cfg), "over-optimisation check", ray=ray)
    checks = overoptimisation_check(out, cfg, records)
    failed = [s for s, c in checks.items() if not c["passed"]]
    if failed and cfg.overopt_margin is not None:
        detail = "; ".join(f"world {s}: win {c['sft_win']:.3f}@KL0, " + ", ".join(f"{w:.3f}@KL{k:.1f}" for k, w in zip(c["kl"], c["win"]))
                           for s, c in checks.items() if s in failed)
        raise ValueError(f"raw PPO on the helpfulness proxy does not over-optimise (no win-rate rise of >= "
                         f"{cfg.overopt_margin} over SFT to a peak followed by a drop of >= {cfg.overopt_margin}) in "
                         f"{detail}; the benchmark needs that regime: use other --seeds")
    records.update(run_all(out, cfg, tuning_runs(cfg) + single_test_runs(cfg), "PPO runs (tuning, single rewards)",
                           ray=ray))
    selections = select(cfg, out, records)
    write_json(os.path.join(out, "selections.json"), selections)
    roles = and_test_runs(cfg, selections)
    records.update(run_all(out, cfg, [r for per_world in roles.values() for rs in per_world.values() for r in rs],
                           "PPO runs (AND, tuned)", ray=ray))
    results = analyse(out, cfg, records, selections, checks, roles)
    results["wall_seconds_this_invocation"] = time.time() - start
    results.update(report.write(out, results))
    write_json(os.path.join(out, "results.json"), results)
    return results
