"""A drop-in OpenRLHF `reward_func` that combines K reward-model HTTP servers (OpenRLHF's `serve_rm` protocol:
POST {"query": [...], "prompts": [...], "labels": [...]} -> {"rewards": [...]}) with the LSC transform and
aggregation. Use it through a small file passed as `--reward.remote_url` (see examples/reward_func_lsc.py);
it transforms already, so run PPO with `--lsc.transform raw` (or the stock CLI).
"""

import json
import urllib.request
from typing import Dict, List, Optional, Sequence

import torch

from openrlhf_lsc.references import references_from_labels
from openrlhf_lsc.rewards import aggregate_rewards, transform_reward


class RemoteRewardCombiner:
    """Callable `reward_func(queries, prompts, labels)` scoring each query on K servers.

    Args:
        urls: reward-model name -> serve_rm endpoint (e.g. "http://host:5000/get_reward").
        transform, aggregate, weights: as `openrlhf_lsc.aggregate_rewards`.
        reference: "label" (per prompt, from the label field; schema in openrlhf_lsc.references),
            "constant" (`reference_value`, one per RM) or "none".
        label_key: the dataset field name (`--data.label_key`), for error messages.
        timeout: seconds per HTTP request.
    """

    def __init__(
        self,
        urls: Dict[str, str],
        transform: str = "lsc",
        aggregate: str = "and",
        weights: Optional[Sequence[float]] = None,
        reference: str = "label",
        reference_value: Optional[Sequence[float]] = None,
        label_key: str = "label",
        timeout: float = 180.0,
    ):
        if reference not in ("label", "constant", "none"):
            raise ValueError(f"reference {reference!r}: a reward_func sees one sample at a time, so label, constant or none")
        if reference == "constant" and (reference_value is None or len(reference_value) != len(urls)):
            raise ValueError(f"reference 'constant' needs {len(urls)} reference_value entries, one per URL")
        transform_reward(torch.zeros(1), torch.zeros(1), transform)  # fail at load time on a bad name
        self.urls, self.names = dict(urls), list(urls)
        self.transform, self.aggregate, self.weights = transform, aggregate, weights
        self.reference, self.reference_value, self.label_key = reference, reference_value, label_key
        self.timeout = timeout

    def _score(self, url: str, queries: List[str], prompts: List[str], labels: list) -> List[float]:
        body = json.dumps({"query": queries, "prompts": prompts, "labels": labels}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            rewards = json.loads(response.read())["rewards"]
        if len(rewards) != len(queries):
            raise ValueError(f"reward server {url} returned {len(rewards)} rewards for {len(queries)} queries")
        return [float(r) for r in rewards]

    def __call__(self, queries: List[str], prompts: List[str], labels: list) -> dict:
        rewards = torch.tensor(
            [self._score(self.urls[name], queries, prompts, labels) for name in self.names], dtype=torch.float32
        ).T  # [B, K]
        if self.reference == "label":
            references = references_from_labels(labels, self.names, self.label_key)
        elif self.reference == "constant":
            references = torch.tensor(self.reference_value, dtype=torch.float32).expand_as(rewards)
        else:
            references = None
        utility = aggregate_rewards(rewards, references, self.transform, self.aggregate, self.weights)
        logs = {"lsc_transformed": 1.0}
        for k, name in enumerate(self.names):
            logs[f"lsc/{name}/reward"] = rewards[0, k].item()
            if references is not None:
                logs[f"lsc/{name}/margin"] = (rewards[0, k] - references[0, k]).item()
                logs[f"lsc/{name}/above_ref"] = float(rewards[0, k] > references[0, k])
        # OpenRLHF calls reward_func with one query; extra_logs hold that sample's values.
        return {"rewards": utility[0].item() if len(queries) == 1 else utility.tolist(),
                "scores": utility[0].item() if len(queries) == 1 else utility.tolist(),
                "extra_logs": logs}
