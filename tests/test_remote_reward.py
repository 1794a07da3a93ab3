"""The drop-in reward_func (`openrlhf_lsc.remote`, examples/reward_func_lsc.py) against loopback serve_rm-protocol
servers, run by OpenRLHF's own executor and sample builder, and consumed by the plugin's reward hook."""

import asyncio
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from openrlhf_lsc.rewards import RewardSpec

ROOT = Path(__file__).resolve().parents[1]


def serve(score, fail_first=0):
    """A serve_rm-protocol server on 127.0.0.1 scoring each query with `score`; the first `fail_first` calls get 503."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(payload)
            if len(calls) <= fail_first:
                self.send_error(503)
                return
            body = json.dumps({"rewards": [score(q) for q in payload["query"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.calls = calls
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def helpful(q):
    return 0.5 * len(q)


def harmless(q):
    return 3.0 - q.count("!")


def url(server):
    return f"http://127.0.0.1:{server.server_port}/get_reward"


@pytest.fixture
def servers(monkeypatch):
    pair = serve(helpful), serve(harmless)
    monkeypatch.setenv("LSC_HELPFUL_URL", url(pair[0]))
    monkeypatch.setenv("LSC_HARMLESS_URL", url(pair[1]))
    yield pair
    for server in pair:
        server.shutdown()


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_openrlhf_executor_loads_the_example_and_gets_and_lsc_plus_raw_rewards(servers):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor([str(ROOT / "examples" / "reward_func_lsc.py")])
    label = {"helpful": {"reference": 2.0}, "harmless": {"reference": 1.5}}
    query = "hello!!"
    out = asyncio.run(executor._fetch_rewards_via_func([query], ["p"], [label]))[0]
    r_help, r_harm = helpful(query), harmless(query)
    expected = -math.log1p(math.exp(-(r_help - 2.0))) - math.log1p(math.exp(-(r_harm - 1.5)))
    assert out["rewards"] == pytest.approx(expected, rel=1e-12) and out["scores"] == out["rewards"]
    logs = out["extra_logs"]
    assert logs["lsc/helpful/reward"] == r_help and logs["lsc/harmless/reward"] == r_harm
    assert logs["lsc/harmless/margin"] == pytest.approx(r_harm - 1.5) and logs["lsc/helpful/above_ref"] == 1.0


class Engine:
    """What OpenRLHF's executor needs of a vLLM engine: `generate` returning one continuation."""

    def __init__(self, continuations):
        self.continuations = iter(continuations)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        ids = next(self.continuations)
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, text="", finish_reason="stop", logprobs=None)])


def test_named_rewards_flow_from_the_reward_func_through_openrlhf_into_the_plugin(servers, tmp_path):
    """OpenRLHF's SingleTurnAgentExecutor runs the example reward_func on each rollout, its sample builder copies
    extra_logs into the experience, and the plugin (--lsc.reward_names helpful,harmless, group reference) trains on
    the LSC of the raw rewards, not on the reward_func's own utility: checked against numpy."""
    import openrlhf.trainer.ppo_utils.experience_maker as em
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    from cpu_harness.tiny_models import make_tokenizer
    from openrlhf_lsc.integration import register

    register()
    tokenizer = make_tokenizer()
    executor = SingleTurnAgentExecutor([str(ROOT / "examples" / "reward_func_lsc.py")])
    n, prompts = 3, ["what is one plus two?", "how good is ten?"]
    label = json.dumps({"helpful": {"reference": 0.0}, "harmless": {"reference": 0.0}})
    g = torch.Generator().manual_seed(0)
    continuations = [torch.randint(3, len(tokenizer), (int(torch.randint(1, 6, (1,), generator=g)),),
                                   generator=g).tolist() + [tokenizer.eos_token_id] for _ in range(n * len(prompts))]
    engine, samples = Engine(continuations), []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            response = asyncio.run(executor.execute(prompt, label, SimpleNamespace(max_tokens=8, logprobs=None),
                                                    64, tokenizer, engine))
            sample = SamplesGenerator._process_response_into_experience(None, response, max_len=64)
            sample.index = [p * n + j]
            samples.append(sample)
    experiences = [Experience.concat_experiences(samples[i : i + 2], tokenizer.pad_token_id) for i in range(0, 6, 2)]
    for e in experiences:  # what make_experience adds (no reference model: zero KL)
        e.kl = torch.zeros(e.action_mask.shape)

    maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
    maker.advantage_estimator, maker.kl_ctl = "reinforce", SimpleNamespace(value=0.0)
    maker.strategy = SimpleNamespace(args=SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=n), reward=SimpleNamespace(clip_range=None),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator="reinforce", gamma=1.0, lambd=1.0, no_std_norm=True)),
        lsc=SimpleNamespace(spec=RewardSpec(names=("helpful", "harmless"), transform="lsc", reference="group",
                                            quantile=0.5), extra_logs=True, dump_rewards=None, scale=None)))
    out = maker.compute_advantages_and_returns(experiences)

    queries = [tokenizer.decode(tokenizer(prompts[i // n], add_special_tokens=False)["input_ids"] + c,
                                skip_special_tokens=False) for i, c in enumerate(continuations)]
    raw = np.array([[helpful(q), harmless(q)] for q in queries])
    refs = np.repeat(np.quantile(raw.reshape(len(prompts), n, 2), 0.5, axis=1), n, axis=0)
    utility = log_sigmoid(raw - refs).sum(1)
    got = torch.cat([e.rewards for e in out]).double().numpy()
    np.testing.assert_allclose(got, utility, rtol=1e-5, atol=1e-6)
    assert np.ptp(raw[:, 0]) > 0  # the rollouts differ: a real group reference
    own = [s.rewards.item() for s in samples]  # the reward_func's own (label-reference) utility: not trained on
    assert not np.allclose(own, utility)
    np.testing.assert_allclose(sum((e.info["lsc/reward"] for e in out), []), own, rtol=1e-6)


def test_a_server_that_stays_down_ends_the_run_naming_it(servers):
    """OpenRLHF's executor swallows a reward_func's Exception (the sample then has no reward); the combiner's error
    passes through it, naming the server, after the client's retries."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    from openrlhf_lsc.remote import RemoteRewardCombiner, RewardFuncError

    combine = RemoteRewardCombiner({"helpful": "http://127.0.0.1:9/get_reward"}, retries=1, backoff=0.0, timeout=5)
    executor = SingleTurnAgentExecutor([str(ROOT / "examples" / "reward_func_lsc.py")])
    executor.reward_func = combine
    with pytest.raises(RewardFuncError, match=r"reward model 'helpful' at http://127.0.0.1:9/get_reward: .*2 attempt"):
        asyncio.run(executor.execute("p", "", SimpleNamespace(max_tokens=4, logprobs=None), 32,
                                     _whitespace_tokenizer(), Engine([[1, 2]])))


def _whitespace_tokenizer():
    class Tok:
        def __call__(self, text, add_special_tokens=False, return_tensors=None):
            return {"input_ids": torch.tensor([[1] * max(1, len(text.split()))])}

        def decode(self, ids, skip_special_tokens=False):
            return "x" * len(ids)

    return Tok()


def test_a_503_is_retried_and_bad_answers_and_labels_are_refused():
    from openrlhf_lsc.remote import RemoteRewardCombiner, RewardFuncError

    flaky, text = serve(helpful, fail_first=1), serve(lambda q: "1.5")
    try:
        ok = RemoteRewardCombiner({"helpful": url(flaky)}, backoff=0.0)
        assert ok(["abcd"], ["p"], [""])["rewards"] == 2.0 and len(flaky.calls) == 2
        with pytest.raises(RewardFuncError, match=r"reward model 'h' at .*: reward 0 .* is '1.5', expected a finite number"):
            RemoteRewardCombiner({"h": url(text)})(["q"], ["p"], [""])
        spec = RewardSpec(names=("helpful",), transform="lsc", reference="label", label_key="lsc_ref")
        with pytest.raises(RewardFuncError, match=r"prompt 'how are you\?': field 'lsc_ref' has no finite reference"):
            RemoteRewardCombiner({"helpful": url(flaky)}, spec)(["q"], ["how are you?"], [{"other": {"reference": 1}}])
    finally:
        flaky.shutdown()
        text.shutdown()


def test_configuration_errors_name_what_to_change():
    from openrlhf_lsc.remote import RemoteRewardCombiner

    with pytest.raises(ValueError, match=r"names \['b'\] must be the urls' names \['a'\]"):
        RemoteRewardCombiner({"a": "http://h:1/x"}, RewardSpec(names=("b",)))
    with pytest.raises(ValueError, match="one sample at a time"):
        RemoteRewardCombiner({"a": "http://h:1/x"}, RewardSpec(names=("a",), transform="lsc", reference="group",
                                                                quantile=0.5))
    with pytest.raises(ValueError, match="reward server URL 'ftp://h/x'"):
        RemoteRewardCombiner({"a": "ftp://h/x"})
