"""Best-of-k reranking: the library function against an independent numpy re-computation, and the CLI end to end
on tiny models (chosen response = numpy argmax over the written scores, resume after kill -9, bad input)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_lsc import RewardSpec
from openrlhf_lsc.rerank import rerank


def numpy_utilities(scores, transform, aggregate, weights, reference, quantile=None, constants=None, refs=None):
    """Utilities [P, k] from scores [P, k, K], written from the paper's formulas with numpy only."""
    s = np.asarray(scores, dtype=np.float64)
    if reference == "constant":
        r = np.broadcast_to(np.asarray(constants, dtype=np.float64), s.shape)
    elif reference == "group":
        r = np.broadcast_to(np.quantile(s, quantile, axis=1, keepdims=True), s.shape)
    elif reference == "label":
        r = np.broadcast_to(np.asarray(refs, dtype=np.float64)[:, None, :], s.shape)
    else:
        r = np.zeros_like(s)
    m = s - r
    u = {"raw": s, "center": m, "lsc": -np.logaddexp(0, -m), "logsigmoid": -np.logaddexp(0, -s),
         "sigmoid": 1 / (1 + np.exp(-m))}[transform]
    return u.sum(-1) if aggregate == "and" else (u * np.asarray(weights)).sum(-1)


def first_max(u):
    """Index of the first candidate within 1e-9 of the row's maximum (the documented tie rule)."""
    return np.array([np.flatnonzero(row >= row.max() - 1e-9)[0] for row in u])


@st.composite
def cases(draw):
    p, k, num_rms = draw(st.integers(1, 5)), draw(st.integers(2, 6)), draw(st.integers(1, 3))
    grid = st.integers(-6, 6).map(lambda v: v / 2)  # coarse grid: exact ties happen
    scores = draw(st.lists(st.lists(st.lists(grid, min_size=num_rms, max_size=num_rms), min_size=k, max_size=k),
                           min_size=p, max_size=p))
    if draw(st.booleans()):  # duplicate a candidate: an exact tie
        i, a, b = draw(st.integers(0, p - 1)), draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
        scores[i][b] = list(scores[i][a])
    transform = draw(st.sampled_from(["raw", "lsc", "center", "logsigmoid", "sigmoid"]))
    needs_ref = transform in ("lsc", "center", "sigmoid")
    reference = draw(st.sampled_from(["label", "group", "constant"] + ([] if needs_ref else ["none"])))
    aggregate = draw(st.sampled_from(["and", "weighted"]))
    weights = tuple(draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 1.0]), min_size=num_rms, max_size=num_rms)))
    quantile = draw(st.sampled_from([0.25, 0.5, 0.85])) if reference == "group" else None
    constants = tuple(draw(st.lists(grid, min_size=num_rms, max_size=num_rms))) if reference == "constant" else None
    refs = draw(st.lists(st.lists(grid, min_size=num_rms, max_size=num_rms), min_size=p, max_size=p))
    return dict(scores=scores, transform=transform, aggregate=aggregate, weights=weights, reference=reference,
                quantile=quantile, constants=constants, refs=refs)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_rerank_matches_numpy(case):
    num_rms = len(case["scores"][0][0])
    names = tuple(f"rm{j}" for j in range(num_rms))
    spec = RewardSpec(names=names, transform=case["transform"], aggregate=case["aggregate"],
                      weights=case["weights"] if case["aggregate"] == "weighted" else None,
                      reference=case["reference"], quantile=case["quantile"], reference_value=case["constants"],
                      label_key="lsc_ref")
    labels = [{n: {"reference": v} for n, v in zip(names, row)} for row in case["refs"]]
    scores = torch.tensor(case["scores"], dtype=torch.float64)
    chosen, utilities = rerank(scores, spec, labels if case["reference"] == "label" else None)
    expected = numpy_utilities(case["scores"], case["transform"], case["aggregate"], case["weights"],
                               case["reference"], case["quantile"], case["constants"], case["refs"])
    np.testing.assert_allclose(utilities.numpy(), expected, rtol=1e-9, atol=1e-9)
    for row, c in enumerate(chosen.tolist()):
        assert expected[row, c] >= expected[row].max() - 1e-9  # a best candidate (up to float rounding) ...
        u = utilities[row].numpy()
        assert c == np.flatnonzero(u == u.max())[0]  # ... the first of its exact ties


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(-12, 12).map(lambda v: v / 4), min_size=5, max_size=5), min_size=1, max_size=4),
       st.sampled_from(["label", "group", "constant"]))
def test_one_reward_model_every_monotone_transform_picks_the_same(rows, reference):
    # With one RM and a per-prompt reference, raw, center, lsc, sigmoid, logsigmoid are monotone in r: same argmax.
    scores = torch.tensor(rows, dtype=torch.float64)[:, :, None]
    extra = {"label": {}, "group": {"quantile": 0.5}, "constant": {"reference_value": (0.3,)}}[reference]
    labels = [{"a": {"reference": 0.25 * i}} for i in range(len(rows))] if reference == "label" else None
    picks = {t: rerank(scores, RewardSpec(names=("a",), transform=t, reference=reference, **extra), labels)[0].tolist()
             for t in ("raw", "center", "lsc", "sigmoid", "logsigmoid")}
    assert len({tuple(p) for p in picks.values()}) == 1, picks
    assert picks["raw"] == first_max(np.array(rows)).tolist()


def test_par_reranks_by_the_mean_sigmoid_over_m_sft_scores():
    # PAR (Fu et al. 2025, k = 1): u = sum over reward models of (1/M) sum_m sigmoid(r - r_ref,m), by hand with numpy.
    scores = np.array([[[0.5, 2.0], [1.5, -1.0], [1.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0], [3.0, -4.0]]])
    par = [[[0.0, 1.0, 2.0, 9.0], [-1.0, 0.0, 0.5, 9.0]], [[0.5, 0.5, 1.0, 9.0], [-2.0, 1.0, 3.0, 9.0]]]  # [P, K, 4]
    labels = [{n: {"reference": 0.0, "par_scores": par[i][j]} for j, n in enumerate(("h", "s"))} for i in range(2)]
    spec = RewardSpec(names=("h", "s"), transform="par", reference="label", par_m=3)  # the 4th score is not read
    chosen, u = rerank(torch.tensor(scores), spec, labels)
    refs = np.array(par)[:, None, :, :3]  # [P, 1, K, M]
    expected = (1 / (1 + np.exp(-(scores[..., None] - refs)))).mean(-1).sum(-1)
    np.testing.assert_allclose(u.numpy(), expected, rtol=1e-12)
    assert chosen.tolist() == expected.argmax(1).tolist()
    assert not torch.allclose(rerank(torch.tensor(scores), RewardSpec(names=("h", "s"), transform="par",
                                                                      reference="label", par_m=4), labels)[1], u)
    short = [labels[0], {n: {"par_scores": [0.0, 1.0]} for n in ("h", "s")}]
    with pytest.raises(ValueError, match="prompt 1"):
        rerank(torch.tensor(scores), spec, short)


def test_ties_pick_the_first_candidate():
    spec = RewardSpec(names=("a",))
    scores = torch.tensor([[[1.0], [1.0], [1.0]], [[0.0], [2.0], [2.0]], [[3.0], [1.0], [3.0]]])
    assert rerank(scores, spec)[0].tolist() == [0, 1, 0]


def test_and_lsc_prefers_the_balanced_candidate_where_raw_sums_tie():
    # Paper 1, section 4: p(ref < y) per property (0.45, 0.99) vs (0.9, 0.9); margins = logit(p).
    logit = lambda q: np.log(q / (1 - q))  # noqa: E731
    scores = [[[logit(0.45), logit(0.99)], [logit(0.9), logit(0.9)]]]
    lsc = RewardSpec(names=("h", "s"), transform="lsc", reference="constant", reference_value=(0.0, 0.0))
    raw = RewardSpec(names=("h", "s"), transform="raw", aggregate="weighted", weights=(0.5, 0.5))
    chosen, u = rerank(torch.tensor(scores, dtype=torch.float64), lsc)
    assert chosen.tolist() == [1] and np.exp((u[0, 1] - u[0, 0]).item()) == pytest.approx(0.81 / (0.45 * 0.99))
    assert rerank(torch.tensor(scores, dtype=torch.float64), raw)[1][0, 0].item() == pytest.approx(
        0.5 * (logit(0.45) + logit(0.99)))


@pytest.mark.parametrize(
    "scores, spec, labels, match",
    [
        ([[[1.0], [2.0]], [[1.0]]], RewardSpec(names=("a",)), None, "same k for every prompt"),
        (torch.zeros(2, 3), RewardSpec(names=("a",)), None, r"\[prompts, k, 1\]"),
        (torch.zeros(2, 3, 2), RewardSpec(names=("a",)), None, r"must be \[N, 1\]"),
        (torch.zeros(2, 1, 1), RewardSpec(names=("a",), transform="lsc", reference="group", quantile=0.5), None,
         "needs k >= 2"),
        (torch.zeros(2, 3, 1), RewardSpec(names=("a",), transform="lsc", reference="label"), [{"a": {"reference": 0}}],
         "2 prompts but 1 labels"),
        (torch.zeros(1, 3, 1), RewardSpec(names=("a",), transform="lsc", reference="label", label_key="ref"),
         [{"b": {"reference": 0}}], "prompt 0: field 'ref' has no finite reference for reward model 'a'"),
        (torch.tensor([[[0.0], [float("nan")]]]), RewardSpec(names=("a",)), None, "must be finite"),
    ],
)
def test_bad_input(scores, spec, labels, match):
    with pytest.raises(ValueError, match=match):
        rerank(scores, spec, labels)


def test_docstring_example_runs():
    import doctest

    import openrlhf_lsc.rerank

    result = doctest.testmod(openrlhf_lsc.rerank)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------------------------- CLI

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["A", "B", "judge"]


def http_score(query):
    """The test judge: a fixed function of the query text; None (a failed score) for prompts saying FAIL."""
    return None if "FAIL" in query else (zlib.crc32(query.encode()) % 1000) / 250.0 - 2.0


@pytest.fixture(scope="module")
def judge():
    state = SimpleNamespace(delay=0.0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(state.delay)
            body = json.dumps({"rewards": [http_score(q) for q in data["query"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_port}/get_reward"
    yield state
    httpd.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, judge):
    from cpu_harness import tiny_models

    root = tmp_path_factory.mktemp("rerank")
    models = tiny_models.build(root / "models")
    g = np.random.default_rng(0)
    rows = [{"input": f"question {i}: what is {tiny_models.WORDS[i]} plus two?", "uid": f"u{i}",
             "lsc_ref": {n: {"reference": round(float(g.uniform(-1, 1)), 3)} for n in NAMES}} for i in range(7)]
    rows += [{"input": "", "uid": "empty", "lsc_ref": rows[0]["lsc_ref"]},
             {"input": "FAIL this one", "uid": "fail", "lsc_ref": rows[0]["lsc_ref"]},
             {"input": "what is one plus one?", "uid": "nolabel", "lsc_ref": {"A": {"reference": 0.1}}}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--data.prompt_dataset", str(root / "prompts.jsonl"), "--data.id_key", "uid",
            "--actor.model_name_or_path", str(models / "policy"),
            "--rm.paths", f"{models / 'rm_a'},{models / 'rm_b'},{judge.url}", "--rm.names", ",".join(NAMES),
            "--rerank.k", "4", "--rollout.max_new_tokens", "6", "--data.max_len", "64", "--output.shard_size", "3"]
    return SimpleNamespace(root=root, models=models, rows=rows, argv=argv)


def run_cli(argv):
    from openrlhf_lsc.cli import rerank as cli

    return cli.main(argv)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


LABEL_ARGS = ["--lsc.transform", "lsc", "--lsc.aggregate", "and", "--lsc.reference", "label"]


@pytest.fixture(scope="module")
def e2e(setup):
    out = setup.root / "run"
    report = run_cli(setup.argv + LABEL_ARGS + ["--output.dir", str(out)])
    return SimpleNamespace(out=out, report=report)


def check_choices(good, **spec):
    """Recompute every row's utilities from the written scores with numpy and check the written choice."""
    for row in good:
        cands = row["rerank"]["candidates"]
        scores = [[[c["scores"][n] for n in NAMES] for c in cands]]
        refs = None
        if spec["reference"] == "label":  # label references are read as float32 (openrlhf_lsc.references)
            refs = np.float32([[row["lsc_ref"][n]["reference"] for n in NAMES]]).astype(np.float64)
        u = numpy_utilities(scores, refs=refs, **spec)[0]
        written = np.array([c["utility"] for c in cands])
        np.testing.assert_allclose(written, u, rtol=1e-9, atol=1e-9)
        best = row["rerank"]["index"]
        assert u[best] >= u.max() - 1e-9 and best == np.flatnonzero(written == written.max())[0]
        assert row["response"] == cands[best]["response"] and row["rerank"]["utility"] == written[best]


def test_cli_end_to_end(setup, e2e):
    good, bad = read_jsonl(e2e.out / "reranked.jsonl"), read_jsonl(e2e.out / "errors.jsonl")
    assert [r["uid"] for r in good] == [f"u{i}" for i in range(7)]
    assert [r["uid"] for r in bad] == ["empty", "fail", "nolabel"]
    assert bad[0]["rerank"]["error"] == "empty prompt"
    assert "reward model 'judge' gave no finite score for candidate 0 (4 failed scores)" == bad[1]["rerank"]["error"]
    assert "id 'nolabel'" in bad[2]["rerank"]["error"] and "reward model 'B'" in bad[2]["rerank"]["error"]
    check_choices(good, transform="lsc", aggregate="and", weights=None, reference="label")
    for row in good:
        cands = row["rerank"]["candidates"]
        assert len(cands) == 4 and all(c["response"] for c in cands)
        # The served judge's scores recomputed independently: it sees prompt + response text.
        assert [c["scores"]["judge"] for c in cands] == pytest.approx([http_score(row["input"] + c["response"]) for c in cands])
    # Local RMs: the written scores equal a plain OpenRLHF reward-model forward on the same text.
    from openrlhf.models import get_llm_for_sequence_regression
    from openrlhf.utils import get_tokenizer

    tok = get_tokenizer(str(setup.models / "rm_a"), None, "left", None)
    for name, folder in (("A", "rm_a"), ("B", "rm_b")):
        plain = get_llm_for_sequence_regression(str(setup.models / folder), "reward", param_dtype="bf16",
                                                attn_implementation="eager").eval()
        with torch.no_grad():
            for c in good[0]["rerank"]["candidates"]:
                ids = tok(good[0]["input"] + c["response"], add_special_tokens=False, return_tensors="pt")["input_ids"]
                assert c["scores"][name] == pytest.approx(plain(ids, torch.ones_like(ids)).item(), abs=0.02)
    report = json.loads((e2e.out / "report.json").read_text())
    assert report["reranked"] == 7 and report["errors"] == 3 and report["k"] == 4
    picked = np.array([[r["rerank"]["scores"][n] for n in NAMES] for r in good])
    assert report["rms"]["A"]["chosen_mean"] == pytest.approx(picked[:, 0].mean())


def test_cli_reranks_stored_scores_with_other_settings(setup, e2e, capsys):
    shards = sorted((e2e.out / "shards").iterdir())
    assert len(shards) == 4
    before = {p: p.stat().st_mtime_ns for p in shards}
    first = read_jsonl(e2e.out / "reranked.jsonl")
    argv = setup.argv + ["--output.dir", str(e2e.out), "--rm.batch_size", "5"]
    run_cli(argv + ["--lsc.transform", "raw", "--lsc.aggregate", "weighted", "--lsc.weights", "0.2,0.3,0.5",
                    "--lsc.reference", "none"])
    weighted = read_jsonl(e2e.out / "reranked.jsonl")
    check_choices(weighted, transform="raw", aggregate="weighted", weights=(0.2, 0.3, 0.5), reference="none")
    assert len(weighted) == 8  # the row without a full label is fine without label references
    run_cli(argv)  # defaults: AND-LSC against the group median of each prompt's own candidates
    group = read_jsonl(e2e.out / "reranked.jsonl")
    check_choices(group, transform="lsc", aggregate="and", weights=None, reference="group", quantile=0.5)
    assert {p: p.stat().st_mtime_ns for p in shards} == before  # nothing sampled or scored again
    same = {r["uid"]: r["rerank"]["candidates"] for r in first}
    assert all(r["rerank"]["candidates"][0]["scores"] == same[r["uid"]][0]["scores"] for r in group if r["uid"] in same)
    with pytest.raises(SystemExit):  # what the shards hold may not change without --overwrite
        run_cli(argv + ["--rerank.k", "3"])
    assert "rerank.k: 4 -> 3" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_resumes_after_kill_9(setup, e2e, judge):
    out = setup.root / "killed"
    cmd = [sys.executable, "-m", "openrlhf_lsc.cli.rerank", *setup.argv, *LABEL_ARGS, "--output.dir", str(out)]
    judge.delay = 0.5  # one request per shard: slow enough to kill mid-way
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "shards").glob("shard-*.jsonl"))) >= 1:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
    finally:
        judge.delay = 0.0
    assert proc.returncode == -signal.SIGKILL, "the run was not killed mid-way"
    written = sorted((out / "shards").glob("shard-*.jsonl"))
    assert 1 <= len(written) < 4 and not (out / "reranked.jsonl").exists()
    kept = {p: p.read_text() for p in written}
    run_cli(setup.argv + LABEL_ARGS + ["--output.dir", str(out)])
    assert {p: p.read_text() for p in written} == kept
    resumed = read_jsonl(out / "reranked.jsonl")
    assert [r["uid"] for r in resumed] == [f"u{i}" for i in range(7)]  # every row once
    # The same candidates and scores as the uninterrupted run: each shard is seeded by its index.
    for shard in sorted((e2e.out / "shards").iterdir()):
        again, first = read_jsonl(out / "shards" / shard.name), read_jsonl(shard)
        assert [r.get("responses") for r in again] == [r.get("responses") for r in first]
        for a, b in zip(again, first):
            for n in a.get("scores", {}):
                assert a["scores"][n] == pytest.approx(b["scores"][n], abs=1e-6, nan_ok=True)


def bad_argv(setup, tmp_path, *extra):
    return setup.argv + ["--output.dir", str(tmp_path / "bad"), *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lsc.aggregate", "weighted"], "--lsc.aggregate weighted needs --lsc.weights with 3 values"),
        (["--lsc.aggregate", "weighted", "--lsc.weights", "1,2"], "--lsc.weights needs 3 values"),
        (["--lsc.reference", "label", "--lsc.quantile", "0.5"], "--lsc.quantile is only used with --lsc.reference group"),
        (["--lsc.quantile", "1.5"], r"--lsc.quantile in \(0, 1\), got 1.5"),
        (["--lsc.transform", "lsc", "--lsc.reference", "none"], "--lsc.transform lsc needs a reference"),
        (["--rerank.k", "1"], "--rerank.k must be >= 1 \\(>= 2 for --lsc.reference group\\), got 1"),
        (["--rm.names", "A,B"], "--rm.names has 2 names for 3 --rm.paths"),
        (["--lsc.reference", "label", "--data.label_key", "refs"], "reads the field 'refs' \\(--data.label_key\\)"),
        (["--output.response_key", "uid"], "already have a field 'uid'"),
        (["--output.shard_size", "0"], "--output.shard_size: expected an integer >= 1"),
        (["--rm.paths", "/no/such/rm", "--rm.names", "A"], "--rm.paths: no such model folder /no/such/rm"),
        (["--lsc.weights", "-1,nan,2", "--lsc.aggregate", "weighted"], "--lsc.weights: item 'nan'"),
    ],
)
def test_cli_bad_input_is_one_line_before_any_model_loads(setup, tmp_path, monkeypatch, capsys, extra, message):
    import re

    from openrlhf_lsc.cli import pipeline
    from openrlhf_lsc.cli import rerank as cli
    from openrlhf_lsc.integration import samplers

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(samplers, "from_args", no_models)
    monkeypatch.setattr(pipeline, "reward_fn", no_models)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(bad_argv(setup, tmp_path, *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("rerank: error: ")
    assert re.search(message, err), err


@pytest.mark.slow
def test_cli_help_shows_defaults_without_flash_attn_or_vllm():
    code = ("import importlib.util, runpy, sys\n"
            "assert importlib.util.find_spec('flash_attn') is None and importlib.util.find_spec('vllm') is None\n"
            "sys.argv = ['rerank', '--help']\n"
            "runpy.run_module('openrlhf_lsc.cli.rerank', run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # no tests/stubs on the path
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--rerank.k RERANK.K" in proc.stdout and "(default: 16)" in proc.stdout
    text = " ".join(proc.stdout.split())
    assert "(default: group)" in text and "(default: lsc)" in text


def test_cli_overwrite_starts_over(setup, judge, tmp_path):
    out = tmp_path / "ow"
    argv = ["--data.prompt_dataset", str(setup.root / "prompts.jsonl"), "--actor.model_name_or_path",
            str(setup.models / "policy"), "--rm.paths", judge.url, "--rm.names", "judge", "--rerank.k", "2",
            "--rollout.max_new_tokens", "3", "--output.dir", str(out), "--output.shard_size", "5"]
    run_cli(argv)
    (out / "shards" / "shard-00000.jsonl").write_text("garbage\n")
    run_cli(argv + ["--overwrite"])
    assert json.loads((out / "shards" / "shard-00000.jsonl").read_text().splitlines()[0])["index"] == 0
    assert len(read_jsonl(out / "reranked.jsonl")) == 8
