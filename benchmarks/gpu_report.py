"""The GPU check's report: `python benchmarks/gpu_report.py DEST STEPS CUDA PYTEST_RC SECONDS` (gpu_check.sh step 5).

Reads what the steps left in DEST (junit.xml, pytest.log, overhead.json, estimator.json, bench.log) and the GPU
steps' JSON files in STEPS, writes DEST/steps.json (those files merged) and DEST/report.md with every number measured.
"""

import json
import os
import platform
import sys
import time
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text().splitlines()[-n:]) if path.exists() else "(no output)"


def dist(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def suite(dest: Path, pytest_rc: int) -> list:
    lines = ["## GPU suite (`pytest -m gpu tests/gpu`)", ""]
    junit = dest / "junit.xml"
    if not junit.exists():
        return lines + [f"pytest wrote no results (exit code {pytest_rc}); its output:", "```", tail(dest / "pytest.log"),
                        "```", ""]
    lines += ["| test | outcome | s |", "|---|---|---|"]
    counts, skipped = {}, {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, detail = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag], node.get("message", "")
        counts[outcome] = counts.get(outcome, 0) + 1
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        if outcome == "skipped":  # one line per reason
            skipped.setdefault(detail, []).append(name)
            continue
        note = f": {detail[:160].replace('|', '/')}" if detail else ""
        lines.append(f"| {name} | {outcome}{note} | {float(case.get('time', 0)):.1f} |")
    for reason, names in skipped.items():
        lines.append(f"| {len(names)} tests ({names[0]}, ...) | skipped: {reason[:160].replace('|', '/')} | |")
    lines += ["", f"pytest exit code {pytest_rc}; " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), ""]
    if pytest_rc not in (0, 5):
        lines += ["<details><summary>pytest output (tail)</summary>", "", "```", tail(dest / "pytest.log", 80), "```",
                  "</details>", ""]
    return lines


def measurements(steps: dict) -> list:
    if not steps:
        return []
    lines = ["## Measurements of the GPU steps", ""]
    z3 = steps.get("rehearsal_zero3")
    if z3:
        lines += ["ZeRO-3 actor step with rehearsal, rehearsal gradient vs plain transformers fp32 on CPU:", "",
                  "| precision | max abs error | gradient scale | cosine | partitioned | rehearsal NLL |",
                  "|---|---|---|---|---|---|"]
        for p in ("fp32", "bf16"):
            r = z3[p]
            lines.append(f"| {p} | {r['max_abs_err']:.3g} | {r['grad_scale']:.3g} | {r['cosine']:.6f} | {r['partitioned']} "
                         f"| {r['rehearsal_nll']:.4f} |")
        lines.append("")
    mem = steps.get("rehearsal_memory")
    if mem and "skipped" not in mem:
        lines += [f"Peak GPU memory of a ZeRO-3 bf16 actor step ({mem['params'] / 1e6:.0f}M policy, 4 x 1024 tokens; the "
                  "rehearsal micro-batch as large); the rehearsal's extra memory vs one rehearsal micro-batch's measured "
                  "activations (its forward with autograd, alone):", "",
                  "| gradient checkpointing | plain GiB | with rehearsal GiB | ratio | extra GiB | one micro-batch's "
                  "activations GiB | left after freeing the engine GiB |", "|---|---|---|---|---|---|---|"]
        for mode in ("no_checkpointing", "checkpointing"):
            m = mem[mode]
            lines.append(f"| {'on' if mode == 'checkpointing' else 'off'} | {m['plain_gib']:.3f} | {m['rehearsal_gib']:.3f} "
                         f"| {m['ratio']:.3f} | {m['extra_gib']:.3f} | {m['activation_gib']:.3f} | {m['leftover_gib']:.3f} |")
        lines.append("")
    rm = steps.get("rm_scoring")
    if rm:
        diff = max(abs(a - b) for x, y in zip(rm["scores"], rm["cpu_fp32_scores"]) for a, b in zip(x, y))
        udiff = max(abs(a - b) for a, b in zip(rm["utility"], rm["cpu_fp32_utility"]))
        lines += [f"K = 2 reward models ({rm['device']}, {rm['dtype']}) vs fp32 CPU: max score difference {diff:.4f}, "
                  f"max utility difference {udiff:.4f}", ""]
    am = steps.get("am_zero2_bf16")
    if am:
        lines += [f"Advantage Model steps, ZeRO-2 bf16: losses {', '.join(f'{x:.4f}' for x in am['losses'])} "
                  f"(fp32 CPU first loss {am['cpu_fp32_first_loss']:.4f}); weights moved by up to {am['weights_moved']:.3g}",
                  ""]
    hook = steps.get("setup_hook")
    if hook:
        lines += [f"Ray setup hook: CUDA initialised after it: {hook['cuda_initialized']} (Ray: {hook.get('ray')})", ""]
    return lines


def overhead(dest: Path) -> list:
    lines = ["## Reward/advantage step: plugin vs stock", ""]
    o = load(dest / "overhead.json")
    if not o:
        return lines + ["The benchmark wrote no results; the log:", "```", tail(dest / "bench.log"), "```", ""]
    c = o["config"]
    lines += [f"Device {c['device']} ({o['device_name']}), K = 2, fastest of {c['repeats']}, labels as {c['labels']}s, "
              f"target plugin <= {c['target']}x stock; sizes run: {c['prompts']}.", "",
              f"| prompts x {c['samples']} | estimator | stock s | plugin s | plugin/stock | reward hook s | hook/stock "
              "| shipping 64 experiences: plugin/stock s (bytes) |", "|---|---|---|---|---|---|---|---|"]
    for r in o["rows"]:
        lines.append(f"| {r['prompts']} | {r['estimator']} | {r['stock_s']:.4f} | {r['plugin_s']:.4f} | {r['ratio']:.3f}x "
                     f"| {r['hook_s']:.4f} | {r['hook_share']:.3f} | {r['ship_ratio']:.2f}x ({r['ship_bytes_ratio']:.2f}x) |")
    planned = len(c["prompts"].split(",")) * len(c["estimators"].split(","))
    cut = f" Only {len(o['rows'])} of {planned} rows finished within the time limit." if len(o["rows"]) < planned else ""
    return lines + ["", f"Worst ratio {o['worst_ratio']:.3f}x.{cut}", ""]


def estimator(dest: Path) -> list:
    est = load(dest / "estimator.json")
    lines = ["## Estimator scoring vs a plain batched forward", ""]
    if not est:
        return lines + ["No results; the log:", "```", tail(dest / "bench.log"), "```", ""]
    return lines + ["```json", json.dumps(est, indent=1)[:3000], "```", ""]


def main() -> None:
    dest, steps_dir, cuda, pytest_rc, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5]
    steps = {p.stem: json.loads(p.read_text()) for p in sorted(steps_dir.glob("*.json"))}
    (dest / "steps.json").write_text(json.dumps(steps, indent=1))
    lines = []
    if not cuda:
        ran = ("ran on CPU (LSC_GPU_SELFTEST=cpu, a check of the tests)" if os.environ.get("LSC_GPU_SELFTEST") == "cpu"
               else "were skipped")
        lines += [f"**no CUDA on this machine: the GPU tests {ran} and the benchmarks ran on CPU. This run checks "
                  "benchmarks/gpu_check.sh; it is not a GPU result.**", ""]
    gpu = torch.cuda.get_device_name() if cuda else "none"
    memory = f" ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)" if cuda else ""
    lines += [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
              f"- machine: {platform.node()}, Python {platform.python_version()}, GPU: {gpu}{memory}",
              f"- torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {dist('transformers')}, "
              f"deepspeed {dist('deepspeed')}, openrlhf {dist('openrlhf')}, ray {dist('ray')}, datasets {dist('datasets')}",
              f"- total time: {seconds} s", ""]
    lines += suite(dest, pytest_rc) + measurements(steps) + overhead(dest)
    lines += estimator(dest) if cuda or (dest / "estimator.json").exists() else []
    tmp = dest / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, dest / "report.md")


if __name__ == "__main__":
    main()
