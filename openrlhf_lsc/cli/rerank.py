"""`python -m openrlhf_lsc.cli.rerank`: best-of-k with K reward models combined by the reward pipeline.

Samples `--rerank.k` responses per prompt (HF `generate` here, OpenRLHF's vLLM engines with `--vllm.num_engines N`),
scores each with every reward model in `--rm.paths` (local checkpoints, optionally on Ray actors, or `serve_rm`
URLs), and keeps, per prompt, the candidate of highest utility (`--lsc.*`, as in PPO; ties -> the first sampled).
Writes to `--output.dir`:

  reranked.jsonl   each input row plus `--output.response_key` (the chosen response, EOS kept as the RMs scored it)
                   and `rerank`: {"index", "utility", "scores" {rm: score}, "candidates": [{"response", "scores",
                   "utility"}, ...k]}
  errors.jsonl     rows that could not be reranked (empty prompt, a candidate without a finite score, a bad
                   reference label), with `rerank: {"error": ...}`
  report.json      per RM: mean score of the chosen vs all candidates; mean chosen utility; counts
  shards/          sampled responses and their scores, `--output.shard_size` prompts per file (written atomically)

Rerunning the same command resumes from the shards. The `--lsc.*` settings only rerank the stored samples and
scores: change them and rerun to compare AND / weighted / raw on the same candidates without sampling again.
`--overwrite` starts over; other changed settings without it are an error.
"""

import argparse
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from tqdm import tqdm

from openrlhf_lsc.cli.estimate_reference import _flatten, _list, _reward_fn, _sampler, rm_names, write_atomic
from openrlhf_lsc.references import references_from_labels
from openrlhf_lsc.rerank import rerank
from openrlhf_lsc.rewards import AGGREGATES, REFERENCES, TRANSFORMS, RewardSpec

OUTPUTS = ("reranked.jsonl", "errors.jsonl", "report.json", "run.json")
# Settings that change speed or only the reranking of stored scores, not what the shards hold.
NOT_IN_FINGERPRINT = {
    "output.dir", "output.response_key", "overwrite", "data.label_key", "rm.batch_size", "rm.num_actors",
    "rm.num_gpus_per_actor", "rollout.batch_size", "vllm.num_engines", "vllm.tensor_parallel_size",
    "vllm.gpu_memory_utilization", "vllm.enforce_eager", "ds.attn_implementation",
}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.cli.rerank", description=__doc__, formatter_class=_Formatter)
    a = p.add_argument
    a("--data.prompt_dataset", required=True, help="JSONL/JSON/CSV/parquet file, save_to_disk folder or HF dataset")
    a("--data.prompt_split", default="train")
    a("--data.input_key", default="input", help="prompt field")
    a("--data.input_template", default=None, help="e.g. 'User: {}\\nAssistant: '")
    a("--data.apply_chat_template", action="store_true", help="format prompts with the policy's chat template")
    a("--data.id_key", default=None, help="unique prompt-id field (default: row index)")
    a("--data.label_key", default="lsc_ref", help="field holding reference labels (estimate_reference's output), "
      "read with --lsc.reference label")
    a("--data.max_samples", type=int, default=int(1e8))
    a("--data.max_len", type=int, default=2048, help="prompt + response tokens, and RM query limit")
    a("--actor.model_name_or_path", required=True, help="the policy to sample from (its tokenizer formats prompts)")
    a("--rerank.k", type=int, default=16, help="candidates sampled per prompt")
    a("--rollout.max_new_tokens", type=int, default=1024)
    a("--rollout.temperature", type=float, default=1.0)
    a("--rollout.top_p", type=float, default=1.0)
    a("--rollout.batch_size", type=int, default=8, help="prompts per HF generate call (x k sequences)")
    a("--vllm.num_engines", type=int, default=0, help="vLLM engines (GPU); 0 = HF generate in this process")
    a("--vllm.tensor_parallel_size", type=int, default=1)
    a("--vllm.gpu_memory_utilization", type=float, default=None)
    a("--vllm.enforce_eager", action="store_true")
    a("--rm.paths", type=_list("--rm.paths"), required=True, help="comma-separated RM checkpoints or serve_rm URLs")
    a("--rm.names", type=_list("--rm.names"), default=None, help="comma-separated RM names (default: basenames); "
      "also the keys of the reference labels")
    a("--rm.batch_size", type=int, default=16, help="queries per RM forward / HTTP request")
    a("--rm.num_actors", type=int, default=0, help="Ray actors per local RM; 0 = score in this process")
    a("--rm.num_gpus_per_actor", type=float, default=1.0)
    a("--reward.normalize_enable", action="store_true", help="score with the RMs' normalisation, as PPO does")
    a("--ds.param_dtype", default="bf16", choices=["bf16", "fp16"])
    a("--ds.attn_implementation", default="sdpa")
    a("--ds.value_head_prefix", default="score")
    a("--lsc.transform", default="lsc", choices=TRANSFORMS, help="per-RM utility: lsc log σ(r − r_ref), "
      "sigmoid σ(r − r_ref), center r − r_ref, logsigmoid log σ(r), raw r")
    a("--lsc.aggregate", default="and", choices=AGGREGATES, help="and: Σ_k u_k; weighted: Σ_k w_k u_k")
    a("--lsc.weights", type=_list("--lsc.weights", float), default=None, help="K weights for weighted")
    a("--lsc.reference", default="group", choices=REFERENCES, help="label: per prompt from --data.label_key; "
      "group: --lsc.quantile of the prompt's own k candidates; constant: --lsc.reference_value")
    a("--lsc.quantile", type=float, default=None, help="quantile for group (default 0.5 with group)")
    a("--lsc.reference_value", type=_list("--lsc.reference_value", float), default=None, help="K constants")
    a("--output.dir", required=True)
    a("--output.response_key", default="response", help="output field for the chosen response")
    a("--output.shard_size", type=int, default=256)
    a("--overwrite", action="store_true", help="delete this tool's outputs in --output.dir and start over")
    a("--seed", type=int, default=42)
    return p


def reward_spec(args, names: List[str]) -> RewardSpec:
    """The `RewardSpec` of the `--lsc.*` flags (raises ValueError naming the flag)."""
    lsc = args.lsc
    quantile = lsc.quantile if lsc.quantile is not None or lsc.reference != "group" else 0.5
    return RewardSpec(names=tuple(names), transform=lsc.transform, aggregate=lsc.aggregate, weights=lsc.weights,
                      reference=lsc.reference, quantile=quantile, reference_value=lsc.reference_value,
                      label_key=args.data.label_key)


def _prepare_dir(out: Path, settings: Dict[str, Any], overwrite: bool) -> None:
    shards = out / "shards"
    if overwrite:
        shutil.rmtree(shards, ignore_errors=True)
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    run = out / "run.json"
    if run.exists():
        old = json.loads(run.read_text())
        diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        if diff:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"{out} holds a run with other settings ({changes}): pass --overwrite to start over "
                             "or use another --output.dir")
    elif shards.exists() and any(shards.iterdir()):
        raise ValueError(f"{shards} has shards but no run.json: pass --overwrite to start over")
    shards.mkdir(parents=True, exist_ok=True)
    write_atomic(run, [json.dumps(settings, indent=1, sort_keys=True)])


def sample_and_score(prompts: List[str], sampler, reward_fns: Dict[str, Any], k: int) -> List[Dict[str, Any]]:
    """k candidates per prompt and every RM's score of each: one shard's records (None marks a failed score)."""
    records: List[Dict[str, Any]] = [{"error": "empty prompt"} if not p.strip() else {} for p in prompts]
    live = [i for i, p in enumerate(prompts) if p.strip()]
    if not live:
        return records
    responses = sampler([prompts[i] for i in live], k)
    if len(responses) != len(live) or any(len(r) != k for r in responses):
        raise RuntimeError(f"sampler returned {[len(r) for r in responses]} responses for {len(live)} prompts, expected {k} each")
    flat_p = [prompts[i] for i in live for _ in range(k)]
    flat_r = [r for rs in responses for r in rs]
    for i, rs in zip(live, responses):
        records[i] = {"responses": rs, "scores": {}}
    for name, fn in reward_fns.items():
        scores = list(fn(flat_p, flat_r))
        if len(scores) != len(flat_p):
            raise RuntimeError(f"reward model {name!r} returned {len(scores)} scores for {len(flat_p)} responses")
        for j, i in enumerate(live):
            row = scores[j * k : (j + 1) * k]
            records[i]["scores"][name] = [float(v) if v is not None and math.isfinite(float(v)) else None for v in row]
    return records


def finish(records: List[Dict[str, Any]], spec: RewardSpec, labels: Optional[List[Any]], where: List[str]):
    """Rerank the stored candidates: returns (results per prompt, each {"rerank": ...} or {"error": ...}; report)."""
    names = spec.names
    results: List[Dict[str, Any]] = [{} for _ in records]
    good = []
    for i, rec in enumerate(records):
        if "error" in rec:
            results[i] = {"error": rec["error"]}
            continue
        failed = [(n, j) for n in names for j, v in enumerate(rec["scores"][n]) if v is None]
        if failed:
            n, j = failed[0]
            results[i] = {"error": f"reward model {n!r} gave no finite score for candidate {j} "
                                   f"({len(failed)} failed scores)"}
            continue
        if spec.reference == "label":
            try:
                references_from_labels([labels[i]], names, spec.label_key, [where[i]])
            except ValueError as e:
                results[i] = {"error": str(e)}
                continue
        good.append(i)
    report: Dict[str, Any] = {"prompts": len(records), "reranked": len(good), "errors": len(records) - len(good)}
    if not good:
        return results, report
    scores = torch.tensor([[[records[i]["scores"][n][j] for n in names] for j in range(len(records[i]["responses"]))]
                           for i in good], dtype=torch.float64)
    chosen, utility = rerank(scores, spec, [labels[i] for i in good] if spec.reference == "label" else None,
                             [where[i] for i in good])
    for row, i in enumerate(good):
        c, rec = chosen[row].item(), records[i]
        candidates = [{"response": r, "scores": {n: rec["scores"][n][j] for n in names}, "utility": utility[row, j].item()}
                      for j, r in enumerate(rec["responses"])]
        results[i] = {"response": rec["responses"][c], "rerank": {"index": c, "utility": utility[row, c].item(),
                                                                  "scores": candidates[c]["scores"],
                                                                  "candidates": candidates}}
    picked = scores[torch.arange(len(good)), chosen]  # [P, K]
    report["rms"] = {n: {"chosen_mean": picked[:, j].mean().item(), "candidates_mean": scores[:, :, j].mean().item()}
                     for j, n in enumerate(names)}
    report["utility"] = {"chosen_mean": utility.max(1).values.mean().item(), "candidates_mean": utility.mean().item()}
    return results, report


def run(args) -> Dict[str, Any]:
    """Run the reranker for parsed (hierarchized) arguments; returns the report."""
    from openrlhf.utils import get_tokenizer

    from openrlhf_lsc.integration import estimate_io

    names = rm_names(args.rm.paths, args.rm.names)
    spec = reward_spec(args, names)
    k = args.rerank.k
    if k < 1 or (spec.reference == "group" and k < 2):
        raise ValueError(f"--rerank.k must be >= 1 (>= 2 for --lsc.reference group), got {k}")
    if args.output.shard_size < 1:
        raise ValueError(f"--output.shard_size must be >= 1, got {args.output.shard_size}")

    tokenizer = get_tokenizer(args.actor.model_name_or_path, None, "left", None)
    rows, prompts, ids = estimate_io.load_prompts(
        args.data.prompt_dataset, args.data.input_key, args.data.id_key, tokenizer, args.data.apply_chat_template,
        args.data.input_template, args.data.prompt_split, args.data.max_samples,
    )
    if not prompts:
        raise ValueError(f"--data.prompt_dataset {args.data.prompt_dataset} has no rows")
    for key in (args.output.response_key, "rerank"):
        if key in rows.column_names:
            raise ValueError(f"the prompt rows already have a field {key!r}: choose another --output.response_key "
                             "or rename the field")
    labels = None
    if spec.reference == "label":
        if args.data.label_key not in rows.column_names:
            raise ValueError(f"--lsc.reference label reads the field {args.data.label_key!r} (--data.label_key), which "
                             f"the rows of {args.data.prompt_dataset} do not have; fields: {sorted(rows.column_names)}")
        labels = list(rows[args.data.label_key])

    flat = {key: v for key, v in _flatten(args).items() if key not in NOT_IN_FINGERPRINT and not key.startswith("lsc.")}
    flat["prompts_sha256"] = hashlib.sha256(json.dumps([prompts, ids], default=str).encode()).hexdigest()
    out = Path(args.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_dir(out, flat, args.overwrite)

    size = args.output.shard_size
    shard_path = lambda s: out / "shards" / f"shard-{s:05d}.jsonl"  # noqa: E731
    num_shards = (len(prompts) + size - 1) // size
    pending = [s for s in range(num_shards) if not shard_path(s).exists()]
    if pending:
        if args.vllm.num_engines > 0 or args.rm.num_actors > 0:
            import ray

            if not ray.is_initialized():
                ray.init()
        sampler = _sampler(args, tokenizer)
        reward_fns = {n: _reward_fn(p, args) for n, p in zip(names, args.rm.paths)}
        done = len(prompts) - sum(min(size, len(prompts) - s * size) for s in pending)
        with tqdm(total=len(prompts), initial=done, unit="prompt", desc="sample and score") as bar:
            for s in pending:
                lo, hi = s * size, min((s + 1) * size, len(prompts))
                torch.manual_seed(args.seed + s)  # a resumed shard draws what an uninterrupted run would
                records = sample_and_score(prompts[lo:hi], sampler, reward_fns, k)
                write_atomic(shard_path(s), (json.dumps({"index": lo + j, "id": ids[lo + j], **r})
                                             for j, r in enumerate(records)))
                bar.update(hi - lo)

    records: List[Optional[Dict[str, Any]]] = [None] * len(prompts)
    for s in range(num_shards):
        for line in shard_path(s).read_text().splitlines():
            rec = json.loads(line)
            if records[rec["index"]] is not None:
                raise RuntimeError(f"prompt {rec['index']} appears twice in {out / 'shards'}: rerun with --overwrite")
            records[rec["index"]] = rec
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:
        raise RuntimeError(f"prompts {missing[:10]} are missing from {out / 'shards'}: rerun with --overwrite")

    where = [f"row {i} (id {ids[i]!r})" for i in range(len(prompts))]
    results, report = finish(records, spec, labels, where)
    good, bad = [], []
    for row, res in tqdm(zip(rows, results), total=len(results), desc="write output"):
        if "error" in res:
            bad.append(json.dumps({**row, "rerank": {"error": res["error"]}}, default=str))
        else:
            good.append(json.dumps({**row, args.output.response_key: res["response"], "rerank": res["rerank"]},
                                   default=str))
    write_atomic(out / "reranked.jsonl", good)
    write_atomic(out / "errors.jsonl", bad)
    report.update(k=k, spec={key: v for key, v in vars(spec).items()}, output=str(out / "reranked.jsonl"))
    write_atomic(out / "report.json", [json.dumps(report, indent=1)])
    return report


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    from openrlhf.utils.config import hierarchize

    args = hierarchize(build_parser().parse_args(argv))
    try:
        report = run(args)
    except ValueError as e:
        print(f"rerank: error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, r in report.get("rms", {}).items():
        print(f"{name}: chosen mean {r['chosen_mean']:.4f} vs all candidates {r['candidates_mean']:.4f}")
    print(f"wrote {report['output']} ({report['reranked']} prompts, {report['errors']} in errors.jsonl)")
    return report


if __name__ == "__main__":
    main()
