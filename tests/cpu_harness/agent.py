"""Test-only OpenRLHF agent (`--train.agent_func_path`): one step, the response's two named raw rewards in the
last step's extra_logs (see reward_func.py)."""

import torch

from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor

from cpu_harness.reward_func import named_rewards


class AgentInstance(AgentInstanceBase):
    def __init__(self, *args, **kwargs):
        pass

    async def reset(self, states: dict, **kwargs):
        return {"observation": states["observation"]}

    async def step(self, states: dict, **kwargs):
        rewards = named_rewards(states["action_text"])
        return {"rewards": torch.tensor(100.0 * sum(rewards.values())), "scores": 0.5,
                "environment_feedback": "", "done": True, "sampling_params": states.get("sampling_params"),
                "extra_logs": {f"lsc/{name}/reward": value for name, value in rewards.items()}}


class AgentExecutor(MultiTurnAgentExecutor):
    def __init__(self):
        super().__init__(AgentInstance)
