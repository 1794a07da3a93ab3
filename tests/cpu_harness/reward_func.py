"""Test-only reward sources with two named raw rewards, for end-to-end runs (`--reward.remote_url` this file,
`--train.agent_func_path agent.py`). The rewards are simple functions of the text so a test can recompute them
from the token ids alone: `length` and `vowels` of the text the source sees (the query for a reward_func, the
response for an agent). Each is returned as extra_logs['lsc/<name>/reward']; the scalar `rewards` is the source's
own combination (here their sum times 100: a value the plugin must not use when --lsc.reward_names is given).
"""

NAMES = ("length", "vowels")


def named_rewards(text: str) -> dict:
    return {"length": len(text) / 20.0, "vowels": sum(text.count(v) for v in "aeiou") / 4.0}


def reward_func(queries, prompts, labels):
    (query,) = queries  # OpenRLHF calls a reward_func with one sample
    rewards = named_rewards(query)
    return {"rewards": 100.0 * sum(rewards.values()), "scores": 0.5,
            "extra_logs": {f"lsc/{name}/reward": value for name, value in rewards.items()}}
