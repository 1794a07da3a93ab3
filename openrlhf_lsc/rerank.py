"""Best-of-k reranking with K reward models: keep, per prompt, the candidate of highest utility. Torch only.

The utility is the reward pipeline's (`reward_utilities`): e.g. AND-aggregated LSC, Σ_k log σ(r_k − r_ref,k),
picks the candidate most likely to beat its references on every property at once (paper 1, section 4), where a
weighted sum of raw rewards can pick one that is excellent on one property and poor on another.
"""

from typing import Any, Optional, Sequence, Tuple

import torch

from openrlhf_lsc.rewards import RewardSpec, reward_utilities


def rerank(
    scores: Any,
    spec: RewardSpec,
    labels: Optional[Sequence[Any]] = None,
    where: Optional[Sequence[str]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick the best of k existing candidates per prompt (no generation).

    Args:
        scores: `[P, k, K]` finite rewards (a tensor or equal-length nested lists): k candidates for each of P
            prompts, column j from reward model `spec.names[j]`.
        spec: the `RewardSpec`. `reference="label"` reads one label per prompt (the estimator's output);
            `reference="group"` uses the `spec.quantile`-quantile of the prompt's own k candidates (k >= 2).
        labels: P per-prompt labels (schema: `openrlhf_lsc.references`), for `reference="label"`.
        where: P prompt descriptions for error messages (default "prompt i").

    Returns:
        `(chosen [P] int64, utilities [P, k])`: the index of the highest-utility candidate of each prompt, the
        first of equal ones; utilities float32 (float64 for float64 scores).

    Example:
        >>> import torch
        >>> spec = RewardSpec(names=("helpful", "harmless"), transform="lsc", reference="constant",
        ...                   reference_value=(0.0, 0.0))
        >>> scores = torch.tensor([[[4.0, -2.0], [1.0, 1.0]]])  # lopsided vs balanced candidate
        >>> rerank(scores, spec)[0].tolist()  # AND-LSC keeps the balanced one; a raw sum would tie them
        [1]
    """
    try:
        s = torch.as_tensor(scores)
    except (ValueError, TypeError) as e:
        raise ValueError(f"scores must be [prompts, k, reward models] with the same k for every prompt ({e})") from None
    if s.dim() != 3 or s.shape[1] < 1:
        raise ValueError(f"scores must be [prompts, k, {len(spec.names)}], got shape {tuple(s.shape)}")
    p, k, num_rms = s.shape
    if labels is not None:
        if len(labels) != p:
            raise ValueError(f"{p} prompts but {len(labels)} labels: give one label per prompt")
        labels = [lab for lab in labels for _ in range(k)]
    if spec.reference == "group" and k < 2:
        raise ValueError(f"--lsc.reference group takes a quantile of the k candidates of a prompt: needs k >= 2, got {k}")
    utility, _ = reward_utilities(s.reshape(p * k, num_rms), spec, labels, group_size=k, where=where)
    utility = utility.view(p, k)
    return utility.argmax(1), utility
