"""Reward transforms and aggregation (Wang et al. 2024, sections 3-4). Torch only: no OpenRLHF import.

Every function computes in float32 (or wider) whatever the input dtype, so bf16 rewards and
|r - r_ref| up to 1e4 stay finite.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

TRANSFORMS = ("raw", "lsc", "center", "logsigmoid")
AGGREGATES = ("and", "weighted")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise ValueError naming `what` and the first offending row if `values` has NaN or inf."""
    bad = ~torch.isfinite(_as_float(values))
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{what} must be finite, got {values[tuple(idx)].item()} at index {idx}")


def transform_reward(
    reward: torch.Tensor, reference: Optional[torch.Tensor] = None, kind: str = "lsc"
) -> torch.Tensor:
    """Turn a Bradley-Terry reward into a utility.

    Args:
        reward: rewards r(x, y), any shape, any float dtype.
        reference: r_ref(x), broadcastable to `reward`; required by `lsc` and `center`.
        kind: `raw` (r), `lsc` (log sigmoid(r - r_ref)), `center` (r - r_ref) or
            `logsigmoid` (log sigmoid(r)).

    Returns:
        The utility, float32 (float64 for float64 input), same shape as `reward`.

    Example:
        >>> import torch
        >>> from openrlhf_lsc import transform_reward
        >>> u = transform_reward(torch.tensor([0.0, 3.0]), torch.tensor([1.0, 1.0]), kind="lsc")
        >>> [round(v, 4) for v in u.tolist()]
        [-1.3133, -0.1269]
    """
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown transform {kind!r} (--lsc.transform): expected one of {', '.join(TRANSFORMS)}")
    r = _as_float(reward)
    check_finite(r, "rewards")
    if kind == "raw":
        return r
    if kind == "logsigmoid":
        return F.logsigmoid(r)
    if reference is None:
        raise ValueError(f"transform {kind!r} needs a reference value r_ref(x) (--lsc.reference)")
    ref = _as_float(reference).to(r.device)
    check_finite(ref, "references")
    r, ref = torch.broadcast_tensors(r, ref)
    # Promote so a float64 reward is not rounded by a float32 reference and vice versa.
    dtype = torch.promote_types(r.dtype, ref.dtype)
    margin = r.to(dtype) - ref.to(dtype)
    return margin if kind == "center" else F.logsigmoid(margin)


def aggregate_rewards(
    rewards: torch.Tensor,
    references: Optional[torch.Tensor] = None,
    transform: str = "lsc",
    aggregate: str = "and",
    weights: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Combine K reward models into one utility per sample.

    `and` sums the transformed rewards: with `lsc` this is log of the probability that the response
    beats its reference on every property. `weighted` is the weighted-sum baseline sum_k w_k u_k.

    Args:
        rewards: `[B, K]` rewards, one column per reward model.
        references: `[B, K]` references (or broadcastable, e.g. `[K]`); needed by `lsc`/`center`.
        transform: one of `raw`, `lsc`, `center`, `logsigmoid`, applied per column.
        aggregate: `and` (plain sum, no weights) or `weighted` (needs K weights).
        weights: K weights for `weighted`.

    Returns:
        `[B]` utilities, float32 (float64 for float64 input).

    Example:
        >>> import torch
        >>> from openrlhf_lsc import aggregate_rewards
        >>> r = torch.tensor([[0.0, 0.0]])
        >>> round(aggregate_rewards(r, torch.zeros(1, 2)).item(), 4)  # 2 * log(1/2)
        -1.3863
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r} (--lsc.aggregate): expected one of {', '.join(AGGREGATES)}")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, K], got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if references is not None and torch.as_tensor(references).dim() == 2:
        if torch.as_tensor(references).shape[1] != k:
            raise ValueError(
                f"got {k} reward models but {torch.as_tensor(references).shape[1]} references per prompt "
                "(--lsc.reward_models vs --lsc.reference)"
            )
    utilities = transform_reward(rewards, references, transform)
    if aggregate == "and":
        if weights is not None:
            raise ValueError("--lsc.weights is only for --lsc.aggregate weighted; AND-aggregation has no weights")
        return utilities.sum(-1)
    if weights is None or len(weights) != k:
        got = "none" if weights is None else len(weights)
        raise ValueError(f"--lsc.aggregate weighted needs --lsc.weights, one per reward model: {k} models, {got} weights")
    w = torch.as_tensor(list(weights), dtype=utilities.dtype, device=utilities.device)
    check_finite(w, "--lsc.weights")
    return (utilities * w).sum(-1)


def group_quantile_reference(rewards: torch.Tensor, n_samples_per_prompt: int, q: float) -> torch.Tensor:
    """Per-prompt reference: the q-quantile of the prompt's own group of rollouts.

    A moving reference (it follows the current policy, not the SFT policy of the paper).

    Args:
        rewards: `[B]` or `[B, K]` rewards ordered prompt by prompt, B = prompts * n_samples_per_prompt.
        n_samples_per_prompt: group size (at least 2).
        q: quantile in (0, 1), linear interpolation as `numpy.quantile`.

    Returns:
        Tensor of the same shape as `rewards`: each sample gets its group's quantile.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"--lsc.quantile must be in (0, 1), got {q}")
    if n_samples_per_prompt < 2:
        raise ValueError(
            "--lsc.reference group needs --rollout.n_samples_per_prompt >= 2 "
            f"(a group of {n_samples_per_prompt} has no quantile to compare against)"
        )
    r = _as_float(rewards)
    if r.shape[0] % n_samples_per_prompt:
        raise ValueError(f"{r.shape[0]} rewards do not split into groups of {n_samples_per_prompt}")
    grouped = r.reshape(-1, n_samples_per_prompt, *r.shape[1:])
    ref = torch.quantile(grouped, q, dim=1, keepdim=True)
    return ref.expand_as(grouped).reshape(r.shape)
