"""Driver for test_rehearsal_select.py's kill -9 test (run as a script; prints one JSON line).

Usage: python select_kill_driver.py OUT SEEDS ARGV_OLD_JSON ARGV_NEW_JSON

Each run of select_rehearsal happens in a forked child (everything is imported once, here; the parent runs
no k-means or torch work, so the children start clean). A child can SIGKILL itself at the n-th file-system
operation (open for writing, replace, rename, symlink, unlink, mkdir, rmtree, fsync) after the output phase
(`publish`) begins. The parent first publishes the old set, counts the operations of a full run of the new
one, then for each seed kills a run of the new set at a random operation and classifies what a reader of
OUT sees: "old", "new", or anything else (a mixed or missing set).
"""

import builtins
import io
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path

from openrlhf_lsc.cli import select_rehearsal

NAMES = ("ppo_prompts.jsonl", "rehearsal.jsonl", "assignments.jsonl", "report.json", "scores.png")


def child(argv, kill_at, count_file):
    state = {"armed": False, "n": 0}

    def hit():
        if state["armed"]:
            state["n"] += 1
            if state["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def counted(fn, writes_only=False):
        def call(*args, **kwargs):
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if not writes_only or any(c in str(mode) for c in "wax+"):
                hit()
            return fn(*args, **kwargs)

        return call

    builtins.open = io.open = counted(builtins.open, writes_only=True)
    for name in ("replace", "rename", "symlink", "unlink", "mkdir", "fsync"):
        setattr(os, name, counted(getattr(os, name)))
    shutil.rmtree = counted(shutil.rmtree)
    publish = select_rehearsal.publish

    def armed_publish(*args, **kwargs):
        state["armed"] = True
        return publish(*args, **kwargs)

    select_rehearsal.publish = armed_publish
    sys.stdout = sys.stderr = open(os.devnull, "w")
    select_rehearsal.main(argv)
    Path(count_file).write_text(str(state["n"]))
    os._exit(0)


def run(argv, kill_at=0, count_file=os.devnull):
    pid = os.fork()
    if pid == 0:
        try:
            child(argv, kill_at, count_file)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def visible(out: Path):
    return {n: (out / n).read_bytes() if (out / n).exists() else None for n in NAMES}


def main():
    # Import once here what every run needs, so the forked children only do the work.
    import matplotlib.pyplot  # noqa: F401
    import openrlhf.datasets.utils  # noqa: F401
    import openrlhf.utils.config  # noqa: F401
    import sklearn.cluster  # noqa: F401

    out, seeds, old_argv, new_argv = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    counts = out.parent / "ops.txt"
    assert run(new_argv) == 0
    new = visible(out)
    assert run(old_argv) == 0
    old = visible(out)
    assert run(new_argv, 0, counts) == 0 and visible(out) == new
    total = int(counts.read_text())
    assert run(old_argv) == 0 and visible(out) == old
    points = [1, total] + [random.Random(seed).randint(1, total) for seed in range(seeds)]
    seen = []
    for kill_at in points:
        code = run(new_argv, kill_at)
        now = visible(out)
        seen.append({"kill_at": kill_at, "code": code, "set": "old" if now == old else "new" if now == new else
                     {n: ("old" if v == old[n] else "new" if v == new[n] else "missing" if v is None else "other")
                      for n, v in now.items()}})
        if now != old:
            assert run(old_argv) == 0  # back to the old set for the next kill
    assert run(new_argv) == 0 and visible(out) == new  # a clean run after all the kills
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    current = os.readlink(out / "current")
    print(json.dumps({"total_ops": total, "kills": seen, "leftovers": leftovers, "current": current}))


if __name__ == "__main__":
    main()
