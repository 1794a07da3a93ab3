"""Reference estimator: math against numpy/scipy and planted data, OpenRLHF-convention I/O on tiny models,
the CLI end to end (output read back through OpenRLHF's PromptDataset), and resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from cli_capture import reopen_log_streams
from openrlhf_lsc import estimate
from openrlhf_lsc.references import references_from_labels

ROOT = Path(__file__).resolve().parents[1]
Z = stats.norm.ppf


# ---------------------------------------------------------------------------------------------- helpers


def table_rm(table):
    """A reward function reading scores[(prompt, response)] from a dict."""
    return lambda prompts, responses: [table[(p, r)] for p, r in zip(prompts, responses)]


def fixed_sampler(k_names):
    """Sampler returning responses 'r0'..'r{k-1}' for every prompt; records which prompts it saw."""
    seen = []

    def sample(prompts, k):
        seen.extend(prompts)
        return [[f"r{j}" for j in range(k)] for _ in prompts]

    sample.seen = seen
    return sample


def http_score(query: str):
    """The test reward server's score: a fixed function of the query text; None for prompts saying FAIL."""
    if "FAIL" in query:
        return None
    return (zlib.crc32(query.encode()) % 1000) / 250.0 - 2.0


@pytest.fixture(scope="module")
def server():
    """A reward server speaking serve_rm's protocol (POST {"query", "prompts", "labels"} -> {"rewards"}).
    While `state.broken` is set it answers {"rewards": []} to every request but the estimator's probe; while
    `state.down` is set, HTTP 503."""
    payloads = []
    state = SimpleNamespace(broken=False, down=False)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            payloads.append(data)
            probe = data["query"] == ["Hello"]
            if state.down and not probe:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            broken = state.broken and not probe
            body = json.dumps({"rewards": [] if broken else [http_score(q) for q in data["query"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}/get_reward", payloads=payloads, state=state)
    httpd.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from cpu_harness import tiny_models

    return tiny_models.build(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def io():
    from openrlhf_lsc.integration import offline

    return offline


# ----------------------------------------------------------------------------------- estimators vs numpy


@settings(max_examples=25, deadline=None)
@given(
    scores=st.lists(
        st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=5, max_size=5), min_size=1, max_size=6
    ),
    q=st.floats(0.01, 0.99),
)
def test_quantile_and_gaussian_match_numpy(scores, q):
    k = 5
    prompts = [f"p{i}" for i in range(len(scores))]
    quant = {(p, f"r{j}"): s[j] for p, s in zip(prompts, scores) for j in range(k)}
    gauss = {key: 2 * v - 1 for key, v in quant.items()}
    labels, report = estimate.estimate_references(
        prompts, fixed_sampler(k), {"quant": table_rm(quant), "gauss": table_rm(gauss)},
        method=["quantile", "gaussian"], q=q, k=k, quantiles=[0.5],
    )
    for label, s in zip(labels, scores):
        s = np.array(s, dtype=np.float64)
        assert label["quant"]["reference"] == pytest.approx(np.quantile(s, q), abs=1e-9)
        assert label["quant"]["quantiles"]["0.5"] == pytest.approx(np.median(s), abs=1e-9)
        assert label["quant"]["k"] == k and label["quant"]["std"] == pytest.approx(s.std(ddof=1), abs=1e-9)
        g = 2 * s - 1
        assert label["gauss"]["reference"] == pytest.approx(g.mean() + Z(q) * g.std(ddof=1), abs=1e-7)
    assert report["rms"]["quant"]["coverage"] == 1.0


def test_canned_reference_is_the_mean_over_variants():
    canned = ["I can't answer that.", "No."]
    table = {(p, c): float(len(p) * (j + 1)) for p in ("ab", "abc") for j, c in enumerate(canned)}
    sampler = fixed_sampler(4)
    labels, _ = estimate.estimate_references(["ab", "abc"], sampler, {"harmless": table_rm(table)},
                                             method="canned", canned_responses=canned)
    assert [lab["harmless"]["reference"] for lab in labels] == [3.0, 4.5]  # (2 + 4) / 2, (3 + 6) / 2
    assert labels[0]["harmless"]["k"] == 0 and sampler.seen == []  # canned alone samples nothing


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=3, max_size=40), st.lists(st.integers(-3, 3), min_size=3, max_size=40))
def test_spearman_matches_scipy_with_ties(a, b):
    n = min(len(a), len(b))
    a, b = np.array(a[:n], float), np.array(b[:n], float)
    if a.std() == 0 or b.std() == 0:
        return
    assert estimate.spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-9)


def test_ridge_penalty_is_the_leave_one_out_minimiser():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 6, generator=g, dtype=torch.float64)
    y = X @ torch.randn(6, generator=g, dtype=torch.float64) + torch.randn(30, generator=g, dtype=torch.float64)
    alphas = [0.01, 0.3, 3.0, 30.0, 300.0]
    w, b, alpha = estimate.ridge(X, y, alphas)

    def fit(Xt, yt, a):  # plain ridge, unpenalised intercept, via the normal equations
        xm, ym = Xt.mean(0), yt.mean()
        Xc = Xt - xm
        wt = torch.linalg.solve(Xc.T @ Xc + a * torch.eye(6, dtype=torch.float64), Xc.T @ (yt - ym))
        return wt, ym - xm @ wt

    def loo(a):
        errs = []
        for i in range(30):
            keep = torch.arange(30) != i
            wt, bt = fit(X[keep], y[keep], a)
            errs.append((X[i] @ wt + bt - y[i]).item() ** 2)
        return np.mean(errs)

    assert alpha == min(alphas, key=loo)
    w_ref, b_ref = fit(X, y, alpha)
    assert torch.allclose(w, w_ref, atol=1e-9) and b == pytest.approx(b_ref.item(), abs=1e-9)


def planted(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.linspace(-1, 1, d, dtype=torch.float64)
    v = torch.linspace(0.3, -0.3, d, dtype=torch.float64)
    return X, X @ w + 0.5, (X @ v - 0.7).exp(), g


def test_learned_recovers_planted_mean_and_std():
    X, mu, sigma, g = planted(2000)
    scores = mu[:, None] + sigma[:, None] * torch.randn(2000, 64, generator=g, dtype=torch.float64)
    model = estimate.GaussianPredictor().fit(X, scores.mean(1), scores.std(1))
    X_new, mu_new, sigma_new, _ = planted(500, seed=1)
    mu_hat, sigma_hat = model.predict(X_new)
    # Per-prompt noise: mean sigma/8, log-std ~0.09; 2000 prompts average it out to about 0.005.
    assert (mu_hat - mu_new).abs().max() < 0.05
    assert ((sigma_hat / sigma_new) - 1).abs().max() < 0.06


def test_learned_samples_a_subset_and_predicts_every_prompt():
    n, k, q = 600, 64, 0.85
    X, mu, sigma, g = planted(n)
    draws = mu[:, None] + sigma[:, None] * torch.randn(n, k, generator=g, dtype=torch.float64)
    prompts = [f"prompt {i}" for i in range(n)]
    table = {(p, f"r{j}"): draws[i, j].item() for i, p in enumerate(prompts) for j in range(k)}
    sampler = fixed_sampler(k)
    labels, report = estimate.estimate_references(
        prompts, sampler, {"helpful": table_rm(table)}, method="learned", q=q, k=k, features=X,
        num_learned_prompts=400, holdout=0.25, seed=3,
    )
    assert len(sampler.seen) == 400 and len(set(sampler.seen)) == 400
    truth = (mu + Z(q) * sigma).numpy()
    ref = np.array([lab["helpful"]["reference"] for lab in labels])
    unsampled = np.array([lab["helpful"]["k"] == 0 for lab in labels])
    assert unsampled.sum() == 200
    assert np.abs(ref - truth)[unsampled].max() < 0.1
    info = report["rms"]["helpful"]["learned"]
    assert info["train_prompts"] == 300 and info["holdout_prompts"] == 100
    # Held-out empirical 0.85-quantiles of 64 draws scatter by ~0.19 sigma around the truth.
    assert info["holdout_mae"] < 0.3 * sigma.mean().item() and info["holdout_spearman"] > 0.9


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=1), "--ref.k"),
        (dict(q=1.0), "--ref.q"),
        (dict(q=0.0), "--ref.q"),
        (dict(q=float("nan")), "--ref.q"),
        (dict(quantiles=[1.5]), "--ref.quantiles"),
        (dict(method="median"), "--ref.method"),
        (dict(method=["quantile", "gaussian", "canned"]), "3 values for 1 reward models"),
        (dict(num_learned_prompts=1), "--learned.num_prompts"),
        (dict(method="learned", features=None), "features"),
        (dict(par_m=5), "--ref.par_m 5 records that many of each prompt's --ref.k 4 sampled scores"),
        (dict(par_m=-1), "--ref.par_m must be an integer >= 0"),
        (dict(par_m=2, method="canned"), "--ref.par_m 2 .* needs a sampling method"),
    ],
)
def test_bad_settings_raise_naming_the_setting(kwargs, match):
    prompts = ["a", "b", "c"]
    table = {(p, f"r{j}"): float(j) for p in prompts for j in range(4)}
    kwargs = {"k": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        estimate.estimate_references(prompts, fixed_sampler(4), {"rm": table_rm(table)}, **kwargs)


def test_par_scores_are_the_first_m_finite_samples_and_feed_par():
    """--ref.par_m M keeps M of each prompt's sampled scores (the first finite ones) as the label's par_scores, which
    `--lsc.transform par` reads; a prompt with fewer than M finite scores gets a retryable error, not a short list."""
    from openrlhf_lsc import RewardSpec, reward_utilities

    prompts = ["a", "b", "short"]
    table = {(p, f"r{j}"): float(j + 10 * i) for i, p in enumerate(prompts) for j in range(4)}
    table[("b", "r1")] = None
    table.update({("short", f"r{j}"): (None if j else 1.0) for j in range(4)})
    labels, _ = estimate.estimate_references(prompts, fixed_sampler(4), {"rm": table_rm(table)}, q=0.5, k=4, par_m=2)
    assert labels[0]["rm"]["par_scores"] == [0.0, 1.0] and labels[1]["rm"]["par_scores"] == [10.0, 12.0]
    assert labels[2]["rm"]["reference"] is None and "need 2" in labels[2]["rm"]["error"] and labels[2]["rm"]["retry"]
    spec = RewardSpec(names=("rm",), transform="par", reference="label", label_key="lsc_ref", par_m=2)
    u, _ = reward_utilities(torch.tensor([[0.5], [11.0]], dtype=torch.float64), spec, labels[:2])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    np.testing.assert_allclose(u.numpy(), [sig(0.5 - np.array([0.0, 1.0])).mean(), sig(11 - np.array([10.0, 12.0])).mean()])


def test_failed_scores_become_error_records_never_missing_references():
    prompts = ["ok", "half", "dead", "", "canned-fails"]
    nan = float("nan")
    table = {("ok", f"r{j}"): float(j) for j in range(4)}
    table.update({("half", "r0"): 1.0, ("half", "r1"): None, ("half", "r2"): nan, ("half", "r3"): 3.0})
    table.update({("dead", f"r{j}"): (None if j % 2 else float("inf")) for j in range(4)})
    table.update({("canned-fails", f"r{j}"): 0.0 for j in range(4)})
    canned = {(p, c): (None if p == "canned-fails" and c == "x" else 1.0) for p in prompts for c in ("x", "y")}
    labels, report = estimate.estimate_references(
        prompts, fixed_sampler(4), {"h": table_rm(table), "c": table_rm(canned)},
        method=["quantile", "canned"], q=0.5, k=4, canned_responses=["x", "y"],
    )
    assert labels[0]["h"]["reference"] == 1.5 and "error" not in labels[0]["h"]
    assert labels[1]["h"]["k"] == 2 and labels[1]["h"]["failed"] == 2 and labels[1]["h"]["reference"] == 2.0
    assert labels[2]["h"]["reference"] is None and "0 of 4" in labels[2]["h"]["error"]
    assert labels[3]["h"]["error"] == labels[3]["c"]["error"] == "empty prompt" and labels[3]["h"]["retry"] is False
    assert labels[2]["h"]["retry"] is True and labels[4]["c"]["retry"] is True
    assert labels[4]["c"]["reference"] is None and "canned" in labels[4]["c"]["error"]
    assert report["rms"]["h"]["errors"] == 2 and report["rms"]["c"]["errors"] == 2
    # The PPO side reads the good labels and refuses the failed ones loudly.
    assert references_from_labels([labels[0], labels[1]], ["h", "c"], "ref").tolist() == [[1.5, 1.0], [2.0, 1.0]]
    with pytest.raises(ValueError, match="no finite reference for reward model 'h'"):
        references_from_labels([labels[2]], ["h", "c"], "ref")


def test_score_error_fails_only_the_prompts_that_fail_alone_retryably_and_the_run_goes_on():
    table = {(p, f"r{j}"): float(j) for p in ("a", "b") for j in range(3)}

    def flaky(prompts, responses):
        raise estimate.ScoreError("server answered nonsense")

    labels, report = estimate.estimate_references(["a", "b", ""], fixed_sampler(3), {"ok": table_rm(table), "bad": flaky},
                                                  method="quantile", q=0.5, k=3)
    assert [lab["ok"]["reference"] for lab in labels[:2]] == [1.0, 1.0]
    assert [(lab["bad"]["error"], lab["bad"]["retry"]) for lab in labels] == [
        ("server answered nonsense", True), ("server answered nonsense", True), ("empty prompt", False)]
    assert report["rms"]["bad"]["errors"] == 3

    def picky(prompts, responses):  # refuses any call that includes prompt "b"
        if "b" in prompts:
            raise estimate.ScoreError("cannot score b")
        return table_rm(table)(prompts, responses)

    labels, _ = estimate.estimate_references(["a", "b"], fixed_sampler(3), {"rm": picky}, method="quantile", q=0.5, k=3)
    assert labels[0]["rm"]["reference"] == 1.0  # the whole call failed, then "a" alone succeeded
    assert (labels[1]["rm"]["reference"], labels[1]["rm"]["error"], labels[1]["rm"]["retry"]) == (None, "cannot score b", True)


def test_sampler_and_reward_fn_returning_wrong_counts_raise():
    table = {("a", f"r{j}"): 0.0 for j in range(3)}
    with pytest.raises(ValueError, match="sampler returned"):
        estimate.estimate_references(["a"], lambda p, k: [["x"]], {"rm": table_rm(table)}, k=3)
    with pytest.raises(ValueError, match="reward model 'rm' returned 1 scores for 3"):
        estimate.estimate_references(["a"], fixed_sampler(3), {"rm": lambda p, r: [0.0]}, k=3)


# ----------------------------------------------------------------------------------- models and I/O


def test_local_rm_batches_like_a_plain_forward(models, io):
    from openrlhf.models import get_llm_for_sequence_regression

    rm = io.LocalRewardModel(str(models / "rm_a"), batch_size=3)
    prompts = ["what is two plus three?", "question 5: what is one?", "good", "bad answer"] * 2
    responses = ["four</s>", "one plus one is two", "the", "why how what is ten plus nine minus six</s>"] * 2
    scores = rm(prompts, responses)
    plain = get_llm_for_sequence_regression(
        str(models / "rm_a"), "reward", param_dtype="bf16", attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for p, r, s in zip(prompts, responses, scores):
            ids = rm.tokenizer(p + r, add_special_tokens=False, return_tensors="pt")["input_ids"]
            assert s == pytest.approx(plain(ids, torch.ones_like(ids)).item(), abs=0.02)  # bf16: 1 ulp ~ 0.008


def test_hf_sampler_follows_openrlhf_rollout_conventions(models, io):
    from transformers import AutoModelForCausalLM
    from openrlhf.utils import get_tokenizer

    from openrlhf_lsc.integration.samplers import HFSampler

    tok = get_tokenizer(str(models / "policy"), None, "left", None)
    policy = AutoModelForCausalLM.from_pretrained(str(models / "policy"), dtype=torch.bfloat16).eval()
    sampler = HFSampler(policy, tok, max_new_tokens=6, max_len=12, batch_size=2)
    prompts = ["what is two plus three?", "good", "question 5: what is one plus one plus two?"]
    widths, generated, decode, generate = [], [], sampler.decode, policy.generate
    policy.generate = lambda **kw: (widths.append(kw["input_ids"].shape[1]), generate(**kw))[1]
    sampler.decode = lambda ids: (generated.append(ids), decode(ids))[1]
    torch.manual_seed(0)
    out = sampler(prompts, 3)
    torch.manual_seed(0)
    assert sampler(prompts, 3) == out  # seeded: a resumed shard draws the same responses
    assert [len(r) for r in out] == [3, 3, 3]
    long_prompt = len(tok(prompts[2], add_special_tokens=False)["input_ids"])
    assert long_prompt > 6 and max(widths) == 6  # prompts lose their start to fit max_len - max_new_tokens
    for ids in generated:  # each response stops at its first EOS, else runs to max_new_tokens
        assert len(ids) <= 6 and (tok.eos_token_id in ids or len(ids) == 6)
    assert sampler.decode([5, 6, tok.eos_token_id, tok.pad_token_id, 7]) == tok.decode([5, 6, tok.eos_token_id])
    with pytest.raises(ValueError, match="--rollout.temperature"):
        HFSampler(policy, tok, max_new_tokens=6, temperature=0.0)


def test_load_prompts_ids_template_and_duplicates(tmp_path, io):
    path = tmp_path / "p.jsonl"
    rows = [{"q": "hello", "uid": "a"}, {"q": "  ", "uid": "b"}, {"q": "bye", "uid": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    _, prompts, ids = io.load_prompts(str(path), "q", "uid", input_template="User: {}\nAssistant:")
    assert prompts == ["User: hello\nAssistant:", ""] and ids == ["a", "b"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"row 2 \(uid 'a'\): duplicate id 'a' \(--data.id_key\), first in row 0"):
        io.load_prompts(str(path), "q", "uid")
    with pytest.raises(ValueError, match="row 0 has no field 'input'.*--data.input_key"):
        io.load_prompts(str(path), "input")
    path.write_text(json.dumps({"q": 5, "uid": "n"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 \(uid 'n'\): field 'q' \(--data.input_key\) is int '5'; expected text"):
        io.load_prompts(str(path), "q", "uid")


# ----------------------------------------------------------------------------------------------- CLI

NUM_PROMPTS = 12


@pytest.fixture(scope="module")
def cli_setup(models, server, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rows = [{"input": f"question {i}: what is {i} plus two?", "uid": f"u{i}"} for i in range(NUM_PROMPTS - 2)]
    rows += [{"input": "", "uid": "empty"}, {"input": "FAIL this one", "uid": "fail"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "--data.prompt_dataset", str(root / "prompts.jsonl"), "--data.id_key", "uid",
        "--actor.model_name_or_path", str(models / "policy"),
        "--rm.paths", f"{models / 'rm_a'},{server.url},{models / 'rm_b'},{server.url}",
        "--rm.names", "A,judge,B,harmless",
        "--ref.method", "quantile,gaussian,learned,canned", "--ref.q", "0.85,0.5,0.75,0.5",
        "--ref.k", "4", "--ref.quantiles", "0.5", "--learned.holdout", "0.2",
        "--rollout.max_new_tokens", "6", "--data.max_len", "64", "--output.shard_size", "2", "--output.drop_failed",
    ]
    return SimpleNamespace(root=root, rows=rows, argv=argv)


def run_cli(argv):
    from openrlhf_lsc.cli import estimate_reference

    return estimate_reference.main(argv)


def cli_fails(argv, capsys, code=2):
    """Run the CLI expecting exit `code`; returns its stderr (one error line, no traceback)."""
    capsys.readouterr()
    reopen_log_streams()
    with pytest.raises(SystemExit) as e:
        run_cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and "Traceback" not in err, err
    return err


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def e2e(cli_setup):
    out = cli_setup.root / "run"
    report = run_cli(cli_setup.argv + ["--output.dir", str(out)])
    return SimpleNamespace(out=out, report=report)


def test_cli_end_to_end(cli_setup, e2e, models):
    out, key = e2e.out, "lsc_ref"
    good, bad = read_jsonl(out / "references.jsonl"), read_jsonl(out / "errors.jsonl")
    # Every prompt exactly once, in input order within each file.
    assert sorted(r["uid"] for r in good + bad) == sorted(r["uid"] for r in cli_setup.rows)
    assert [r["uid"] for r in bad] == ["empty", "fail"]
    assert bad[0][key]["A"]["error"] == "empty prompt" and bad[0][key]["A"]["retry"] is False
    # The server answered null for FAIL's queries: that prompt fails for that RM, retryably, and the run goes on.
    judge = bad[1][key]["judge"]
    assert "reward model 'judge' at http://127.0.0.1" in judge["error"] and "is None" in judge["error"]
    assert judge["retry"] is True and bad[1][key]["A"]["reference"] is not None
    eos = "</s>"
    for row in good:
        lab = row[key]
        assert lab["A"]["reference"] == lab["A"]["quantiles"]["0.85"] and lab["A"]["k"] == 4
        judge = lab["judge"]
        assert judge["reference"] == pytest.approx(judge["mean"] + Z(0.5) * judge["std"], abs=1e-9)
        assert lab["B"]["reference"] == pytest.approx(lab["B"]["predicted_mean"] + Z(0.75) * lab["B"]["predicted_std"])
        # Canned scores recomputed independently: the server scores prompt + canned response + the policy EOS.
        expected = [http_score(row["input"] + c + eos) for c in estimate.CANNED_RESPONSES]
        assert lab["harmless"]["canned_scores"] == pytest.approx(expected)
        assert lab["harmless"]["reference"] == pytest.approx(np.mean(expected))

    # PPO reads the output as a prompt dataset: OpenRLHF's loader and PromptDataset, then the plugin's reader.
    from openrlhf.datasets import PromptDataset
    from openrlhf.datasets.utils import blending_datasets

    data_args = SimpleNamespace(input_key="input", label_key=key, apply_chat_template=False, image_key="images")
    args = SimpleNamespace(data=data_args, use_ms=False)
    strategy = SimpleNamespace(args=args, is_rank_0=lambda: False, print=lambda *a: None)
    dataset = PromptDataset(blending_datasets(str(out / "references.jsonl"), None, strategy), None, strategy)
    names = ["A", "judge", "B", "harmless"]
    refs = references_from_labels(dataset.labels, names, key)
    np.testing.assert_allclose(refs.numpy(), [[r[key][n]["reference"] for n in names] for r in good], atol=1e-6)

    report = json.loads((out / "report.json").read_text())
    assert report["rms"]["A"]["with_reference"] == NUM_PROMPTS - 1 and report["rms"]["judge"]["errors"] == 2
    assert report["rows_written"] == len(good) == NUM_PROMPTS - 2
    assert set(report["rms"]["B"]["learned"]) >= {"holdout_mae", "holdout_spearman", "train_prompts"}
    for name in names:
        assert (out / f"hist-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rerun_keeps_finished_shards_retries_failed_prompts_and_guards_settings(cli_setup, e2e, capsys):
    out = e2e.out
    shards = sorted((out / "shards").iterdir())
    assert len(shards) == NUM_PROMPTS // 2
    before = {p: p.stat().st_mtime_ns for p in shards}
    first = (out / "references.jsonl").read_text()
    run_cli(cli_setup.argv + ["--output.dir", str(out), "--rm.batch_size", "3"])  # speed knobs may change
    # Only the shard holding FAIL (retryable failures) is redone, and only its FAIL prompt.
    changed = [p.name for p in shards if p.stat().st_mtime_ns != before[p]]
    assert changed == ["shard-00005.jsonl"]
    assert [r["attempt"] for r in read_jsonl(shards[5])] == [0, 1]  # the empty prompt is not retried
    assert (out / "references.jsonl").read_text() == first
    assert "ref.k: 4 -> 3" in cli_fails(cli_setup.argv + ["--output.dir", str(out), "--ref.k", "3"], capsys)
    err = cli_fails(cli_setup.argv + ["--rm.paths", "a/rm,b/rm", "--output.dir", str(out)], capsys)
    assert "--rm.names has 4 names for 2 --rm.paths" in err
    err = cli_fails(cli_setup.argv + ["--output.dir", str(out), "--data.label_key", "uid"], capsys)
    assert "already have a field 'uid'" in err and "--data.label_key" in err
    argv = list(cli_setup.argv)
    del argv[argv.index("--rm.names") : argv.index("--rm.names") + 2]
    err = cli_fails(argv + ["--rm.paths", "a/rm,b/rm", "--output.dir", str(out)], capsys)
    assert "names ['rm'] are not unique: set --rm.names" in err


def test_cli_resumes_after_kill_9_with_every_prompt_once(cli_setup, e2e):
    out = cli_setup.root / "killed"
    cmd = [sys.executable, "-m", "openrlhf_lsc.cli.estimate_reference", *cli_setup.argv, "--output.dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "shards").glob("shard-*.jsonl"))) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run was not killed mid-way"
    written = sorted((out / "shards").glob("shard-*.jsonl"))
    assert 2 <= len(written) < NUM_PROMPTS // 2 and not (out / "references.jsonl").exists()
    kept = {p: p.read_text() for p in written}
    for text in kept.values():  # finished shards are whole
        assert len(text.splitlines()) == 2 and all(json.loads(line) for line in text.splitlines())

    run_cli(cli_setup.argv + ["--output.dir", str(out)])
    assert {p: p.read_text() for p in written} == kept
    resumed, full = read_jsonl(out / "references.jsonl"), read_jsonl(e2e.out / "references.jsonl")
    # Same prompts once each, same references as the uninterrupted run (shards are seeded per index).
    assert [r["uid"] for r in resumed] == [r["uid"] for r in full]
    assert read_jsonl(out / "errors.jsonl") == read_jsonl(e2e.out / "errors.jsonl")
    for a, b in zip(resumed, full):
        for name in a["lsc_ref"]:
            assert a["lsc_ref"][name]["reference"] == pytest.approx(b["lsc_ref"][name]["reference"], rel=1e-6, abs=1e-9)


def test_cli_overwrite_starts_over(cli_setup, server, tmp_path):
    out = tmp_path / "ow"
    argv = ["--data.prompt_dataset", str(cli_setup.root / "prompts.jsonl"), "--actor.model_name_or_path",
            cli_setup.argv[cli_setup.argv.index("--actor.model_name_or_path") + 1], "--rm.paths", server.url,
            "--rm.names", "harmless", "--ref.method", "canned", "--output.dir", str(out), "--output.shard_size", "5",
            "--output.drop_failed"]
    run_cli(argv)
    (out / "shards" / "shard-00000.jsonl").write_text("garbage\n")
    run_cli(argv + ["--overwrite"])
    assert json.loads((out / "shards" / "shard-00000.jsonl").read_text().splitlines()[0])["index"] == 0
    assert len(read_jsonl(out / "references.jsonl")) == NUM_PROMPTS - 2


@pytest.fixture
def small_run(models, server, tmp_path):
    """Six plain prompts, a local RM and the test server, no --output.drop_failed."""
    rows = [{"input": f"question {i}: what is {i} plus one?", "uid": f"s{i}"} for i in range(6)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--data.prompt_dataset", str(tmp_path / "p.jsonl"), "--data.id_key", "uid",
            "--actor.model_name_or_path", str(models / "policy"), "--rm.paths", f"{models / 'rm_a'},{server.url}",
            "--rm.names", "A,judge", "--ref.k", "3", "--rollout.max_new_tokens", "4", "--data.max_len", "48",
            "--output.shard_size", "2", "--rm.retries", "0", "--output.dir", str(tmp_path / "out")]
    yield SimpleNamespace(argv=argv, out=tmp_path / "out", rows=rows)
    server.state.broken = server.state.down = False


def test_cli_server_without_scores_exits_1_then_a_plain_rerun_completes(small_run, server, capsys):
    out = small_run.out
    server.state.broken = True  # answers the probe, then {"rewards": []}
    err = cli_fails(small_run.argv, capsys, code=1)
    assert "6 of 6 prompts have no reference (6 may succeed on a rerun" in err and str(out / "errors.jsonl") in err
    assert not (out / "references.jsonl").exists()
    failed = read_jsonl(out / "errors.jsonl")
    assert [r["uid"] for r in failed] == [r["uid"] for r in small_run.rows]
    assert all(r["lsc_ref"]["judge"]["retry"] and "expected {\"rewards\"" in r["lsc_ref"]["judge"]["error"] for r in failed)

    server.state.broken = False
    report = run_cli(small_run.argv)  # the same command, no --overwrite
    good = read_jsonl(out / "references.jsonl")
    assert [r["uid"] for r in good] == [r["uid"] for r in small_run.rows] and report["rows_with_errors"] == 0
    assert read_jsonl(out / "errors.jsonl") == []
    for before, after in zip(failed, good):  # A's finished entries were kept, not recomputed
        assert after["lsc_ref"]["A"] == before["lsc_ref"]["A"]
        assert after["lsc_ref"]["judge"]["k"] == 3 and np.isfinite(after["lsc_ref"]["judge"]["reference"])


def test_cli_server_down_mid_run_stops_resumably(small_run, server, capsys):
    out = small_run.out
    server.state.down = True  # answers the probe, then HTTP 503
    err = cli_fails(small_run.argv, capsys, code=1)
    assert f"reward model 'judge' at {server.url}: HTTP 503" in err and "rerun the same command to continue" in err
    assert not list((out / "shards").glob("*.jsonl")) and not (out / "references.jsonl").exists()
    server.state.down = False
    run_cli(small_run.argv)
    assert [r["uid"] for r in read_jsonl(out / "references.jsonl")] == [r["uid"] for r in small_run.rows]
