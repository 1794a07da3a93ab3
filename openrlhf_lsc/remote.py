"""A drop-in OpenRLHF `reward_func` scoring each rollout on K reward-model servers (OpenRLHF's `serve_rm`), for
`--reward.remote_url <file.py>` (see examples/reward_func_lsc.py).

It returns the K raw rewards as `extra_logs["lsc/<name>/reward"]`, which the plugin CLI reads with
`--lsc.reward_names` and transforms itself (any reference, group too), and, as its scalar `rewards` / `scores`, the
utility of its own `RewardSpec`: what the stock CLI (no transform of its own) trains on and dynamic filtering sees.
"""

from typing import Dict, List, Optional

import torch

from openrlhf_lsc.rewards import RewardSpec, reward_utilities
from openrlhf_lsc.serve_rm import RewardServerError, ServeRMClient


class RewardFuncError(BaseException):
    """Ends the PPO run with its message (a reward server that stays down, a bad reference label).

    A BaseException on purpose: OpenRLHF's executor catches any Exception from a reward_func, logs it, leaves the
    sample without a reward, and the run then fails later in unrelated code. Ray passes this one to the trainer.
    """


class RemoteRewardCombiner:
    """Callable `reward_func(queries, prompts, labels)` scoring each query on K `serve_rm` servers.

    Args:
        urls: reward-model name -> serve_rm endpoint (e.g. "http://host:5000/get_reward"), in column order.
        spec: how the K rewards become the scalar reward (`openrlhf_lsc.RewardSpec`, names = the urls' names);
            default: their plain sum (transform raw, aggregate and). A reward_func sees one sample at a time, so
            `reference="group"` is refused here (use it through the plugin CLI's `--lsc.reference group`).
        **client: `ServeRMClient` options (timeout, retries, backoff, batch_size).

    Example:
        >>> combine = RemoteRewardCombiner({"helpful": "http://127.0.0.1:5000/get_reward"},
        ...                                RewardSpec(names=("helpful",), transform="lsc", reference="constant",
        ...                                           reference_value=(0.0,)))
        >>> combine.spec.transform
        'lsc'
    """

    def __init__(self, urls: Dict[str, str], spec: Optional[RewardSpec] = None, **client):
        names = tuple(urls)
        self.spec = spec or RewardSpec(names=names)
        if self.spec.names != names:
            raise ValueError(f"the RewardSpec names {list(self.spec.names)} must be the urls' names {list(names)}, in order")
        if self.spec.reference == "group":
            raise ValueError("reference 'group': a reward_func sees one sample at a time; use --lsc.reference group "
                             "in the plugin CLI with --lsc.reward_names, or reference label/constant/none here")
        self.clients = [ServeRMClient(urls[name], name=name, **client) for name in names]

    def __call__(self, queries: List[str], prompts: List[str], labels: list) -> dict:
        try:
            scores = [client.score(queries, prompts, labels) for client in self.clients]
            rewards = torch.tensor(scores, dtype=torch.float64).T  # [B, K]
            utility, metrics = reward_utilities(
                rewards, self.spec, labels if self.spec.reference == "label" else None,
                where=[f"prompt {p!r:.80}" for p in prompts],
            )
        except (RewardServerError, ValueError) as e:
            raise RewardFuncError(str(e)) from e
        # OpenRLHF calls a reward_func with one query: its extra_logs hold that sample's values.
        one = len(queries) == 1
        return {"rewards": utility[0].item() if one else utility.tolist(),
                "scores": utility[0].item() if one else utility.tolist(),
                "extra_logs": {k: v[0].item() if one else v.tolist() for k, v in metrics.items()}}
