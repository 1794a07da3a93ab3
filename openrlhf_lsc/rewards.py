"""Reward transforms, aggregation and the reward pipeline (Wang et al. 2024, sections 3-4). Torch only.

`reward_utilities` is the one pipeline "K rewards per sample + reference spec + labels -> utility + per-RM
metrics": the PPO integration, the reward_func wrapper, the reranker, the TRL and verl adapters and the lab call it.
Every function computes in float32 (or wider) whatever the input dtype, so bf16 rewards and |r - r_ref| up to
1e4 stay finite. NaN/inf inputs are refused, shapes must match exactly (a scalar reference is the one
documented exception).
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

TRANSFORMS = ("raw", "lsc", "center", "logsigmoid", "sigmoid", "par")
AGGREGATES = ("and", "weighted", "gdpo")
REFERENCES = ("none", "label", "group", "constant")
NEEDS_REFERENCE = ("lsc", "center", "sigmoid", "par")
PAR_M = 10  # PAR's default number of SFT reference scores per prompt (Fu et al. 2025)
GDPO_EPS = 1e-4  # added to a group's std, as TRL's normalize_then_sum


def _as_float(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise ValueError naming `what` and the first offending index if `values` has NaN or inf."""
    bad = ~torch.isfinite(_as_float(values))
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{what} must be finite, got {values[tuple(idx)].item()} at index {idx}")


def transform_reward(reward: torch.Tensor, reference: Optional[torch.Tensor] = None, kind: str = "lsc") -> torch.Tensor:
    """Turn a Bradley-Terry reward into a utility.

    Args:
        reward: rewards r(x, y), any shape, any float dtype, finite.
        reference: r_ref(x), the same shape as `reward` or a scalar; required by `lsc`, `center`, `sigmoid`, `par`.
            For `par` it may carry a last dimension of M reference scores per reward (`reward.shape + (M,)`).
        kind: `raw` (r), `lsc` (log sigmoid(r - r_ref)), `center` (r - r_ref), `logsigmoid` (log sigmoid(r)),
            `sigmoid` (sigmoid(r - r_ref), bounded in (0, 1)) or `par` ((1/M) sum_m sigmoid(r - r_ref,m), PAR of
            Fu et al. 2025 with k = 1: the fraction of M SFT references the response beats, smoothed).

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
    ref = _as_float(torch.as_tensor(reference, device=r.device))  # a CPU or Python reference meets r on its device
    check_finite(ref, "references")
    if kind == "par" and ref.dim() == r.dim() + 1 and ref.shape[:-1] == r.shape and ref.shape[-1] >= 1:
        dtype = torch.promote_types(r.dtype, ref.dtype)
        return torch.sigmoid(r.to(dtype).unsqueeze(-1) - ref.to(dtype)).mean(-1)
    if ref.dim() != 0 and ref.shape != r.shape:
        extra = f" (or, for par, {tuple(r.shape) + ('M',)})" if kind == "par" else ""
        raise ValueError(
            f"references must have the rewards' shape {tuple(r.shape)}{extra} (or be a scalar), got {tuple(ref.shape)}"
        )
    # Promote so a float64 reward is not rounded by a float32 reference and vice versa.
    dtype = torch.promote_types(r.dtype, ref.dtype)
    margin = r.to(dtype) - ref.to(dtype)
    if kind == "center":
        return margin
    return F.logsigmoid(margin) if kind == "lsc" else torch.sigmoid(margin)  # par with one reference: sigmoid


def _check_rewards_2d(rewards: torch.Tensor) -> int:
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [B, K] with K >= 1 reward models, got shape {tuple(rewards.shape)}")
    return rewards.shape[1]


def _combine(utilities: torch.Tensor, aggregate: str, weights: Optional[Sequence[float]], group_size: int = 1):
    """Sum `[B, K]` utilities over K: plainly (`and`), with K weights (`weighted`), or each column z-scored within
    its prompt's group of `group_size` consecutive samples first (`gdpo`, weights optional)."""
    k = utilities.shape[1]
    if aggregate == "and":
        if weights is not None:
            raise ValueError("--lsc.weights is only for --lsc.aggregate weighted or gdpo; AND-aggregation has no weights")
        return utilities.sum(-1)
    if aggregate == "gdpo":
        if group_size < 2 or utilities.shape[0] % group_size:
            raise ValueError(f"--lsc.aggregate gdpo normalises each reward within its prompt's samples: needs groups "
                             f"of >= 2 (--rollout.n_samples_per_prompt), got {utilities.shape[0]} samples in groups "
                             f"of {group_size}")
        g = utilities.reshape(-1, group_size, k)
        utilities = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + GDPO_EPS)).reshape(-1, k)
        if weights is None:
            return utilities.sum(-1)
    if weights is None or len(weights) != k:
        got = "none" if weights is None else len(weights)
        raise ValueError(f"--lsc.aggregate {aggregate} needs --lsc.weights, one per reward model: {k} models, {got} "
                         "weights")
    w = torch.as_tensor(list(weights), dtype=utilities.dtype, device=utilities.device)
    check_finite(w, "--lsc.weights")
    return (utilities * w).sum(-1)


def aggregate_rewards(
    rewards: torch.Tensor,
    references: Optional[torch.Tensor] = None,
    transform: str = "lsc",
    aggregate: str = "and",
    weights: Optional[Sequence[float]] = None,
    group_size: int = 1,
) -> torch.Tensor:
    """Combine K reward models into one utility per sample.

    `and` sums the transformed rewards: with `lsc` this is log of the probability that the response
    beats its reference on every property. `weighted` is the weighted-sum baseline sum_k w_k u_k. `gdpo` first
    z-scores each column within its prompt's group of samples (GDPO; TRL's `normalize_then_sum`), then sums them
    (with weights, if given).

    Args:
        rewards: `[B, K]` rewards, one column per reward model (K >= 1).
        references: `[B, K]` references, or `[K]` (one constant per reward model); needed by `lsc`, `center`,
            `sigmoid`, `par` (which also takes `[B, K, M]`: M reference scores each).
        transform: one of `TRANSFORMS`, applied per column.
        aggregate: `and` (plain sum, no weights), `weighted` (needs K weights) or `gdpo` (weights optional).
        weights: K weights for `weighted` (and optionally `gdpo`).
        group_size: consecutive samples per prompt, for `gdpo` (>= 2).

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
    k = _check_rewards_2d(rewards)
    if references is not None:
        references = torch.as_tensor(references, device=rewards.device)
        par = transform == "par" and references.dim() == 3 and references.shape[:2] == rewards.shape
        if references.shape not in (rewards.shape, (k,)) and not par:
            raise ValueError(
                f"got {k} reward models but references of shape {tuple(references.shape)}: expected "
                f"{tuple(rewards.shape)} or ({k},) (--lsc.reward_models vs --lsc.reference)"
            )
        references = references if par else references.expand(rewards.shape)
    return _combine(transform_reward(rewards, references, transform), aggregate, weights, group_size)


def group_quantile_reference(rewards: torch.Tensor, n_samples_per_prompt: int, q: float) -> torch.Tensor:
    """Per-prompt reference: the q-quantile of the prompt's own group of rollouts.

    A moving reference (it follows the current policy, not the SFT policy of the paper).

    Args:
        rewards: `[B]` or `[B, K]` finite rewards ordered prompt by prompt, B = prompts * n_samples_per_prompt.
        n_samples_per_prompt: group size (at least 2).
        q: quantile in (0, 1), linear interpolation as `numpy.quantile`.

    Returns:
        Tensor of the same shape as `rewards`: each sample gets its group's quantile.

    Example:
        >>> import torch
        >>> group_quantile_reference(torch.tensor([0.0, 2.0, 5.0, 5.0]), 2, 0.5).tolist()
        [1.0, 1.0, 5.0, 5.0]
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"--lsc.quantile must be in (0, 1), got {q}")
    if n_samples_per_prompt < 2:
        raise ValueError(
            "--lsc.reference group needs --rollout.n_samples_per_prompt >= 2 "
            f"(a group of {n_samples_per_prompt} has no quantile to compare against)"
        )
    r = _as_float(rewards)
    if r.dim() not in (1, 2):
        raise ValueError(f"rewards must be [B] or [B, K], got shape {tuple(r.shape)}")
    check_finite(r, "rewards")
    if r.shape[0] % n_samples_per_prompt:
        raise ValueError(f"{r.shape[0]} rewards do not split into groups of {n_samples_per_prompt}")
    grouped = r.reshape(-1, n_samples_per_prompt, *r.shape[1:])
    ref = torch.quantile(grouped, q, dim=1, keepdim=True)
    return ref.expand_as(grouped).reshape(r.shape)


def _finite_floats(values: Optional[Sequence[float]], flag: str, k: int) -> Optional[Tuple[float, ...]]:
    if values is None:
        return None
    values = tuple(float(v) for v in values)
    if len(values) != k:
        raise ValueError(f"{flag} needs {k} values, one per reward model, got {len(values)}")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{flag} values must be finite numbers, got {bad[0]}")
    return values


@dataclass(frozen=True)
class RewardSpec:
    """How K reward columns become one utility: the configuration every reward path shares.

    Each field is the `--lsc.*` flag of the same name; `__post_init__` holds every check between them.

    Args:
        names: the K reward-model names, in column order (metrics, reference labels).
        transform: one of `TRANSFORMS`.
        aggregate: `and` (sum of utilities), `weighted` (sum_k w_k u_k, needs `weights`) or `gdpo` (each utility
            z-scored within its prompt's samples, then summed; `weights` optional).
        weights: K weights, only with `weighted` or `gdpo`.
        reference: `none`, `label` (per prompt, from the label field), `group` (the `quantile` of the prompt's
            own samples) or `constant` (`reference_value`, one per reward model).
        quantile: in (0, 1), only with `group`; None there means 0.5 (the median of the prompt's samples).
        reference_value: K finite constants, only with `constant`.
        label_key: the dataset field holding the labels (`--data.label_key`), named in error messages.
        par_m: M, the SFT reference scores per prompt `par` reads from each label's `par_scores` (default 10);
            only with `transform="par"` and `reference="label"` (`constant` gives each reward one reference).

    Example:
        >>> RewardSpec(names=("helpful",), transform="lsc", reference="constant", reference_value=(0.5,)).reference
        'constant'
    """

    names: Tuple[str, ...]
    transform: str = "raw"
    aggregate: str = "and"
    weights: Optional[Tuple[float, ...]] = None
    reference: str = "none"
    quantile: Optional[float] = None
    reference_value: Optional[Tuple[float, ...]] = None
    label_key: str = "label"
    par_m: Optional[int] = None

    def __post_init__(self):
        names = tuple(self.names)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"--lsc.reward_names must list one non-empty name per reward model, got {list(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"reward model names {list(names)} are not unique: set --lsc.reward_names")
        k = len(names)
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown --lsc.transform {self.transform!r}: expected one of {', '.join(TRANSFORMS)}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"unknown --lsc.aggregate {self.aggregate!r}: expected one of {', '.join(AGGREGATES)}")
        if self.reference not in REFERENCES:
            raise ValueError(f"unknown --lsc.reference {self.reference!r}: expected one of {', '.join(REFERENCES)}")
        if self.aggregate == "weighted" and self.weights is None:
            raise ValueError(f"--lsc.aggregate weighted needs --lsc.weights with {k} values, one per reward model")
        if self.aggregate == "and" and self.weights is not None:
            raise ValueError("--lsc.weights is only used with --lsc.aggregate weighted or gdpo")
        if self.transform == "par":
            if self.reference == "group":
                raise ValueError("--lsc.transform par compares each response with M SFT reference scores of its prompt: "
                                 "use --lsc.reference label (estimate_reference --ref.par_m M) or constant")
            if self.reference == "label" and self.par_m is None:
                object.__setattr__(self, "par_m", PAR_M)
        if self.par_m is not None and (self.transform, self.reference) != ("par", "label"):
            raise ValueError("--lsc.par_m is only used with --lsc.transform par and --lsc.reference label")
        if self.par_m is not None and (isinstance(self.par_m, bool) or not isinstance(self.par_m, int) or self.par_m < 1):
            raise ValueError(f"--lsc.par_m must be an integer >= 1, got {self.par_m!r}")
        if self.transform in NEEDS_REFERENCE and self.reference == "none":
            raise ValueError(f"--lsc.transform {self.transform} needs a reference: set --lsc.reference label|group|constant")
        if self.reference == "group":
            if self.quantile is None:
                object.__setattr__(self, "quantile", 0.5)
            if not 0.0 < self.quantile < 1.0:
                raise ValueError(f"--lsc.reference group needs --lsc.quantile in (0, 1), got {self.quantile}")
        elif self.quantile is not None:
            raise ValueError("--lsc.quantile is only used with --lsc.reference group")
        if self.reference == "constant":
            if self.reference_value is None:
                raise ValueError(f"--lsc.reference constant needs --lsc.reference_value with {k} values")
        elif self.reference_value is not None:
            raise ValueError("--lsc.reference_value is only used with --lsc.reference constant")
        if self.reference == "label" and not self.label_key:
            raise ValueError("--lsc.reference label reads references from the field named by --data.label_key; set it")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "weights", _finite_floats(self.weights, "--lsc.weights", k))
        object.__setattr__(self, "reference_value", _finite_floats(self.reference_value, "--lsc.reference_value", k))


def reward_utilities(
    rewards: torch.Tensor,
    spec: RewardSpec,
    labels: Optional[Sequence[Any]] = None,
    group_size: int = 1,
    where: Optional[Sequence[str]] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The reward pipeline: K rewards per sample -> references -> transform -> aggregate, plus per-RM metrics.

    Args:
        rewards: `[N, K]` finite rewards, column k from reward model `spec.names[k]`, samples prompt-major.
        spec: the `RewardSpec`.
        labels: N per-sample labels (schema: `openrlhf_lsc.references`), needed by `reference="label"`; the
            `group_size` samples of a prompt must carry the same label, which is parsed once per prompt.
        group_size: consecutive samples per prompt (`--rollout.n_samples_per_prompt`); `group` references take
            their quantile over these.
        where: optional N / group_size prompt descriptions used in error messages (default "prompt i").

    Returns:
        `(utility [N], metrics)`: float32 (float64 for float64 input); `metrics` maps `lsc/utility` and, per
        reward model, `lsc/<name>/reward` and `lsc/<name>/utility` (and with references `lsc/<name>/margin`,
        `lsc/<name>/above_ref`) to per-sample `[N]` tensors. With M references per reward (`par` from labels), the
        margin is to their mean and `above_ref` the fraction of them the reward beats.

    Example:
        >>> import torch
        >>> spec = RewardSpec(names=("a", "b"), transform="lsc", reference="constant", reference_value=(0.0, 1.0))
        >>> u, m = reward_utilities(torch.tensor([[0.0, 1.0]]), spec)
        >>> round(u.item(), 4), m["lsc/b/above_ref"].tolist()
        (-1.3863, [0.0])
    """
    from openrlhf_lsc.references import par_references_from_labels, references_from_labels

    r = _as_float(rewards)
    k = len(spec.names)
    if r.dim() != 2 or r.shape[1] != k:
        raise ValueError(
            f"rewards must be [N, {k}] (one column per reward model {list(spec.names)}), got shape {tuple(r.shape)}"
        )
    bad = ~torch.isfinite(r)
    if bad.any():
        i, j = bad.nonzero()[0].tolist()
        raise ValueError(f"reward model {spec.names[j]!r} returned {r[i, j].item()} for sample {i}: rewards must be finite")
    n = r.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} samples do not split into prompts of {group_size} samples (--rollout.n_samples_per_prompt)")

    refs = None
    if spec.reference == "constant":
        refs = torch.tensor(spec.reference_value, dtype=r.dtype, device=r.device).expand(n, k)
    elif spec.reference == "group":
        refs = group_quantile_reference(r, group_size, spec.quantile)
    elif spec.reference == "label":
        if labels is None or len(labels) != n:
            got = "no labels" if labels is None else f"{len(labels)} labels"
            raise ValueError(f"--lsc.reference label needs one label per sample: {n} samples, {got}")
        per_prompt = list(labels[::group_size])
        for j in range(1, group_size):  # list comparisons run in C: no per-sample Python loop
            if list(labels[j::group_size]) != per_prompt:
                p = next(i for i, (a, b) in enumerate(zip(labels[j::group_size], per_prompt)) if a != b)
                what = where[p] if where is not None else f"prompt {p}"
                raise ValueError(f"{what}: its {group_size} samples carry different {spec.label_key!r} labels")
        if spec.par_m is not None:  # [P, K, M]: M SFT reference scores per prompt and reward
            refs = par_references_from_labels(per_prompt, spec.names, spec.label_key, spec.par_m, where, r.device)
        else:
            refs = references_from_labels(per_prompt, spec.names, spec.label_key, where, device=r.device)
        refs = refs.to(r.dtype).repeat_interleave(group_size, 0)

    per_rm = transform_reward(r, refs, spec.transform)  # [N, K], transformed once
    utility = _combine(per_rm, spec.aggregate, spec.weights, group_size)
    metrics = {"lsc/utility": utility}
    for j, name in enumerate(spec.names):
        metrics[f"lsc/{name}/reward"] = r[:, j]
        metrics[f"lsc/{name}/utility"] = per_rm[:, j]
        if refs is not None:
            ref = refs[:, j]
            above = r[:, j, None] > ref if ref.dim() == 2 else (r[:, j] > ref)[:, None]
            metrics[f"lsc/{name}/margin"] = r[:, j] - (ref.mean(-1) if ref.dim() == 2 else ref)
            metrics[f"lsc/{name}/above_ref"] = above.to(r.dtype).mean(-1)
    return utility, metrics
