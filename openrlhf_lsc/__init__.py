"""openrlhf_lsc: LSC reward transforms, AND-aggregation, Advantage Model and Selective Rehearsal for OpenRLHF.

The top level imports torch only; OpenRLHF is touched by `openrlhf_lsc.integration` alone.
"""

from openrlhf_lsc.references import references_from_labels
from openrlhf_lsc.rewards import (
    AGGREGATES,
    TRANSFORMS,
    RewardSpec,
    aggregate_rewards,
    group_quantile_reference,
    reward_utilities,
    transform_reward,
)

__version__ = "0.2.0"
__all__ = [
    "AGGREGATES",
    "RewardSpec",
    "TRANSFORMS",
    "aggregate_rewards",
    "group_quantile_reference",
    "references_from_labels",
    "reward_utilities",
    "transform_reward",
]
