"""The real server once: OpenRLHF's own `python -m openrlhf.cli.serve_rm` on 127.0.0.1 with a tiny reward model on
CPU (flash-attn stand-in from tests/stubs on its path). The plugin's client, the estimator and the selection tool
score through it; every score equals that reward model's own forward on the same text."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openrlhf_lsc.serve_rm import RewardServerError, ServeRMClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from cpu_harness import tiny_models

    root = tmp_path_factory.mktemp("serve_rm")
    models = tiny_models.build(root / "models")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "openrlhf.cli.serve_rm", "--reward.model_name_or_path", str(models / "rm_a"),
         "--host", "127.0.0.1", "--port", str(port), "--ds.attn_implementation", "eager", "--data.max_len", "128",
         "--batch_size", "4"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/get_reward"
    deadline = time.time() + 300
    while True:
        try:
            ServeRMClient(url, retries=0, timeout=60).score(["warm up"])
            break
        except RewardServerError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"serve_rm did not start: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
    yield {"url": url, "models": models, "root": root}
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def own_forward(served):
    """The reward model's own forward, one text at a time (no padding), as OpenRLHF loads it."""
    from openrlhf.models import get_llm_for_sequence_regression
    from openrlhf.utils import get_tokenizer

    path = str(served["models"] / "rm_a")
    model = get_llm_for_sequence_regression(path, "reward", param_dtype="bf16", attn_implementation="eager").eval()
    tok = get_tokenizer(path, model, "left", None)

    @torch.no_grad()
    def score(text):
        ids = tok(text, add_special_tokens=False, return_tensors="pt", truncation=True, max_length=128)["input_ids"]
        return model(ids, torch.ones_like(ids)).item()

    return score


def test_client_scores_equal_the_models_own_forward(served, own_forward):
    texts = ["what is two plus three? five</s>", "good", "why how what is ten plus nine minus six</s>",
             "question 5: what is one?", "bad answer", "the a one two three four five six seven</s>"]
    got = ServeRMClient(served["url"], name="rm_a", batch_size=4).score(texts)
    want = [own_forward(t) for t in texts]
    assert torch.tensor(want).std() > 0.1
    # serve_rm pads batches (left) in bf16: 1 bf16 ulp at these magnitudes is about 0.008.
    assert got == pytest.approx(want, abs=0.02)


def test_estimator_and_selection_score_through_the_real_server(served, own_forward, tmp_path):
    from openrlhf_lsc import estimate
    from openrlhf_lsc.cli import estimate_reference, select_rehearsal

    rows = [{"input": f"question {i}: what is {i} plus two?", "output": f"{i} plus two is {i + 2}", "uid": f"u{i}"}
            for i in range(4)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = served["models"]
    estimate_reference.main([
        "--data.prompt_dataset", str(tmp_path / "p.jsonl"), "--data.id_key", "uid",
        "--actor.model_name_or_path", str(models / "policy"), "--rm.paths", served["url"], "--rm.names", "harmless",
        "--ref.method", "canned", "--output.dir", str(tmp_path / "refs"),
    ])
    eos = "</s>"
    for row in (json.loads(line) for line in (tmp_path / "refs" / "references.jsonl").read_text().splitlines()):
        want = [own_forward(row["input"] + c + eos) for c in estimate.CANNED_RESPONSES]
        assert row["lsc_ref"]["harmless"]["canned_scores"] == pytest.approx(want, abs=0.02)

    select_rehearsal.main([
        "--data.dataset", str(tmp_path / "p.jsonl"), "--select.n_clusters", "2", "--select.rehearsal_k", "1",
        "--select.ppo_fraction", "0.5", "--score.url", served["url"], "--score.batch_size", "3",
        "--output.dir", str(tmp_path / "split"),
    ])
    got = [json.loads(line)["score"] for line in (tmp_path / "split" / "assignments.jsonl").read_text().splitlines()]
    # Without a tokenizer (a URL), the pair is prompt + response as written.
    assert got == pytest.approx([own_forward(r["input"] + r["output"]) for r in rows], abs=0.02)
