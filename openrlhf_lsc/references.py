"""The per-prompt reference label: the one schema shared by the estimator and the PPO plugin.

A prompt row carries one JSON field (the PPO run names it with `--data.label_key`) that maps each
reward-model name to its reference and the sample statistics behind it:

    {"helpful":  {"reference": 1.73, "method": "quantile", "q": 0.85, "k": 64,
                  "mean": 1.02, "std": 0.66, "quantiles": {"0.5": 1.01, "0.85": 1.73}},
     "harmless": {"reference": 0.41, ...}}

Only `reference` is read by PPO; the other keys document where it came from. The field may be a
JSON object or a string holding one (OpenRLHF passes the dataset value through unchanged).
"""

import json
import math
from typing import Any, Dict, List, Optional, Sequence

import torch


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def parse_label(label: Any, where: str, label_key: str) -> Dict[str, Any]:
    """Return one prompt's label as a dict; raise naming the prompt (`where`) and field if malformed."""
    if isinstance(label, str):
        try:
            label = json.loads(label) if label.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: field {label_key!r} is not valid JSON ({e})") from None
    if not isinstance(label, dict):
        raise ValueError(
            f"{where}: field {label_key!r} must map reward-model names to "
            f'{{"reference": float, ...}}, got {type(label).__name__} {label!r:.80}'
        )
    return label


def references_from_labels(
    labels: Sequence[Any],
    names: Sequence[str],
    label_key: str,
    where: Optional[Sequence[str]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Read `[B, K]` references from B labels for the K reward models named `names`.

    Args:
        labels: one label per row (dict or JSON string, schema in this module's docstring).
        names: reward-model names, in the column order of the rewards.
        label_key: the dataset field name, used in error messages (`--data.label_key`).
        where: optional description of each row for error messages (default "prompt i").
        device: where the tensor is made (the rewards' device; default the CPU).

    Returns:
        float32 tensor `[B, K]` on `device`. A reference that is missing, not a number, not finite or beyond float32's
        range raises ValueError naming the row, the field and the reward model.

    Example:
        >>> references_from_labels([{"rm": {"reference": 0.5}}], ["rm"], "ref").tolist()
        [[0.5]]
    """
    try:  # the usual batch in a few C-speed passes (a PPO step has thousands of prompts); else the loop names the row
        parsed: Dict[str, Any] = {}  # identical label strings are parsed once
        rows = [label if isinstance(label, dict) else parsed[label] if label in parsed
                else parsed.setdefault(label, json.loads(label)) for label in labels]
        values = [row[name]["reference"] for row in rows for name in names]
        numbers = all(type(v) is float or type(v) is int for v in values)  # not bool
        if numbers and max(map(abs, values), default=0) <= FLOAT32_MAX:
            refs = torch.tensor(values, dtype=torch.float64, device=device)
            if bool(torch.isfinite(refs).all()):
                return refs.float().reshape(len(rows), len(names))
    except (ValueError, TypeError, LookupError):  # e.g. bad JSON, a missing key, an entry that is a number or array
        pass
    def reference(entry, row_name, name, label):
        value = entry.get("reference") if isinstance(entry, dict) else None
        if not _finite_number(value):
            raise ValueError(
                f"{row_name}: field {label_key!r} has no finite reference for reward model {name!r} "
                f"(expected {label_key}.{name}.reference to be a number within float32 range, got {value!r}; "
                f"present: {sorted(label)})"
            )
        return float(value)

    out = _read_entries(labels, names, label_key, where, reference)
    return torch.tensor(out, dtype=torch.float32, device=device).reshape(len(out), len(names))


def _finite_number(value: Any) -> bool:
    """A JSON number (not a bool) within float32's range: the check comes before isfinite, where a huge int would
    overflow float()."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and abs(value) <= FLOAT32_MAX and \
        math.isfinite(value)


def _read_entries(labels: Sequence[Any], names: Sequence[str], label_key: str, where: Optional[Sequence[str]],
                  read) -> List[list]:
    """`read(entry, row name, reward name, label)` for every reward model of every label, row by row (errors name
    the row: `where[i]` or "prompt i")."""
    out = []
    for i, label in enumerate(labels):
        row_name = where[i] if where is not None else f"prompt {i}"
        label = parse_label(label, row_name, label_key)
        out.append([read(label.get(name), row_name, name, label) for name in names])
    return out


def par_references_from_labels(
    labels: Sequence[Any],
    names: Sequence[str],
    label_key: str,
    m: int,
    where: Optional[Sequence[str]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Read `[B, K, M]` PAR references: the first M of each label's `par_scores` (SFT sample scores) per reward model.

    Args:
        labels: one label per row; each entry `{name: {"par_scores": [M or more finite numbers], ...}}`, as
            `estimate_reference --ref.par_m M` writes it.
        names: reward-model names, in the column order of the rewards. label_key: the field, for errors.
        m: M, the reference scores used per prompt (PAR: 10). where: row descriptions for errors.
        device: where the tensor is made (the rewards' device).

    Returns:
        float32 tensor `[B, K, M]`. Fewer than M scores, or one not a finite number, raises ValueError naming the
        row, the field and the reward model.

    Example:
        >>> par_references_from_labels([{"rm": {"par_scores": [0.5, 1.0, 2.0]}}], ["rm"], "ref", 2).tolist()
        [[[0.5, 1.0]]]
    """
    def scores(entry, row_name, name, label):
        values = entry.get("par_scores") if isinstance(entry, dict) else None
        if not (isinstance(values, list) and len(values) >= m and all(map(_finite_number, values[:m]))):
            got = f"{len(values)} scores" if isinstance(values, list) else repr(values)
            raise ValueError(
                f"{row_name}: field {label_key!r} has no {m} finite PAR reference scores for reward model {name!r} "
                f"(expected {label_key}.{name}.par_scores to list at least {m} numbers, from estimate_reference "
                f"--ref.par_m {m}; got {got})"
            )
        return [float(v) for v in values[:m]]

    out = _read_entries(labels, names, label_key, where, scores)
    return torch.tensor(out, dtype=torch.float32, device=device).reshape(len(out), len(names), m)


def sample_statistics(scores: torch.Tensor, quantiles: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Statistics of k sampled-response scores per prompt, the raw material of every estimator.

    Args:
        scores: `[P, k]` scores of k SFT samples for each of P prompts (k >= 2).
        quantiles: levels in (0, 1); linear interpolation as `numpy.quantile`.

    Returns:
        dict with `mean` `[P]`, `std` `[P]` (unbiased, as numpy ddof=1), `k` (int) and
        `quantiles` `[P, len(quantiles)]`.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"need [prompts, k] scores with k >= 2 samples per prompt, got shape {tuple(scores.shape)}")
    for q in quantiles:
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile levels must be in (0, 1), got {q}")
    qs = torch.tensor(list(quantiles), dtype=torch.float64)
    return {
        "mean": scores.mean(1),
        "std": scores.std(1),
        "k": scores.shape[1],
        "quantiles": torch.quantile(scores, qs, dim=1).T.reshape(scores.shape[0], len(qs)),
    }


def gaussian_reference(mean: torch.Tensor, std: torch.Tensor, q: float) -> torch.Tensor:
    """r_ref = mu + z_q * sigma with z_q the standard-normal q-quantile (paper 1, appendix A.1)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile q must be in (0, 1), got {q}")
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q, dtype=torch.float64))
    return torch.as_tensor(mean, dtype=torch.float64) + z * torch.as_tensor(std, dtype=torch.float64)
