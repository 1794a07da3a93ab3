"""The estimator's GPU path on CPU: OpenRLHF's vLLM engine factory replaced by the HF-generate stand-in of
tests/cpu_harness (which runs OpenRLHF's own SingleTurnAgentExecutor), reward models on Ray actors."""

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_cluster():
    import ray

    # Logical GPUs: the engine factory and the RM actors ask for one each, as on a cluster. One cluster per test:
    # a test's engines and actors hold their GPUs until shutdown.
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_vllm_sampler_and_ray_reward_model(ray_cluster, tmp_path, monkeypatch):
    from cpu_harness import fake_vllm, tiny_models

    import openrlhf.trainer.ray.vllm_engine as vllm_engine
    from openrlhf.utils import get_tokenizer
    from openrlhf_lsc.integration import offline, samplers

    models = tiny_models.build(tmp_path)
    monkeypatch.setattr(vllm_engine, "create_vllm_engines", fake_vllm.create_vllm_engines)
    tok = get_tokenizer(str(models / "policy"), None, "left", None)
    sampler = samplers.VLLMSampler(str(models / "policy"), tok, max_new_tokens=6, max_len=64, num_engines=1)
    prompts = ["what is two plus three?", "good", "question 5: what is one?"]
    decoded = []  # the response token ids the sampler cuts out of OpenRLHF's observation tokens

    def decode(ids, **kwargs):
        decoded.append(list(ids))
        return tok.decode(ids, **kwargs)

    sampler.tokenizer = SimpleNamespace(decode=decode)
    responses = sampler(prompts, 3)
    assert [len(r) for r in responses] == [3, 3, 3] and len(decoded) == 9
    for ids in decoded:  # response only (the prompt is cut off), EOS kept, at most max_new_tokens
        assert 1 <= len(ids) <= 6 and (ids[-1] == tok.eos_token_id or len(ids) == 6)

    flat_p = [p for p in prompts for _ in range(3)]
    flat_r = [r for rs in responses for r in rs]
    remote = offline.RayRewardModel(str(models / "rm_a"), num_actors=1, num_gpus_per_actor=1, batch_size=4)
    local = offline.LocalRewardModel(str(models / "rm_a"), batch_size=4)
    assert remote(flat_p, flat_r) == local(flat_p, flat_r)  # same weights, same batches: identical
    assert torch.isfinite(torch.tensor(local(flat_p, flat_r))).all()


def _stock_default(flag: str):
    """The default of `flag` in OpenRLHF's own train_ppo_ray parser, read from its source."""
    import ast
    import inspect as _inspect

    import openrlhf.cli.train_ppo_ray as stock

    for node in ast.walk(ast.parse(_inspect.getsource(stock))):
        if isinstance(node, ast.Call) and node.args and getattr(node.args[0], "value", None) == flag:
            return next(ast.literal_eval(k.value) for k in node.keywords if k.arg == "default")
    raise AssertionError(f"{flag} not in openrlhf.cli.train_ppo_ray")


def test_cli_with_vllm_engines_scores_in_ray_actors_with_a_create_vllm_engines_call_its_signature_accepts(
    ray_cluster, tmp_path, monkeypatch
):
    import inspect
    import json

    from cpu_harness import fake_vllm, tiny_models

    import openrlhf.trainer.ray.vllm_engine as vllm_engine
    from openrlhf_lsc.cli import estimate_reference
    from openrlhf_lsc.integration import offline

    real, calls, actors = vllm_engine.create_vllm_engines, [], []

    def checked(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)  # TypeError on a call it would refuse
        return fake_vllm.create_vllm_engines(*args, **kwargs)

    class Recording(offline.RayRewardModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            actors.append(self)

    local_init, in_driver = offline.LocalRewardModel.__init__, []

    def record_local(self, *args, **kwargs):  # runs only here: Ray actors import the class afresh
        in_driver.append(args)
        local_init(self, *args, **kwargs)

    monkeypatch.setattr(vllm_engine, "create_vllm_engines", checked)
    monkeypatch.setattr(offline, "RayRewardModel", Recording)
    monkeypatch.setattr(offline.LocalRewardModel, "__init__", record_local)
    models = tiny_models.build(tmp_path / "models")
    rows = [{"input": f"question {i}: what is {i} plus two?"} for i in range(3)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = estimate_reference.main([
        "--data.prompt_dataset", str(tmp_path / "p.jsonl"), "--actor.model_name_or_path", str(models / "policy"),
        "--rm.paths", str(models / "rm_a"), "--ref.k", "2", "--rollout.max_new_tokens", "4", "--data.max_len", "48",
        "--vllm.num_engines", "1", "--rm.num_actors", "1", "--rm.num_gpus_per_actor", "1",
        "--output.dir", str(tmp_path / "out"),
    ])
    assert report["rows_written"] == 3 and len(calls) == 1 and len(actors) == 1
    call = calls[0]
    assert call["gpu_memory_utilization"] == _stock_default("--vllm.gpu_memory_utilization") == 0.95
    assert call["pretrain"] == str(models / "policy") and call["num_engines"] == 1 and call["max_model_len"] == 48
    assert in_driver == []  # the driver loaded no reward model: it scored in the Ray actor
