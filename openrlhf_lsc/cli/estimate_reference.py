"""`python -m openrlhf_lsc.cli.estimate_reference`: per-prompt references r_ref(x) for `--lsc.reference label`.

Samples k responses per prompt from the SFT policy (HF `generate` here, OpenRLHF's vLLM engines with
`--vllm.num_engines N`), scores them with one or more reward models (local checkpoints, optionally spread
over Ray actors, or `serve_rm` URLs), and writes to `--output.dir`:

  references.jsonl   every input row whose references all succeeded, plus the label field `--data.label_key`
                     (schema: openrlhf_lsc.references) -> PPO's `--data.prompt_dataset` / `--data.label_key`
  errors.jsonl       the other rows, same format, the failed entries holding `reference: null` and `error`
  report.json        coverage per RM, reference summary, learned predictor's held-out MAE / Spearman
  hist-<rm>.png      histogram of the references of each RM
  shards/            finished work, `--output.shard_size` prompts per file (written atomically)

Rerunning the same command resumes: finished shards are kept, the rest is done, the outputs are assembled
again. `--overwrite` starts over; changed settings without it are an error.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
from tqdm import tqdm

from openrlhf_lsc import estimate

OUTPUTS = ("references.jsonl", "errors.jsonl", "report.json", "run.json")
# Settings that change speed or only the finishing step, not what the shards hold: free to change on resume.
NOT_IN_FINGERPRINT = {
    "output.dir", "overwrite", "rm.batch_size", "rm.num_actors", "rm.num_gpus_per_actor", "rollout.batch_size",
    "vllm.num_engines", "vllm.tensor_parallel_size", "vllm.gpu_memory_utilization", "vllm.enforce_eager",
    "ds.attn_implementation", "learned.holdout", "learned.encoder",
}


def _list(flag: str, kind=str):
    def parse(text: str) -> list:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated {kind.__name__} values, got {text!r}")

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.cli.estimate_reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data.prompt_dataset", required=True, help="JSONL/JSON/CSV/parquet file, save_to_disk folder or HF dataset")
    a("--data.prompt_split", default="train")
    a("--data.input_key", default="input", help="prompt field")
    a("--data.input_template", default=None, help="e.g. 'User: {}\\nAssistant: '")
    a("--data.apply_chat_template", action="store_true", help="format prompts with the policy's chat template")
    a("--data.id_key", default=None, help="unique prompt-id field (default: row index)")
    a("--data.label_key", default="lsc_ref", help="output field holding the references (PPO's --data.label_key)")
    a("--data.max_samples", type=int, default=int(1e8))
    a("--data.max_len", type=int, default=2048, help="prompt + response tokens, and RM query limit")
    a("--actor.model_name_or_path", required=True, help="the SFT policy (its tokenizer formats prompts)")
    a("--rollout.max_new_tokens", type=int, default=1024)
    a("--rollout.temperature", type=float, default=1.0)
    a("--rollout.top_p", type=float, default=1.0)
    a("--rollout.batch_size", type=int, default=8, help="prompts per HF generate call (x k sequences)")
    a("--vllm.num_engines", type=int, default=0, help="vLLM engines (GPU); 0 = HF generate in this process")
    a("--vllm.tensor_parallel_size", type=int, default=1)
    a("--vllm.gpu_memory_utilization", type=float, default=None)
    a("--vllm.enforce_eager", action="store_true")
    a("--rm.paths", type=_list("--rm.paths"), required=True, help="comma-separated RM checkpoints or serve_rm URLs")
    a("--rm.names", type=_list("--rm.names"), default=None, help="comma-separated RM names (default: basenames)")
    a("--rm.batch_size", type=int, default=16, help="queries per RM forward / HTTP request")
    a("--rm.num_actors", type=int, default=0, help="Ray actors per local RM; 0 = score in this process")
    a("--rm.num_gpus_per_actor", type=float, default=1.0)
    a("--reward.normalize_enable", action="store_true", help="as in PPO: references on the normalised scale")
    a("--ds.param_dtype", default="bf16", choices=["bf16", "fp16"])
    a("--ds.attn_implementation", default="sdpa")
    a("--ds.value_head_prefix", default="score")
    a("--ref.method", type=_list("--ref.method"), default=["quantile"],
      help=f"one of {', '.join(estimate.METHODS)} for all RMs, or one per RM")
    a("--ref.q", type=_list("--ref.q", float), default=[0.85], help="quantile level in (0, 1), one or one per RM")
    a("--ref.k", type=int, default=64, help="sampled responses per prompt (paper: 64)")
    a("--ref.quantiles", type=_list("--ref.quantiles", float), default=[], help="extra quantile levels to record")
    a("--ref.canned", default=None, help="JSON list or text file (one per line) of canned responses "
      "(default: variants of \"I can't answer that.\"); the policy's EOS token is appended")
    a("--learned.num_prompts", type=int, default=None, help="prompts to sample when every sampling RM is learned")
    a("--learned.holdout", type=float, default=0.1, help="fraction of sampled prompts held out to measure learned")
    a("--learned.encoder", default=None, help="sentence-transformers folder (default: bundled all-MiniLM-L6-v2)")
    a("--output.dir", required=True)
    a("--output.shard_size", type=int, default=256)
    a("--overwrite", action="store_true", help="delete this tool's outputs in --output.dir and start over")
    a("--seed", type=int, default=42)
    return p


def rm_names(paths: List[str], names: Optional[List[str]]) -> List[str]:
    """RM names from --rm.names, default the basename of each path/URL; duplicates are an error."""
    if names is None:
        names = [os.path.basename(p.rstrip("/")) for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"--rm.names has {len(names)} names for {len(paths)} --rm.paths")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"reward-model names {dup} are not unique: set --rm.names")
    return names


def write_atomic(path: Path, lines: Iterable[str]) -> None:
    """Write text lines to `path` via a temporary file and os.replace (a crash leaves no partial file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for line in lines:
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prepare_dir(out: Path, settings: Dict[str, Any], overwrite: bool) -> None:
    shards = out / "shards"
    if overwrite:
        shutil.rmtree(shards, ignore_errors=True)
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        for png in out.glob("hist-*.png"):
            png.unlink()
    run = out / "run.json"
    if run.exists():
        old = json.loads(run.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        diff.update({k: (v, None) for k, v in old.items() if k not in settings})
        if diff:
            changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(
                f"{out} holds a run with other settings ({changes}): "
                "pass --overwrite to start over or use another --output.dir"
            )
    elif shards.exists() and any(shards.iterdir()):
        raise ValueError(f"{shards} has shards but no run.json: pass --overwrite to start over")
    shards.mkdir(parents=True, exist_ok=True)
    write_atomic(run, [json.dumps(settings, indent=1, sort_keys=True)])


def _canned(path: Optional[str], eos: str) -> List[str]:
    if path is None:
        texts = list(estimate.CANNED_RESPONSES)
    else:
        raw = Path(path).read_text()
        try:
            texts = json.loads(raw)
        except json.JSONDecodeError:
            texts = [line for line in raw.splitlines() if line.strip()]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"--ref.canned {path}: expected a JSON list of non-empty strings or one response per line")
    # Sampled responses end with the policy's EOS (the RM scores at that token), so canned ones do too.
    return [t if t.endswith(eos) else t + eos for t in texts]


def _reward_fn(path: str, args) -> estimate.RewardFn:
    from openrlhf_lsc.integration import estimate_io

    if path.startswith(("http://", "https://")):
        return estimate_io.HttpRewardModel(path, batch_size=args.rm.batch_size)
    kwargs = dict(normalize=args.reward.normalize_enable, param_dtype=args.ds.param_dtype,
                  attn_implementation=args.ds.attn_implementation, value_head_prefix=args.ds.value_head_prefix,
                  max_len=args.data.max_len, batch_size=args.rm.batch_size)
    if args.rm.num_actors > 0:
        return estimate_io.RayRewardModel(path, args.rm.num_actors, args.rm.num_gpus_per_actor, **kwargs)
    return estimate_io.LocalRewardModel(path, **kwargs)


def _sampler(args, tokenizer) -> estimate.Sampler:
    from openrlhf_lsc.integration import estimate_io

    r = args.rollout
    if args.vllm.num_engines > 0:
        return estimate_io.VLLMSampler(
            args.actor.model_name_or_path, tokenizer, r.max_new_tokens, r.temperature, r.top_p, args.data.max_len,
            args.vllm.num_engines, args.vllm.tensor_parallel_size, args.seed, args.vllm.gpu_memory_utilization,
            args.vllm.enforce_eager,
        )
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.ds.param_dtype == "bf16" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(args.actor.model_name_or_path, dtype=dtype, trust_remote_code=True)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return estimate_io.HFSampler(
        model, tokenizer, r.max_new_tokens, r.temperature, r.top_p, args.data.max_len, r.batch_size
    )


def _histogram(path: Path, values: List[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(values, bins=min(50, max(5, len(values) // 10)))
    ax.set(title=title, xlabel="reference r_ref(x)", ylabel="prompts")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def run(args) -> Dict[str, Any]:
    """Run the estimator for parsed (hierarchized) arguments; returns the report."""
    from openrlhf.utils import get_tokenizer

    from openrlhf_lsc.integration import estimate_io

    names = rm_names(args.rm.paths, args.rm.names)
    methods = estimate.per_rm(args.ref.method, names, "--ref.method")
    qs = estimate.per_rm(args.ref.q, names, "--ref.q")
    levels = estimate.check_settings(methods, qs, args.ref.k, args.ref.quantiles)
    if args.output.shard_size < 1:
        raise ValueError(f"--output.shard_size must be >= 1, got {args.output.shard_size}")

    tokenizer = get_tokenizer(args.actor.model_name_or_path, None, "left", None)
    rows, prompts, ids = estimate_io.load_prompts(
        args.data.prompt_dataset, args.data.input_key, args.data.id_key, tokenizer, args.data.apply_chat_template,
        args.data.input_template, args.data.prompt_split, args.data.max_samples,
    )
    if not prompts:
        raise ValueError(f"--data.prompt_dataset {args.data.prompt_dataset} has no rows")
    if args.data.label_key in rows.column_names:
        raise ValueError(
            f"the prompt rows already have a field {args.data.label_key!r}: choose another --data.label_key"
        )
    canned = _canned(args.ref.canned, tokenizer.eos_token) if "canned" in methods.values() else []
    sampled = estimate.sampled_mask(len(prompts), methods, args.learned.num_prompts, args.seed)

    flat = {k: v for k, v in _flatten(args).items() if k not in NOT_IN_FINGERPRINT}
    flat["prompts_sha256"] = hashlib.sha256(json.dumps([prompts, ids], default=str).encode()).hexdigest()
    flat["canned"] = canned
    out = Path(args.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_dir(out, flat, args.overwrite)

    size = args.output.shard_size
    shard_path = lambda s: out / "shards" / f"shard-{s:05d}.jsonl"  # noqa: E731
    num_shards = (len(prompts) + size - 1) // size
    pending = [s for s in range(num_shards) if not shard_path(s).exists()]
    if pending:
        needs_sampling = any(sampled[i] for s in pending for i in range(s * size, min((s + 1) * size, len(prompts))))
        if args.vllm.num_engines > 0 or args.rm.num_actors > 0:
            import ray

            if not ray.is_initialized():
                ray.init()
        sampler = _sampler(args, tokenizer) if needs_sampling else None
        reward_fns = {n: _reward_fn(p, args) for n, p in zip(names, args.rm.paths)}
        done = len(prompts) - sum(min(size, len(prompts) - s * size) for s in pending)
        with tqdm(total=len(prompts), initial=done, unit="prompt", desc="sample and score") as bar:
            for s in pending:
                lo, hi = s * size, min((s + 1) * size, len(prompts))
                torch.manual_seed(args.seed + s)  # a resumed shard draws what an uninterrupted run would
                records = estimate.score_prompts(prompts[lo:hi], sampler, reward_fns, methods, args.ref.k, levels,
                                                 canned, sampled[lo:hi])
                write_atomic(shard_path(s), (json.dumps({"index": lo + j, "id": ids[lo + j], "rms": r})
                                             for j, r in enumerate(records)))
                bar.update(hi - lo)

    records = _read_shards(out, num_shards, len(prompts), shard_path)
    features = None
    if "learned" in methods.values():
        features = estimate_io.embed_prompts(prompts, args.learned.encoder)
    labels, report = estimate.finish(records, methods, qs, features, args.learned.holdout, args.seed)

    key = args.data.label_key
    good, bad = [], []
    for row, label in tqdm(zip(rows, labels), total=len(labels), desc="write output"):
        failed = any(entry["reference"] is None for entry in label.values())
        (bad if failed else good).append(json.dumps({**row, key: label}, default=str))
    write_atomic(out / "references.jsonl", good)
    write_atomic(out / "errors.jsonl", bad)
    for name in names:
        refs = [lab[name]["reference"] for lab in labels if lab[name]["reference"] is not None]
        png = out / f"hist-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        r = report["rms"][name]
        q = "" if r["q"] is None else f" q={r['q']}"
        _histogram(png, refs, f"{name}: {r['method']}{q}, {len(refs)}/{len(labels)} prompts")
        r["histogram"] = png.name
    report.update(output=str(out / "references.jsonl"), rows_written=len(good), rows_with_errors=len(bad))
    write_atomic(out / "report.json", [json.dumps(report, indent=1)])
    return report


def _flatten(ns, prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for k, v in vars(ns).items():
        if hasattr(v, "__dict__"):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _read_shards(out: Path, num_shards: int, num_prompts: int, shard_path) -> List[dict]:
    records: List[Optional[dict]] = [None] * num_prompts
    for s in range(num_shards):
        for line in shard_path(s).read_text().splitlines():
            rec = json.loads(line)
            i = rec["index"]
            if records[i] is not None:
                raise RuntimeError(f"prompt {i} appears twice in {out / 'shards'}: rerun with --overwrite")
            records[i] = rec["rms"]
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:
        raise RuntimeError(f"prompts {missing[:10]} are missing from {out / 'shards'}: rerun with --overwrite")
    return records


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    from openrlhf.utils.config import hierarchize

    args = hierarchize(build_parser().parse_args(argv))
    try:
        report = run(args)
    except ValueError as e:
        sys.exit(f"estimate_reference: error: {e}")
    for name, r in report["rms"].items():
        line = f"{name}: {r['method']} q={r['q']}  references {r['with_reference']}/{r['prompts']}"
        if r["errors"]:
            line += f"  ({r['errors']} errors, see errors.jsonl)"
        if "learned" in r and r["learned"].get("holdout_mae") is not None:
            learned = r["learned"]
            line += f"  learned holdout MAE {learned['holdout_mae']:.4f} Spearman {learned['holdout_spearman']}"
        print(line)
    print(f"wrote {report['output']} ({report['rows_written']} rows, {report['rows_with_errors']} in errors.jsonl)")
    return report


if __name__ == "__main__":
    main()
