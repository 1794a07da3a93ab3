"""`python -m openrlhf_lsc.lab --quick --out lab_out`: run (or resume) the CPU lab and write its report."""

import argparse
import dataclasses
import json
import time
from typing import List, Optional

from openrlhf_lsc.lab.config import PRESETS
from openrlhf_lsc.lab.pipeline import evaluate_checkpoint, run_lab


def seed_list(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"world seeds must be distinct, got {text!r}")
    return seeds


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.lab", description=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
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
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.evaluate:
        if args.seeds is not None:
            p.error("--evaluate judges on one world: give --seed, not --seeds")
        try:
            result = evaluate_checkpoint(args.out, args.evaluate, args.seed)
        except ValueError as e:
            p.exit(2, f"{p.prog}: error: {e}\n")
        print(json.dumps({k: result[k] for k in ("policy", "world", "kl", "mean")}, indent=1))
        return
    name = "quick" if args.quick else "full" if args.full else "smoke"
    cfg = PRESETS[name]
    if args.seed is not None or args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=tuple([args.seed] if args.seed is not None else args.seeds))
    if args.workers is not None:
        cfg = dataclasses.replace(cfg, workers=args.workers)
    start = time.time()
    try:
        run_lab(args.out, cfg)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"\nlab {name} finished in {(time.time() - start) / 60:.1f} min: see {args.out}/report.md")


if __name__ == "__main__":
    main()
