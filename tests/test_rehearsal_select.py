"""Selective Rehearsal selection: planted clusters and planted scores give exactly the expected prompts/pairs;
the CLI with the real offline MiniLM encoder, a tiny reward model, caching/resume and bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_lsc.rehearsal import cluster_prompts, select

# Three planted topics (templated prompts): the encoder must put each topic in its own cluster.
TOPICS = {
    "cooking": [f"Recipe question: how do I cook {d} in my kitchen?" for d in
                ("rice", "pasta", "tomato soup", "chicken curry", "bread", "pancakes")],
    "astronomy": [f"Astronomy question: how far from Earth is the planet {p} in our solar system?" for p in
                  ("Mars", "Jupiter", "Saturn", "Venus", "Mercury", "Neptune")],
    "programming": [f"Programming question: how do I parse a JSON file in the {x} programming language?" for x in
                    ("Python", "Java", "Rust", "Go", "C++", "Ruby")],
}


def _expected(scores, clusters, k, fraction=None, threshold=None):
    """Reference selection written independently of the code under test (plain Python sorting)."""
    ppo, reh = set(), []
    for c in sorted(set(clusters)):
        rows = [i for i in range(len(scores)) if clusters[i] == c]
        by_score = sorted(rows, key=lambda i: (scores[i], i))
        reh += sorted(rows, key=lambda i: (-scores[i], i))[:k]
        ppo |= set(by_score[: math.ceil(fraction * len(rows))]) if fraction else {i for i in rows if scores[i] < threshold}
    return sorted(ppo), reh


def test_planted_selection_fraction_and_threshold():
    clusters = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    scores = np.array([0.9, -1.0, 0.2, 0.5, 3.0, 2.0, 2.5, -0.3, 0.1, -2.0, 1.5, 0.0])
    sel = select(scores, clusters, rehearsal_k=2, ppo_fraction=0.5)
    assert sel.ppo == [1, 2, 5, 6, 7, 9, 11]  # ceil(0.5 * 4, 3, 5) = 2, 2, 3 lowest per cluster
    assert sel.rehearsal == [0, 3, 4, 6, 10, 8]
    assert [s["n_both"] for s in sel.clusters] == [0, 1, 0]  # cluster 1: 2.5 is second best and second lowest
    sel = select(scores, clusters, rehearsal_k=1, ppo_threshold=0.15)
    assert sel.ppo == [1, 7, 8, 9, 11] and sel.rehearsal == [0, 4, 10]
    assert [s["n_ppo"] for s in sel.clusters] == [1, 0, 4]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5).flatmap(lambda c: st.tuples(
    st.lists(st.integers(0, c - 1), min_size=c, max_size=40).filter(lambda xs: len(set(xs)) == c),
    st.integers(0, 1_000_000), st.floats(0.05, 1.0), st.integers(0, 2))))
def test_selection_matches_reference_on_random_inputs(case):
    clusters, seed, fraction, k = case
    k = min(k, min(np.bincount(clusters)))
    scores = np.round(np.random.default_rng(seed).normal(size=len(clusters)), 1)  # rounding plants ties
    sel = select(scores, np.array(clusters), k, ppo_fraction=fraction)
    assert (sel.ppo, sel.rehearsal) == _expected(scores, clusters, k, fraction=fraction)
    threshold = float(np.median(scores))
    sel = select(scores, np.array(clusters), k, ppo_threshold=threshold)
    assert (sel.ppo, sel.rehearsal) == _expected(scores, clusters, k, threshold=threshold)


def test_kmeans_recovers_planted_blobs_and_is_seeded():
    g = np.random.default_rng(0)
    centers = g.normal(size=(4, 16)) * 10
    truth = np.repeat(np.arange(4), [5, 9, 3, 7])
    x = centers[truth] + g.normal(size=(len(truth), 16)) * 0.1
    labels = cluster_prompts(x, 4, seed=1)
    # Same partition as planted (ids may be permuted).
    assert len({(t, l) for t, l in zip(truth, labels)}) == 4 and len(set(labels)) == 4
    assert (cluster_prompts(x, 4, seed=1) == labels).all()


def test_bad_selection_input_is_named():
    with pytest.raises(ValueError, match="only 2 distinct prompt embeddings for --select.n_clusters 3"):
        cluster_prompts(np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), 3, seed=0)
    with pytest.raises(ValueError, match=r"--select.n_clusters must be in \[1, 3\]"):
        cluster_prompts(np.eye(3), 4, seed=0)
    clusters, scores = np.array([0, 0, 0, 1]), np.zeros(4)
    with pytest.raises(ValueError, match="cluster 1 has 1 prompts, fewer than --select.rehearsal_k 2"):
        select(scores, clusters, 2, ppo_fraction=0.5)
    with pytest.raises(ValueError, match=r"clusters \[1\] are empty"):
        select(scores, np.array([0, 0, 2, 2]), 1, ppo_fraction=0.5)
    with pytest.raises(ValueError, match="exactly one of --select.ppo_threshold and --select.ppo_fraction"):
        select(scores, clusters, 1)
    with pytest.raises(ValueError, match="row 2 has nan"):
        select(np.array([0, 1, np.nan, 0]), clusters, 1, ppo_fraction=0.5)
    for threshold in (float("nan"), float("inf")):  # nan once gave an empty PPO set without a word
        with pytest.raises(ValueError, match="--select.ppo_threshold must be a finite number"):
            select(scores, clusters, 1, ppo_threshold=threshold)
    with pytest.raises(ValueError, match="--select.ppo_fraction must be in"):
        select(scores, clusters, 1, ppo_fraction=float("nan"))
    with pytest.raises(ValueError, match="--select.rehearsal_k must be an integer >= 0, got 1.5"):
        select(scores, clusters, 1.5, ppo_fraction=0.5)


# ---------------------------------------------------------------- CLI


def _topic_rows():
    g = np.random.default_rng(5)
    rows = []
    for topic, prompts in TOPICS.items():
        for p in prompts:
            rows.append({"input": p, "output": f"An expert answer about {topic}.", "topic": topic,
                         "am": round(float(g.normal()), 3)})
    order = g.permutation(len(rows))  # topics interleaved in the file
    return [rows[i] for i in order]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _run(args):
    from openrlhf_lsc.cli.select_rehearsal import main

    return main([str(a) for a in args])


def test_cli_selects_planted_prompts_and_pairs_and_is_deterministic(tmp_path):
    rows = _topic_rows()
    data = _write(tmp_path / "sft.jsonl", rows)
    args = ["--data.dataset", data, "--select.n_clusters", 3, "--select.rehearsal_k", 2, "--select.ppo_fraction", 0.5,
            "--score.key", "am", "--output.dir", tmp_path / "out"]
    report = _run(args)

    topic_id = {t: i for i, t in enumerate(TOPICS)}
    ppo, reh = _expected([r["am"] for r in rows], [topic_id[r["topic"]] for r in rows], 2, fraction=0.5)
    assert _read(tmp_path / "out" / "ppo_prompts.jsonl") == [rows[i] for i in ppo]
    got_reh = _read(tmp_path / "out" / "rehearsal.jsonl")
    assert sorted(map(json.dumps, got_reh)) == sorted(json.dumps(rows[i]) for i in reh)  # cluster order may differ
    assert report["to_ppo"] == 9 and report["to_rehearsal"] == 6 and sorted(c["size"] for c in report["clusters"]) == [6, 6, 6]
    assignments = _read(tmp_path / "out" / "assignments.jsonl")
    assert [a["score"] for a in assignments] == [r["am"] for r in rows]
    assert all(len({a["cluster"] for a, r in zip(assignments, rows) if r["topic"] == t}) == 1 for t in TOPICS)
    assert (tmp_path / "out" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = {f: (tmp_path / "out" / f).read_bytes() for f in ("ppo_prompts.jsonl", "rehearsal.jsonl", "assignments.jsonl")}
    _run(args[:-1] + [tmp_path / "again"])  # fresh output dir: recomputes everything
    assert all((tmp_path / "again" / f).read_bytes() == b for f, b in before.items())


def test_cli_resumes_cached_embeddings_after_an_interruption(tmp_path, monkeypatch):
    import openrlhf_lsc.embed as io

    data = _write(tmp_path / "sft.jsonl", _topic_rows())
    args = ["--data.dataset", data, "--select.n_clusters", 3, "--select.rehearsal_k", 1, "--select.ppo_threshold", 0.0,
            "--score.key", "am", "--output.dir", tmp_path / "out", "--output.cache_chunk", 5]
    real_embed, calls = io.embed, []

    def flaky(encoder, texts, batch_size):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped while embedding the third chunk
        return real_embed(encoder, texts, batch_size)

    monkeypatch.setattr(io, "embed", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(args)
    assert not (tmp_path / "out" / "report.json").exists()
    calls.clear()
    first = _run(args)
    assert calls == [5, 3]  # only chunks 3 and 4 of 18 rows in chunks of 5 were embedded again

    def no_encoder(name):
        raise AssertionError("everything is cached; the encoder must not load")

    monkeypatch.setattr(io, "load_encoder", no_encoder)
    assert _run(args)["clusters"] == first["clusters"]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A tiny Llama reward model in the layout OpenRLHF loads (`model.*` + `score.weight`), WordLevel tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>", "Q:", "A:"] + [f"w{i}" for i in range(30)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=2, num_labels=1)
    rm = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        rm.score.weight.mul_(30.0)  # scores of order 1, well above bf16 rounding
    path = tmp_path_factory.mktemp("rm")
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    return path, rm, tok


def test_cli_scores_with_a_reward_model_like_hf_does(tmp_path, tiny_rm):
    path, rm, tok = tiny_rm
    g = np.random.default_rng(1)
    w = lambda k: " ".join(f"w{i}" for i in g.integers(0, 30, k))  # noqa: E731
    rows = [{"q": w(int(g.integers(1, 6))), "a": w(int(g.integers(1, 6)))} for _ in range(10)]
    data = _write(tmp_path / "sft.jsonl", rows)
    _run(["--data.dataset", data, "--data.input_key", "q", "--data.output_key", "a", "--data.input_template", "Q: {} A: ",
          "--select.n_clusters", 2, "--select.rehearsal_k", 1, "--select.ppo_fraction", 0.5, "--score.model", path,
          "--score.attn_implementation", "eager", "--score.batch_size", 4, "--output.dir", tmp_path / "out"])
    got = np.array([a["score"] for a in _read(tmp_path / "out" / "assignments.jsonl")])
    with torch.no_grad():  # HF's own sequence-classification head on the unpadded text, float32
        want = np.array([rm(torch.tensor([tok(f"Q: {r['q']} A: {r['a']}</s>")["input_ids"]])).logits[0, 0].item() for r in rows])
    assert want.std() > 0.3
    np.testing.assert_allclose(got, want, atol=0.05 * want.std() + 0.02)  # the tool scores in bf16
    assert np.argsort(got).tolist() == np.argsort(want).tolist() or np.corrcoef(got, want)[0, 1] > 0.99


@pytest.mark.slow
def test_kill_9_during_the_output_phase_never_leaves_a_mixed_set(tmp_path):
    """Runs killed at random file-system operations while writing the outputs (seeds 0..4, plus the first and last
    operation): a reader of the output folder sees the previous complete set or the new one, never a mix."""
    import subprocess
    import sys

    data = _write(tmp_path / "sft.jsonl", _topic_rows())
    out = tmp_path / "out"
    base = ["--data.dataset", str(data), "--select.n_clusters", "3", "--score.key", "am", "--output.dir", str(out)]
    old = base + ["--select.rehearsal_k", "1", "--select.ppo_fraction", "0.5"]
    new = base + ["--select.rehearsal_k", "2", "--select.ppo_fraction", "0.25"]
    driver = Path(__file__).with_name("select_kill_driver.py")
    proc = subprocess.run([sys.executable, str(driver), str(out), "5", json.dumps(old), json.dumps(new)],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["total_ops"] > 20  # the output phase has many steps to be killed at
    assert all(k["code"] == -9 for k in result["kills"]), result["kills"]  # every run was really killed
    assert all(k["set"] in ("old", "new") for k in result["kills"]), result["kills"]
    assert {k["set"] for k in result["kills"]} == {"old", "new"}  # early kills keep the old set, late ones the new
    assert result["leftovers"] == [result["current"]]  # the next run cleaned up after the killed ones
