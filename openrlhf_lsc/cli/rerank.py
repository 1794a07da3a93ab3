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

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch
from tqdm import tqdm

from openrlhf_lsc.cli import pipeline
from openrlhf_lsc.cli.common import (
    Parser, add_reward_flags, check_output_dir, guard, integer, listed, publish, reward_spec,
)
from openrlhf_lsc.estimate import sample_and_score
from openrlhf_lsc.files import write_atomic
from openrlhf_lsc.references import par_references_from_labels, references_from_labels
from openrlhf_lsc.rerank import rerank
from openrlhf_lsc.rewards import RewardSpec

TOOL = "rerank"


def build_parser() -> Parser:
    p = Parser(TOOL, __doc__)
    a = p.add_argument
    a("--data.prompt_dataset", required=True, help="JSONL/JSON/CSV/parquet file, save_to_disk folder or HF dataset")
    a("--data.prompt_split", default="train", help="split to read from datasets with several")
    a("--data.input_key", default="input", help="prompt field")
    a("--data.input_template", default=None, help="prompt template with one {}, e.g. 'User: {}\\nAssistant: '")
    a("--data.apply_chat_template", action="store_true", help="format prompts with the policy's chat template")
    a("--data.id_key", default=None, help="unique prompt-id field, used in errors and outputs; None: the row index")
    a("--data.label_key", default="lsc_ref", help="field holding reference labels (estimate_reference's output), "
      "read with --lsc.reference label")
    a("--data.max_samples", type=integer(1), default=int(1e8), help="read at most this many prompts")
    a("--data.max_len", type=integer(2), default=2048, help="prompt + response tokens, and RM query limit")
    a("--actor.model_name_or_path", required=True, help="the policy to sample from (its tokenizer formats prompts)")
    a("--rerank.k", type=integer(1), default=16, help="candidates sampled per prompt (>= 2 for --lsc.reference group)")
    pipeline.add_sampling_and_scoring_flags(a)
    a("--rm.names", type=listed(str, "names"), default=None,
      help="comma-separated RM names, also the keys of the reference labels; None: the basename of each path")
    a("--reward.normalize_enable", action="store_true", help="score with the RMs' normalisation, as PPO does")
    a("--ds.param_dtype", default="bf16", choices=["bf16", "fp16"], help="dtype of local models")
    a("--ds.attn_implementation", default="sdpa", help="attention of local models (eager, sdpa, flash_attention_2)")
    a("--ds.value_head_prefix", default="score", help="name of the reward models' value head")
    add_reward_flags(a, transform="lsc", reference="group", group="the prompt's own k candidates")
    a("--output.dir", required=True, help="output folder (created if missing)")
    a("--output.response_key", default="response", help="output field for the chosen response")
    a("--output.shard_size", type=integer(1), default=256, help="prompts per saved shard of sampled and scored work")
    a("--overwrite", action="store_true", help="delete this tool's outputs in --output.dir and start over")
    a("--seed", type=int, default=42, help="seeds sampling (each shard by its index)")
    return p


def check_args(args) -> SimpleNamespace:
    """Every cross-flag and path check, before anything loads; returns what they derive."""
    names = pipeline.rm_names(args.rm.paths, args.rm.names)
    spec = reward_spec(names, args.lsc, args.data.label_key)
    if spec.reference == "group" and args.rerank.k < 2:
        raise ValueError(f"--rerank.k must be >= 1 (>= 2 for --lsc.reference group), got {args.rerank.k}")
    clients = pipeline.check_sampling_and_scoring(args, names, sampling=True)
    check_output_dir("--output.dir", args.output.dir)
    return SimpleNamespace(names=names, spec=spec, clients=clients)


def candidates(prompts: List[str], sampler, reward_fns: Dict[str, Any], k: int) -> List[Dict[str, Any]]:
    """k candidates per prompt and every RM's score of each: one shard's records (None marks a failed score)."""
    records: List[Dict[str, Any]] = [{"error": "empty prompt"} if not p.strip() else {} for p in prompts]
    live = [i for i, p in enumerate(prompts) if p.strip()]
    if not live:
        return records
    responses, scored = sample_and_score([prompts[i] for i in live], sampler, reward_fns, k)
    for j, (i, rs) in enumerate(zip(live, responses)):
        records[i] = {"responses": rs, "scores": {name: [v if math.isfinite(v) else None for v in scores[j].tolist()]
                                                  for name, (scores, _) in scored.items()}}
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
                if spec.par_m is not None:  # par reads M SFT scores per reward model instead of one reference
                    par_references_from_labels([labels[i]], names, spec.label_key, spec.par_m, [where[i]])
                else:
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


def run(args, checked: SimpleNamespace) -> Dict[str, Any]:
    """Run the reranker for parsed, checked arguments; returns the report."""
    from openrlhf_lsc.integration import samplers

    names, spec, k = checked.names, checked.spec, args.rerank.k
    pipeline.probe(checked.clients.values(), "--rm.paths")
    tokenizer, rows, prompts, ids = pipeline.load_prompts(args)
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

    out = Path(args.output.dir)
    skip = ("lsc.", "output.response_key", "data.label_key")  # shards hold samples and scores: --lsc.* rerank them
    run = pipeline.ShardedRun(out, pipeline.settings(args, prompts, ids, skip), args.overwrite, len(prompts),
                              args.output.shard_size)
    todo = run.todo()
    if todo:
        pipeline.start_ray(args)
        sampler = samplers.from_args(args, tokenizer)
        reward_fns = {n: pipeline.reward_fn(n, p, args, checked.clients) for n, p in zip(names, args.rm.paths)}

        def do(s, idx, old):
            torch.manual_seed(args.seed + s)  # a resumed shard draws what an uninterrupted run would
            return {i: {"index": i, "id": ids[i], **r}
                    for i, r in zip(idx, candidates([prompts[i] for i in idx], sampler, reward_fns, k))}

        run.work(todo, do, TOOL, "sample and score")
    records = run.records()

    where = [f"row {i} (id {ids[i]!r})" for i in range(len(prompts))]
    results, report = finish(records, spec, labels, where)
    good, bad = [], []
    for row, res in tqdm(zip(rows, results), total=len(results), desc="write output"):
        if "error" in res:
            bad.append(json.dumps({**row, "rerank": {"error": res["error"]}}, default=str))
        else:
            good.append(json.dumps({**row, args.output.response_key: res["response"], "rerank": res["rerank"]},
                                   default=str))
    report.update(k=k, spec={key: v for key, v in vars(spec).items()}, output=str(out / "reranked.jsonl"))

    def write(folder: Path) -> None:
        write_atomic(folder / "reranked.jsonl", good)
        write_atomic(folder / "errors.jsonl", bad)
        write_atomic(folder / "report.json", json.dumps(report, indent=1))

    publish(out, write)
    return report


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """The CLI: user errors exit 2 with one line (`--debug` shows the traceback)."""
    args = build_parser().parse(argv)
    report = guard(TOOL, args.debug, lambda: run(args, check_args(args)))
    for name, r in report.get("rms", {}).items():
        print(f"{name}: chosen mean {r['chosen_mean']:.4f} vs all candidates {r['candidates_mean']:.4f}")
    print(f"wrote {report['output']} ({report['reranked']} prompts, {report['errors']} in errors.jsonl)")
    return report


if __name__ == "__main__":
    main()
