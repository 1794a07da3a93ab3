"""`python -m openrlhf_lsc.lab --quick --out lab_out`: run (or resume) the CPU lab and write its report."""

import argparse
import dataclasses
import json
import sys
import time
from typing import List, Optional

from openrlhf_lsc.lab.experiments import PRESETS, evaluate_checkpoint, run_lab


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.lab", description=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="helpfulness raw vs lsc, AND vs 3 weights, 4 KL coefficients, 2 seeds (a few minutes on 2 idle cores)")
    mode.add_argument("--full", action="store_true", help="all 4 transforms on both properties, AND vs 5 weights, 5 KL coefficients, 3 seeds (under 60 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, for CI (about a minute)")
    mode.add_argument("--evaluate", metavar="POLICY_DIR",
                      help="judge a policy trained elsewhere (e.g. examples/lab_gpu.sh) in the lab world of --out")
    p.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it")
    p.add_argument("--seed", type=int, default=0, help="world/SFT/reward-model seed (PPO seeds are set by the mode)")
    p.add_argument("--workers", type=int, default=None, help="PPO runs in parallel, one CPU thread each (default: the mode's)")
    args = p.parse_args(argv)
    if args.evaluate:
        try:
            result = evaluate_checkpoint(args.out, args.evaluate)
        except ValueError as e:
            sys.exit(f"error: {e}")
        print(json.dumps({k: result[k] for k in ("policy", "kl", "win", "gold", "proxy", "shortcut")}, indent=1))
        return
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
