"""`python -m openrlhf_lsc.lab --quick --out lab_out`: run (or resume) the CPU lab and write its report;
`--protocol budget` runs the fixed-coefficient protocol (`openrlhf_lsc.lab.budget`) instead."""

import argparse
import dataclasses
import json
import re
import time
from typing import List, Optional

from openrlhf_lsc.lab.budget import BUDGET_PRESETS, run_budget
from openrlhf_lsc.lab.config import PRESETS
from openrlhf_lsc.lab.pipeline import evaluate_checkpoint, run_lab
from openrlhf_lsc.lab.runner import connect_ray

RAY_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.-]+:[0-9]+)$")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: the error names the flag
        self.exit(2, f"{self.prog}: error: {message}\n")


def seed_list(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"world seeds must be distinct, got {text!r}")
    return seeds


def main(argv: Optional[List[str]] = None) -> None:
    p = Parser(prog="python -m openrlhf_lsc.lab", description=__doc__)
    p.add_argument("--protocol", choices=("matched-kl", "budget"), default="matched-kl",
                   help="matched-kl (default): methods compared at the same KL, up a KL staircase; budget: every method "
                        "at the same fixed KL coefficients and step budget, judged at the last checkpoint (with "
                        "--full, the default there: 5 worlds x 3 PPO seeds, about 2 h on 2 cores from its measured "
                        "CPU time; --quick: one world, a few methods and coefficients)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="one world: helpfulness raw vs lsc, AND vs 3 weights / 3 reference settings, 2 PPO seeds "
                           "(under 10 min on 2 idle cores)")
    mode.add_argument("--full", action="store_true",
                      help="5 worlds x 3 PPO seeds: 5 transforms on helpfulness, 3 methods on harmlessness, AND vs 5 "
                           "weights / 5 reference settings (under 150 min on 2 idle cores)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, for CI (about a minute)")
    mode.add_argument("--evaluate", metavar="POLICY_DIR",
                      help="judge a policy trained elsewhere (e.g. examples/lab_gpu.sh) on the test prompts of a world "
                           "of --out (the first, or --seed)")
    p.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it")
    worlds = p.add_mutually_exclusive_group()
    worlds.add_argument("--seed", type=int, default=None, help="one world seed (prompts, SFT, reward models)")
    worlds.add_argument("--seeds", type=seed_list, default=None,
                        help="world seeds, comma-separated (default: the mode's: quick 0, full 0,1,2,3,4)")
    p.add_argument("--workers", type=int, default=None, help="PPO runs in parallel, one CPU thread each (default: 2)")
    p.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                   help="run each PPO run (and world setup) as a task of the Ray cluster at this address (`auto`: the "
                        "one `ray start` started) instead of the local process pool; --out must be on a filesystem "
                        "every node sees")
    args = p.parse_args(argv)
    if not (args.quick or args.full or args.smoke or args.evaluate):
        if args.protocol != "budget":
            p.error("one of the arguments --quick --full --smoke --evaluate is required")
        args.full = True
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.ray is not None:
        if not RAY_ADDRESS.match(args.ray):
            p.error(f"--ray expects auto or a Ray cluster address HOST:PORT (or ray://HOST:PORT), got {args.ray!r}")
        if args.workers is not None or args.evaluate:
            p.error("--ray runs the lab's runs on a Ray cluster, whose CPUs set the parallelism: drop "
                    + ("--workers" if args.workers is not None else "--evaluate (it judges one policy here)"))
    if args.evaluate:
        if args.protocol != "matched-kl":
            p.error("--evaluate judges a policy on a matched-KL lab's world: drop --protocol budget")
        if args.seeds is not None:
            p.error("--evaluate judges on one world: give --seed, not --seeds")
        try:
            result = evaluate_checkpoint(args.out, args.evaluate, args.seed)
        except ValueError as e:
            p.exit(2, f"{p.prog}: error: {e}\n")
        print(json.dumps({k: result[k] for k in ("policy", "world", "kl", "mean")}, indent=1))
        return
    name = "quick" if args.quick else "full" if args.full else "smoke"
    cfg = (BUDGET_PRESETS if args.protocol == "budget" else PRESETS)[name]
    if args.seed is not None or args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=tuple([args.seed] if args.seed is not None else args.seeds))
    if args.workers is not None:
        cfg = dataclasses.replace(cfg, workers=args.workers)
    start = time.time()
    try:
        if args.ray is not None:
            connect_ray(args.ray)  # before any work: a wrong address fails now
        (run_budget if args.protocol == "budget" else run_lab)(args.out, cfg, ray=args.ray)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"\nlab {args.protocol} {name} finished in {(time.time() - start) / 60:.1f} min: see {args.out}/report.md")


if __name__ == "__main__":
    main()
