"""The drop-in reward_func against two local serve_rm-protocol servers, loaded by OpenRLHF's own executor."""

import asyncio
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def serve(score):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps({"rewards": [score(q) for q in payload["query"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def servers(monkeypatch):
    helpful = serve(lambda q: 0.5 * len(q))
    harmless = serve(lambda q: 3.0 - q.count("!"))
    monkeypatch.setenv("LSC_HELPFUL_URL", f"http://127.0.0.1:{helpful.server_port}/get_reward")
    monkeypatch.setenv("LSC_HARMLESS_URL", f"http://127.0.0.1:{harmless.server_port}/get_reward")
    yield
    helpful.shutdown()
    harmless.shutdown()


def test_openrlhf_executor_loads_the_example_and_gets_and_lsc(servers):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor([str(ROOT / "examples" / "reward_func_lsc.py")])
    label = {"helpful": {"reference": 2.0}, "harmless": {"reference": 1.5}}
    query = "hello!!"
    out = asyncio.run(executor._fetch_rewards_via_func([query], ["p"], [label]))[0]
    r_help, r_harm = 0.5 * len(query), 3.0 - 2
    expected = -math.log1p(math.exp(-(r_help - 2.0))) - math.log1p(math.exp(-(r_harm - 1.5)))
    assert out["rewards"] == pytest.approx(expected, rel=1e-6)
    assert out["extra_logs"]["lsc/harmless/margin"] == pytest.approx(r_harm - 1.5)
    assert out["extra_logs"]["lsc_transformed"] == 1.0


def test_missing_reference_names_the_field(servers):
    from openrlhf_lsc.remote import RemoteRewardCombiner

    combine = RemoteRewardCombiner({"helpful": "http://127.0.0.1:1/x"}, reference="label", label_key="lsc_ref")
    combine._score = lambda url, q, p, l: [1.0]
    with pytest.raises(ValueError, match="field 'lsc_ref' has no finite reference for reward model 'helpful'"):
        combine(["q"], ["p"], [{"other": {"reference": 1.0}}])
    with pytest.raises(ValueError, match="--lsc.transform"):
        RemoteRewardCombiner({"a": "u"}, transform="tanh")
    with pytest.raises(ValueError, match="one sample at a time"):
        RemoteRewardCombiner({"a": "u"}, reference="group")
