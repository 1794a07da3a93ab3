"""A test-only stand-in for OpenRLHF's vLLM rollout actor: same methods, HF `generate` on CPU.

It offers what OpenRLHF 0.11.2 calls on an engine (`trainer/ray/vllm_engine.py` RolloutRayActor):
`generate_responses` (through OpenRLHF's own agent executors, as the real one), `generate`,
`get_num_unfinished_requests`, weight sync (`init_process_group` + `update_weight`, a gloo
broadcast from the DeepSpeed actor) and the cache/sleep calls as no-ops.
"""

import asyncio
from types import SimpleNamespace
from typing import List, Optional

import ray
import torch
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cpu_harness.worker_shims import GlooGroup


@ray.remote
class FakeRolloutActor:
    def __init__(self, pretrain: str, seed: int, agent_func_path: Optional[str] = None, remote_rm_url=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from openrlhf.trainer.ray.vllm_engine import _load_agent_executor
        from openrlhf.utils.agent import SingleTurnAgentExecutor

        torch.manual_seed(seed)
        # bf16 like the real engines (`dtype="bfloat16"`): the actor broadcasts bf16 weights.
        self.model = AutoModelForCausalLM.from_pretrained(pretrain, dtype=torch.bfloat16).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(pretrain)
        # as the real RolloutRayActor: the user's agent executor, or single-turn with the reward source
        self.executor = _load_agent_executor(agent_func_path) if agent_func_path else SingleTurnAgentExecutor(remote_rm_url)
        self.group = None

    async def generate(self, prompt_token_ids: List[int], sampling_params, multi_modal_data=None):
        """One continuation, shaped like vLLM's RequestOutput (EOS kept, as vLLM does)."""
        if multi_modal_data or sampling_params.logprobs is not None:
            raise NotImplementedError("the CPU fake engine supports text-only rollouts without rollout log-probs")
        eos = self.model.generation_config.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt_token_ids]),
                attention_mask=torch.ones(1, len(prompt_token_ids), dtype=torch.long),
                do_sample=sampling_params.temperature > 0,
                temperature=sampling_params.temperature or None,
                top_p=sampling_params.top_p,
                top_k=max(sampling_params.top_k, 0),
                max_new_tokens=sampling_params.max_tokens,
                min_new_tokens=sampling_params.min_tokens,
                eos_token_id=eos,
                pad_token_id=self.model.generation_config.pad_token_id,
            )
        token_ids = out[0, len(prompt_token_ids) :].tolist()
        finish_reason = "stop" if token_ids and token_ids[-1] == eos else "length"
        text = self.tokenizer.decode(token_ids, skip_special_tokens=sampling_params.skip_special_tokens)
        return SimpleNamespace(
            outputs=[SimpleNamespace(token_ids=token_ids, text=text, finish_reason=finish_reason, logprobs=None)]
        )

    async def generate_responses(
        self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples=1, images=None
    ):
        tasks = [
            self.executor.execute(
                prompt=prompt,
                label=label,
                sampling_params=sampling_params,
                max_length=max_length,
                hf_tokenizer=hf_tokenizer,
                llm_engine=self,
                images=images,
            )
            for _ in range(num_samples)
        ]
        return await asyncio.gather(*tasks)

    def get_num_unfinished_requests(self) -> int:
        return 0  # generation is synchronous: nothing is ever left in flight

    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name, backend, use_ray):
        if use_ray or backend != "gloo":
            raise ValueError("the CPU fake engine syncs weights over gloo only: pass --vllm.sync_backend gloo")
        self.group = GlooGroup(master_address, master_port, rank_offset, world_size)

    def update_weight(self, name, dtype, shape, empty_cache=False):
        weight = torch.empty(shape, dtype=dtype)
        self.group.broadcast(weight, src=0)
        self.model.get_parameter(name).data.copy_(weight)

    def parameters_checksum(self) -> float:
        """Sum of all weights in float64, to compare with the trained actor after weight sync."""
        return float(sum(p.detach().double().sum() for p in self.model.parameters()))

    def reset_prefix_cache(self):
        pass

    def sleep(self, level=1):
        pass

    def wake_up(self, tags=None):
        pass


def create_vllm_engines(
    num_engines: int,
    tensor_parallel_size: int,
    pretrain: str,
    seed: int,
    full_determinism: bool,
    enable_prefix_caching: bool,
    enforce_eager: bool,
    max_model_len: int,
    shared_pg=None,
    gpu_memory_utilization=None,
    vllm_enable_sleep=False,
    logprobs_mode=None,
    agent_func_path: Optional[str] = None,
    remote_rm_url: Optional[str] = None,
    max_images_per_prompt: int = 0,
):
    """Drop-in for `openrlhf.trainer.ray.create_vllm_engines`: fake engines on the same placement."""
    if tensor_parallel_size != 1 or max_images_per_prompt:
        raise NotImplementedError("the CPU fake engine supports --vllm.tensor_parallel_size 1, text only")
    num_gpus = 0.2 if shared_pg is not None else 1  # as the stock factory: engines share GPUs when colocated
    if shared_pg is None:
        shared_pg = placement_group([{"GPU": 1, "CPU": 1}] * num_engines, strategy="PACK")
        ray.get(shared_pg.ready())
    return [
        FakeRolloutActor.options(
            num_cpus=num_gpus,
            num_gpus=num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=shared_pg, placement_group_bundle_index=i
            ),
        ).remote(pretrain, seed + i, agent_func_path, remote_rm_url)
        for i in range(num_engines)
    ]
