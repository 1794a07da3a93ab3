"""The offline tools' one pipeline (`estimate_reference`, `rerank`): sample k responses per prompt -> score them with
every reward model -> keep them shard by shard in `--output.dir` -> resume after an interruption. Also the flags and
checks of that pipeline, which both tools take from here.

A run folder holds `run.json` (the settings the shards depend on: a rerun with other ones is refused unless
`--overwrite`), `shards/shard-NNNNN.jsonl` (finished prompts, one JSON object each with its `index`, each shard
written atomically) and the tool's output set (`common.publish`).
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterable, List, Optional

from openrlhf_lsc.cli.common import (
    check_dataset, check_model, check_reward_model, check_template, integer, listed, number, unpublish,
)
from openrlhf_lsc.files import write_atomic
from openrlhf_lsc.serve_rm import RewardServerError, ServeRMClient


def add_sampling_and_scoring_flags(a: Callable) -> None:
    """The flags of sampling (HF generate or vLLM engines) and scoring (reward models), as `parser.add_argument`."""
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


# Flags that change speed, error handling or placement, not what the shards hold.
NOT_IN_SETTINGS = {
    "output.dir", "overwrite", "debug", "rm.batch_size", "rm.num_actors", "rm.num_gpus_per_actor", "rm.timeout",
    "rm.retries", "rollout.batch_size", "vllm.num_engines", "vllm.tensor_parallel_size", "vllm.gpu_memory_utilization",
    "vllm.enforce_eager", "ds.attn_implementation",
}


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


def check_sampling_and_scoring(args, names: List[str], sampling: bool) -> Dict[str, ServeRMClient]:
    """The checks of the prompt, policy, reward-model and placement flags, before anything loads.

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


def probe(clients: Iterable[ServeRMClient], flag: str) -> None:
    """Each reward server answers one query now: a wrong URL fails before anything loads (one line naming `flag`)."""
    for client in clients:
        try:
            client.score(["Hello"])
        except RewardServerError as e:
            raise ValueError(f"{flag}: {e}") from None


def load_prompts(args):
    """(tokenizer, rows, prompt texts, ids) of `--data.*` as train_ppo_ray reads them, with the policy's tokenizer."""
    from openrlhf_lsc.integration import offline

    tokenizer = offline.load_tokenizer(args.actor.model_name_or_path, "--actor.model_name_or_path")
    d = args.data
    rows, prompts, ids = offline.load_prompts(d.prompt_dataset, d.input_key, d.id_key, tokenizer,
                                              d.apply_chat_template, d.input_template, d.prompt_split, d.max_samples)
    return tokenizer, rows, prompts, ids


def settings(args, prompts: List[str], ids: List[Any], skip: Iterable[str] = (), **extra) -> Dict[str, Any]:
    """What a run's shards depend on: every flag except `NOT_IN_SETTINGS` and `skip` (names or `group.` prefixes), a
    hash of the prompts and ids, and `extra`."""
    def flatten(ns, prefix=""):
        for k, v in vars(ns).items():
            yield from flatten(v, f"{prefix}{k}.") if isinstance(v, SimpleNamespace) else [(f"{prefix}{k}", v)]

    skip = tuple(skip)
    out = {k: v for k, v in flatten(args) if k not in NOT_IN_SETTINGS and not k.startswith(skip)}
    out["prompts_sha256"] = hashlib.sha256(json.dumps([prompts, ids], default=str).encode()).hexdigest()
    return {**out, **extra}


def reward_fn(name: str, path: str, args, clients: Dict[str, ServeRMClient]):
    """`fn(prompts, responses) -> scores` of one `--rm.paths` entry: its serve_rm client, or the checkpoint loaded
    here or on `--rm.num_actors` Ray actors. A server's unusable answer fails only these prompts (`ScoreError`,
    retried on a rerun); a server that stays down stops the run."""
    from openrlhf_lsc import estimate
    from openrlhf_lsc.integration import offline

    if name in clients:
        client = clients[name]

        def score(prompts, responses):
            try:
                return client.score([p + r for p, r in zip(prompts, responses)], prompts=prompts)
            except RewardServerError as e:
                if e.transient:
                    raise
                raise estimate.ScoreError(str(e)) from None

        return score
    kwargs = dict(normalize=args.reward.normalize_enable, param_dtype=args.ds.param_dtype,
                  attn_implementation=args.ds.attn_implementation, value_head_prefix=args.ds.value_head_prefix,
                  max_len=args.data.max_len, batch_size=args.rm.batch_size)
    if args.rm.num_actors > 0:
        return offline.RayRewardModel(path, args.rm.num_actors, args.rm.num_gpus_per_actor, **kwargs)
    return offline.LocalRewardModel(path, **kwargs)


def lazy(make: Callable[[], Callable]) -> Callable:
    """A callable that builds its target on the first call: a rerun with little left to do loads only what it needs."""
    made = []

    def call(*args):
        if not made:
            made.append(make())
        return made[0](*args)

    return call


class ShardedRun:
    """The resumable work of one offline run in `out`: `run.json` and `shards/` (module docstring).

    Args:
        out: the run folder (`--output.dir`).
        settings: what the shards depend on (`settings()`); a run.json with other settings is refused.
        overwrite: start over (`--overwrite`): remove the shards, run.json and the published outputs first.
        total: number of prompts. shard_size: prompts per shard (`--output.shard_size`).
    """

    def __init__(self, out: Path, settings: Dict[str, Any], overwrite: bool, total: int, shard_size: int):
        self.out, self.total, self.size = Path(out), total, shard_size
        self.shards, run = self.out / "shards", self.out / "run.json"
        self.out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            shutil.rmtree(self.shards, ignore_errors=True)
            run.unlink(missing_ok=True)
            unpublish(self.out)
        if run.exists():
            old = json.loads(run.read_text())
            diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
            if diff:
                changes = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
                raise ValueError(f"{self.out} holds a run with other settings ({changes}): pass --overwrite to start "
                                 "over or use another --output.dir")
        elif self.shards.exists() and any(self.shards.iterdir()):
            raise ValueError(f"{self.shards} has shards but no run.json: pass --overwrite to start over")
        self.shards.mkdir(parents=True, exist_ok=True)
        write_atomic(run, json.dumps(settings, indent=1, sort_keys=True))

    def path(self, s: int) -> Path:
        return self.shards / f"shard-{s:05d}.jsonl"

    def read(self, s: int) -> Dict[int, dict]:
        """Shard s's records by prompt index ({} when it is not written yet)."""
        path = self.path(s)
        return {r["index"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}

    def todo(self, redo: Optional[Callable[[dict], bool]] = None) -> Dict[int, List[int]]:
        """shard -> the prompt indices to (re)do: all of a shard not written yet, and those of a written one whose
        record `redo(record)` marks (failures a rerun may fix)."""
        out = {}
        for s in range((self.total + self.size - 1) // self.size):
            old = self.read(s)
            idx = list(range(s * self.size, min((s + 1) * self.size, self.total))) if not old else \
                [i for i, r in old.items() if redo is not None and redo(r)]
            if idx:
                out[s] = idx
        return out

    def work(self, todo: Dict[int, List[int]], do: Callable[[int, List[int], Dict[int, dict]], Dict[int, dict]],
             tool: str, desc: str) -> None:
        """`do(shard, indices, old records) -> the shard's records by index` for every shard of `todo`, each written
        as it finishes. A reward server that stays down ends the run with exit 1, finished shards kept."""
        from tqdm import tqdm

        with tqdm(total=self.total, initial=self.total - sum(map(len, todo.values())), unit="prompt", desc=desc) as bar:
            for s, idx in todo.items():
                try:
                    records = do(s, idx, self.read(s))
                except RewardServerError as e:
                    sys.stderr.write(f"{tool}: error: {e}\n{tool}: {bar.n} of {self.total} prompts are done and kept "
                                     f"in {self.shards}: rerun the same command to continue\n")
                    sys.exit(1)
                write_atomic(self.path(s), (json.dumps(records[i]) for i in sorted(records)))
                bar.update(len(idx))

    def records(self) -> List[dict]:
        """Every prompt's record, in prompt order (a prompt missing or present twice: rerun with --overwrite)."""
        records: List[Optional[dict]] = [None] * self.total
        for s in range((self.total + self.size - 1) // self.size):
            for line in self.path(s).read_text().splitlines() if self.path(s).exists() else []:
                rec = json.loads(line)
                if records[rec["index"]] is not None:
                    raise ValueError(f"prompt {rec['index']} appears twice in {self.shards}: rerun with --overwrite")
                records[rec["index"]] = rec
        missing = [i for i, r in enumerate(records) if r is None]
        if missing:
            raise ValueError(f"prompts {missing[:10]} are missing from {self.shards}: rerun with --overwrite")
        return records


def start_ray(args) -> None:
    """Ray for vLLM engines or reward-model actors (joins a running cluster, else starts one)."""
    if args.vllm.num_engines > 0 or args.rm.num_actors > 0:
        import ray

        if not ray.is_initialized():
            ray.init()
