"""`python -m openrlhf_lsc.lab --quick --out lab_out`: run (or resume) the CPU lab and write its report."""

import argparse
import dataclasses
import sys
import time
from typing import List, Optional

from openrlhf_lsc.lab.experiments import PRESETS, run_lab


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.lab", description=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="raw vs lsc and AND vs 3 weights, one seed (under 10 min on 2 cores)")
    mode.add_argument("--full", action="store_true", help="all transforms, both properties, 5 weights, 3 seeds (under 60 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, for CI (about a minute)")
    p.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it")
    p.add_argument("--seed", type=int, default=0, help="world/SFT/reward-model seed (PPO seeds are set by the mode)")
    p.add_argument("--workers", type=int, default=None, help="PPO runs in parallel, one CPU thread each (default: the mode's)")
    args = p.parse_args(argv)
    name = "quick" if args.quick else "full" if args.full else "smoke"
    cfg = dataclasses.replace(PRESETS[name], seed=args.seed)
    if args.workers is not None:
        if args.workers < 1:
            p.error(f"--workers must be >= 1, got {args.workers}")
        cfg = dataclasses.replace(cfg, workers=args.workers)
    start = time.time()
    try:
        run_lab(args.out, cfg)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"\nlab {name} finished in {(time.time() - start) / 60:.1f} min: see {args.out}/report.md")


if __name__ == "__main__":
    main()
