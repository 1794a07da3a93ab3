"""The estimator's GPU path on CPU: OpenRLHF's vLLM engine factory replaced by the HF-generate stand-in of
tests/cpu_harness (which runs OpenRLHF's own SingleTurnAgentExecutor), reward models on Ray actors."""

from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # Logical GPUs: the engine factory and the RM actors ask for one each, as on a cluster.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_vllm_sampler_and_ray_reward_model(ray_cluster, tmp_path, monkeypatch):
    from cpu_harness import fake_vllm, tiny_models

    import openrlhf.trainer.ray.vllm_engine as vllm_engine
    from openrlhf.utils import get_tokenizer
    from openrlhf_lsc.integration import estimate_io

    models = tiny_models.build(tmp_path)
    monkeypatch.setattr(vllm_engine, "create_vllm_engines", fake_vllm.create_vllm_engines)
    tok = get_tokenizer(str(models / "policy"), None, "left", None)
    sampler = estimate_io.VLLMSampler(str(models / "policy"), tok, max_new_tokens=6, max_len=64, num_engines=1)
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
    remote = estimate_io.RayRewardModel(str(models / "rm_a"), num_actors=1, num_gpus_per_actor=1, batch_size=4)
    local = estimate_io.LocalRewardModel(str(models / "rm_a"), batch_size=4)
    assert remote(flat_p, flat_r) == local(flat_p, flat_r)  # same weights, same batches: identical
    assert torch.isfinite(torch.tensor(local(flat_p, flat_r))).all()
