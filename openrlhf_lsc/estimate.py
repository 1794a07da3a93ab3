"""Reference values r_ref(x) from SFT samples (Wang et al. 2024, section 5.2 and appendix A.1). Torch only.

Two steps, shared by the CLI (`python -m openrlhf_lsc.cli.estimate_reference`, which runs step 1 shard by
shard so it can resume) and by in-memory callers (`estimate_references` runs both on a prompt list):

1. `score_prompts`: sample k responses per prompt, score them with every reward model whose method needs
   samples, score the canned responses with `canned` reward models. Gives one JSON-ready record per prompt
   holding sample statistics (or an error), nothing method-specific.
2. `finish`: fit the `learned` predictors, turn records into labels in the schema of
   `openrlhf_lsc.references` (one entry per reward model, `reference` None plus `error` when it failed),
   and summarise coverage and the learned predictor's held-out error.

Methods, per reward model: `quantile` (q-quantile of the k scores), `gaussian` (mean + z_q * std of the
k scores), `learned` (ridge predictors of mean and log std from prompt features, trained on the sampled
prompts, applied to every prompt), `canned` (mean score of fixed responses such as "I can't answer that").
"""

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from openrlhf_lsc.references import gaussian_reference, sample_statistics

METHODS = ("quantile", "gaussian", "learned", "canned")
NEEDS_SAMPLES = ("quantile", "gaussian", "learned")
# The paper's harmlessness reference: variants of "I can't answer that", averaged.
CANNED_RESPONSES = (
    "I can't answer that.",
    "I'm sorry, but I can't answer that.",
    "I cannot help with that request.",
    "Sorry, I can't answer that question.",
    "I'm not able to answer that.",
)

# sampler(prompts, k) -> k response texts per prompt; reward_fn(prompts, responses) -> one score each
# (None or a non-finite value marks a response that could not be scored).
Sampler = Callable[[List[str], int], List[List[str]]]
RewardFn = Callable[[List[str], List[str]], Sequence[Any]]


class ScoreError(Exception):
    """Raised by a reward fn that could not score this call's responses (e.g. a reward server answered
    something unusable) while other calls may succeed: `score_prompts` then scores the call's prompts one
    by one and records a retryable error for the prompts that still fail, instead of stopping."""


def per_rm(value: Any, names: Sequence[str], flag: str) -> Dict[str, Any]:
    """Spread a setting over reward models: one value for all, a sequence aligned with `names`, or a dict.

    Args:
        value: scalar, sequence of len(names), or mapping name -> value.
        names: reward-model names.
        flag: the flag or parameter name, for the error message.

    Returns:
        dict name -> value.
    """
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing or len(value) != len(names):
            raise ValueError(f"{flag} must give a value for each reward model {list(names)}, got {dict(value)}")
        return {n: value[n] for n in names}
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = value[0]
        elif len(value) != len(names):
            raise ValueError(
                f"{flag} has {len(value)} values for {len(names)} reward models {list(names)}: give one or one each"
            )
        else:
            return dict(zip(names, value))
    return {n: value for n in names}


def check_settings(
    methods: Mapping[str, str], qs: Mapping[str, float], k: int, quantiles: Sequence[float] = (), par_m: int = 0
) -> List[float]:
    """Validate the estimator settings before any sampling.

    Args:
        methods: reward-model name -> method (--ref.method).
        qs: reward-model name -> quantile level q (--ref.q); unused by `canned`.
        k: samples per prompt (--ref.k).
        quantiles: extra quantile levels to record (--ref.quantiles).
        par_m: sampled scores to record per prompt for PAR (--ref.par_m), at most k; 0: none.

    Returns:
        Sorted quantile levels every sampled prompt records: `quantiles` plus the q of each sampling method.
    """
    for name, m in methods.items():
        if m not in METHODS:
            raise ValueError(f"--ref.method for reward model {name!r} is {m!r}: expected one of {', '.join(METHODS)}")
    sampling = [n for n, m in methods.items() if m in NEEDS_SAMPLES]
    if sampling and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
        raise ValueError(f"--ref.k must be an integer >= 2 (a quantile or std needs two scores per prompt), got {k!r}")
    if isinstance(par_m, bool) or not isinstance(par_m, int) or par_m < 0:
        raise ValueError(f"--ref.par_m must be an integer >= 0, got {par_m!r}")
    if par_m and (not sampling or par_m > k):
        raise ValueError(f"--ref.par_m {par_m} records that many of each prompt's --ref.k {k} sampled scores: it needs "
                         f"a sampling method (quantile, gaussian, learned) and at most --ref.k scores")
    levels = set()
    checks = [(qs[n], f"--ref.q for reward model {n!r}") for n in sampling]
    for q, what in checks + [(q, "--ref.quantiles") for q in quantiles]:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q < 1.0:
            raise ValueError(f"{what} must be a number strictly between 0 and 1, got {q!r}")
        levels.add(float(q))
    return sorted(levels)


def sampled_mask(
    num_prompts: int, methods: Mapping[str, str], num_learned_prompts: Optional[int], seed: int
) -> List[bool]:
    """Which prompts get k samples.

    Every prompt when some reward model uses `quantile`/`gaussian`; a seeded random subset of
    `num_learned_prompts` (default all) when the sampling methods are all `learned`; none for `canned` only.

    Returns:
        list of num_prompts booleans.
    """
    direct = [n for n, m in methods.items() if m in ("quantile", "gaussian")]
    if direct:
        if num_learned_prompts is not None and num_learned_prompts < num_prompts:
            raise ValueError(
                f"--learned.num_prompts samples a subset of prompts, but reward models {direct} use quantile/gaussian, "
                "which need samples for every prompt"
            )
        return [True] * num_prompts
    if "learned" not in methods.values():
        return [False] * num_prompts
    n = num_prompts if num_learned_prompts is None else num_learned_prompts
    if not 2 <= n <= num_prompts:
        raise ValueError(f"--learned.num_prompts must be between 2 and the number of prompts ({num_prompts}), got {n}")
    mask = [False] * num_prompts
    for i in torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed))[:n].tolist():
        mask[i] = True
    return mask


def _scores(fn: RewardFn, prompts: List[str], responses: List[str], name: str) -> torch.Tensor:
    out = list(fn(prompts, responses))
    if len(out) != len(prompts):
        raise ValueError(f"reward model {name!r} returned {len(out)} scores for {len(prompts)} responses")
    return torch.tensor([float("nan") if v is None else float(v) for v in out], dtype=torch.float64)


def group_scores(fn: RewardFn, prompts: List[str], responses: List[str], name: str, m: int):
    """Scores as `[len(prompts) // m, m]`, one row per prompt; after a `ScoreError` for the whole call, prompt by
    prompt. Returns (scores, {row: error message}) with NaN rows for the prompts that still failed."""
    try:
        return _scores(fn, prompts, responses, name).view(-1, m), {}
    except ScoreError:
        rows, errors = [], {}
        for j in range(0, len(prompts), m):
            try:
                rows.append(_scores(fn, prompts[j : j + m], responses[j : j + m], name))
            except ScoreError as e:
                rows.append(torch.full((m,), float("nan"), dtype=torch.float64))
                errors[j // m] = str(e)
        return torch.stack(rows), errors


def sample_and_score(prompts: Sequence[str], sampler: Sampler, reward_fns: Mapping[str, RewardFn], k: int):
    """k responses per prompt, scored by every reward model: the step the estimator and the reranker share.

    Args:
        prompts: prompt texts as the policy sees them. sampler, reward_fns: as in `score_prompts`. k: samples each.

    Returns:
        (responses: k texts per prompt, scored: name -> (`[P, k]` float64 scores, NaN where one failed;
        {prompt index: error} for the prompts whose scoring raised `ScoreError` even alone)).
    """
    responses = sampler(list(prompts), k)
    if len(responses) != len(prompts) or any(len(r) != k for r in responses):
        got = [len(r) for r in responses]
        raise ValueError(f"sampler returned {got} responses for {len(prompts)} prompts, expected {k} each")
    flat_prompts = [p for p in prompts for _ in range(k)]
    flat_responses = [r for rs in responses for r in rs]
    return responses, {name: group_scores(fn, flat_prompts, flat_responses, name, k) for name, fn in reward_fns.items()}


def _sample_entry(scores: torch.Tensor, levels: Sequence[float], par_m: int = 0) -> Dict[str, Any]:
    ok = scores[torch.isfinite(scores)]
    need = max(2, par_m)
    if ok.numel() < need:
        return {"error": f"only {ok.numel()} of {scores.numel()} sampled responses got a finite score (need {need})",
                "retry": True}
    stats = sample_statistics(ok[None], levels)
    entry = {
        "k": stats["k"],
        "mean": stats["mean"].item(),
        "std": stats["std"].item(),
        "quantiles": {str(q): v for q, v in zip(levels, stats["quantiles"][0].tolist())},
    }
    if par_m:
        entry["par_scores"] = ok[:par_m].tolist()
    if ok.numel() < scores.numel():
        entry["failed"] = scores.numel() - ok.numel()
    return entry


def score_prompts(
    prompts: Sequence[str],
    sampler: Optional[Sampler],
    reward_fns: Mapping[str, RewardFn],
    methods: Mapping[str, str],
    k: int,
    levels: Sequence[float],
    canned_responses: Sequence[str] = (),
    sampled: Optional[Sequence[bool]] = None,
    par_m: int = 0,
) -> List[Dict[str, Dict[str, Any]]]:
    """Sample and score: the expensive, resumable part of the estimator.

    Args:
        prompts: prompt texts as the policy sees them (chat template applied); "" marks an empty prompt.
        sampler: `sampler(prompts, k)` -> k responses per prompt (unused if nothing is sampled).
        reward_fns: name -> `fn(prompts, responses)` -> scores; a None or non-finite score marks that one
            response as failed; after a `ScoreError` the call's prompts are scored one by one and those that
            still raise it fail (retryably); any other exception propagates.
        methods: name -> method, from `check_settings`.
        k: samples per prompt.
        levels: quantile levels to record, from `check_settings`.
        canned_responses: responses scored by `canned` reward models, as the RM should see them.
        sampled: per prompt, whether to sample it (`sampled_mask`); default all.
        par_m: keep the first `par_m` finite scores of each sampled prompt as `par_scores` (PAR's M references).

    Returns:
        one record per prompt: name -> entry. Entries of sampled prompts hold `k` (scores that were
        finite), `mean`, `std`, `quantiles` {str(level): value}, `par_scores` with `par_m`, and `failed` if some
        scores were not finite; unsampled prompts have `{"k": 0}`; `canned` entries hold `canned_scores`; an entry that
        failed holds `error` and `retry`: True when scoring again may succeed (too few finite scores,
        `ScoreError`), False when it cannot (empty prompt).
    """
    sampled = [True] * len(prompts) if sampled is None else list(sampled)
    records: List[Dict[str, Dict[str, Any]]] = [{} for _ in prompts]
    live = [i for i, p in enumerate(prompts) if p.strip()]
    sample_rms = [n for n in reward_fns if methods[n] in NEEDS_SAMPLES]
    canned_rms = [n for n in reward_fns if methods[n] == "canned"]

    todo = [i for i in live if sampled[i]] if sample_rms else []
    if todo:
        _, scored = sample_and_score([prompts[i] for i in todo], sampler, {n: reward_fns[n] for n in sample_rms}, k)
        for name, (scores, errors) in scored.items():
            for j, (i, row) in enumerate(zip(todo, scores)):
                records[i][name] = {"error": errors[j], "retry": True} if j in errors else _sample_entry(row, levels, par_m)

    if canned_rms and live:
        if not canned_responses:
            raise ValueError("method 'canned' needs at least one canned response (--ref.canned)")
        m = len(canned_responses)
        flat_prompts = [prompts[i] for i in live for _ in range(m)]
        flat_responses = list(canned_responses) * len(live)
        for name in canned_rms:
            scores, errors = group_scores(reward_fns[name], flat_prompts, flat_responses, name, m)
            for j, (i, row) in enumerate(zip(live, scores)):
                # All variants or none: a mean over a prompt-dependent subset would not be comparable across prompts.
                bad = int((~torch.isfinite(row)).sum())
                error = {"error": errors.get(j, f"{bad} of {m} canned responses got no finite score"), "retry": True}
                records[i][name] = error if bad else {"canned_scores": row.tolist()}

    for i, record in enumerate(records):
        for name in reward_fns:
            if not prompts[i].strip():
                record[name] = {"error": "empty prompt", "retry": False}
            record.setdefault(name, {"k": 0})
    return records


def ridge(X: torch.Tensor, y: torch.Tensor, alphas: Sequence[float]) -> Tuple[torch.Tensor, float, float]:
    """Ridge regression with an unpenalised intercept; the penalty is picked by exact leave-one-out error.

    Args:
        X: `[n, d]` features. y: `[n]` targets. alphas: candidate penalties.

    Returns:
        (weights `[d]`, intercept, chosen alpha).
    """
    n = X.shape[0]
    x_mean, y_mean = X.mean(0), y.mean()
    U, s, Vh = torch.linalg.svd(X - x_mean, full_matrices=False)
    uty = U.T @ (y - y_mean)
    best = None
    for a in alphas:
        shrink = s**2 / (s**2 + a)
        fitted = U @ (shrink * uty) + y_mean
        leverage = (U**2) @ shrink + 1.0 / n  # the hat matrix diagonal, intercept included
        loo = (((y - fitted) / (1 - leverage).clamp_min(1e-12)) ** 2).mean().item()
        if best is None or loo < best[0]:
            best = (loo, float(a))
    alpha = best[1]
    w = Vh.T @ (s / (s**2 + alpha) * uty)
    return w, (y_mean - x_mean @ w).item(), alpha


class GaussianPredictor:
    """The paper's r_mean(x) and r_std(x) (appendix A.1): ridge regressions on prompt features.

    The std model regresses log std, so predictions stay positive. With k samples the log of the sample
    std is biased low by about 1/(2k) (under 1% for k = 64): left uncorrected.
    """

    def fit(self, X: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> "GaussianPredictor":
        """Fit on `[n, d]` features and the `[n]` sample mean/std of each prompt's scores."""
        X = torch.as_tensor(X, dtype=torch.float64)
        self.x_mean, scale = X.mean(0), X.std(0)
        self.x_scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant features stay 0
        Z = (X - self.x_mean) / self.x_scale
        # Penalties relative to n: with standardised features the Gram matrix grows like n.
        alphas = [X.shape[0] * 10.0**e for e in range(-5, 4)]
        self.mean_w, self.mean_b, self.alpha_mean = ridge(Z, torch.as_tensor(mean, dtype=torch.float64), alphas)
        # A prompt whose k scores are all equal has std 0; keep its log finite.
        log_std = torch.as_tensor(std, dtype=torch.float64).clamp_min(1e-6).log()
        self.std_w, self.std_b, self.alpha_std = ridge(Z, log_std, alphas)
        return self

    def predict(self, X: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return predicted (mean `[P]`, std `[P]`) for `[P, d]` features."""
        Z = (torch.as_tensor(X, dtype=torch.float64) - self.x_mean) / self.x_scale
        return Z @ self.mean_w + self.mean_b, (Z @ self.std_w + self.std_b).exp()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (ties get their average rank, as scipy.stats.spearmanr)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        sorted_x, order = torch.as_tensor(x, dtype=torch.float64).sort()
        _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        out = torch.empty_like(sorted_x)
        out[order] = (ends - (counts - 1) / 2)[inverse]
        return out

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def _fit_learned(entries: List[Dict[str, Any]], name: str, q: float, features: Any, holdout: float, seed: int):
    if features is None:
        raise ValueError(f"method 'learned' (reward model {name!r}) needs prompt features (--learned.encoder)")
    X = torch.as_tensor(features, dtype=torch.float64)
    if X.dim() != 2 or X.shape[0] != len(entries) or not torch.isfinite(X).all():
        raise ValueError(f"prompt features must be a finite [{len(entries)}, d] matrix, got shape {tuple(X.shape)}")
    scored = [i for i, e in enumerate(entries) if e.get("k", 0) >= 2]
    perm = torch.randperm(len(scored), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    n_hold = int(round(holdout * len(scored)))
    hold = sorted(scored[j] for j in perm[:n_hold])
    train = sorted(scored[j] for j in perm[n_hold:])
    if len(train) < 2:
        raise ValueError(
            f"method 'learned' (reward model {name!r}) has {len(train)} sampled prompts to train on after "
            f"holding out {n_hold}: sample more prompts (--learned.num_prompts) or lower --learned.holdout"
        )
    mean, std = (torch.tensor([entries[i][key] for i in train], dtype=torch.float64) for key in ("mean", "std"))
    model = GaussianPredictor().fit(X[train], mean, std)
    mu, sigma = model.predict(X)
    ref = gaussian_reference(mu, sigma, q)
    info = {"train_prompts": len(train), "holdout_prompts": len(hold),
            "alpha_mean": model.alpha_mean, "alpha_std": model.alpha_std}
    if hold:
        empirical = torch.tensor([entries[i]["quantiles"][str(q)] for i in hold], dtype=torch.float64)
        info["holdout_mae"] = (ref[hold] - empirical).abs().mean().item()
        info["holdout_spearman"] = spearman(ref[hold], empirical) if len(hold) > 2 else None
    return ref.tolist(), mu.tolist(), sigma.tolist(), info


def finish(
    records: Sequence[Mapping[str, Mapping[str, Any]]],
    methods: Mapping[str, str],
    qs: Mapping[str, float],
    features: Optional[torch.Tensor] = None,
    holdout: float = 0.1,
    seed: int = 0,
) -> Tuple[List[Dict[str, Dict[str, Any]]], Dict[str, Any]]:
    """Turn `score_prompts` records into reference labels and a report.

    Args:
        records: one per prompt, in prompt order.
        methods, qs: per reward model, as given to `check_settings`.
        features: `[P, d]` prompt features, needed by `learned`.
        holdout: fraction of the sampled prompts kept out of `learned` training to measure its error
            against their empirical q-quantiles.
        seed: seeds the holdout split.

    Returns:
        (labels, report). labels[i][name] follows the schema of `openrlhf_lsc.references` (`reference`,
        `method`, `q`, `k`, `mean`, `std`, `quantiles`; `k` 0 and null stats for unsampled prompts), plus
        `canned_scores` or `predicted_mean`/`predicted_std`, or `reference` None with `error` and `retry`.
        report["rms"][name] has coverage counts, reference summary and, for `learned`, holdout MAE/Spearman.
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"--learned.holdout must be in [0, 1), got {holdout}")
    labels: List[Dict[str, Dict[str, Any]]] = [{} for _ in records]
    report: Dict[str, Any] = {"prompts": len(records), "rms": {}}
    for name, method in methods.items():
        q = None if method == "canned" else float(qs[name])
        entries = [r[name] for r in records]
        summary: Dict[str, Any] = {"method": method, "q": q}
        if method == "learned":
            learned_ref, mu, sigma, summary["learned"] = _fit_learned(entries, name, q, features, holdout, seed)
        for i, e in enumerate(entries):
            label = {"reference": None, "method": method, "q": q, "k": e.get("k", 0), "mean": e.get("mean"),
                     "std": e.get("std"), "quantiles": e.get("quantiles", {})}
            for key in ("failed", "par_scores"):
                if key in e:
                    label[key] = e[key]
            if "error" in e:
                label.update(error=e["error"], retry=e.get("retry", True))
            elif method == "quantile":
                label["reference"] = e["quantiles"][str(q)]
            elif method == "gaussian":
                label["reference"] = gaussian_reference(e["mean"], e["std"], q).item()
            elif method == "canned":
                label["canned_scores"] = e["canned_scores"]
                label["reference"] = sum(e["canned_scores"]) / len(e["canned_scores"])
            else:
                label.update(reference=learned_ref[i], predicted_mean=mu[i], predicted_std=sigma[i])
            labels[i][name] = label
        refs = [lab[name]["reference"] for lab in labels if lab[name]["reference"] is not None]
        refs = torch.tensor(refs, dtype=torch.float64)
        summary.update(prompts=len(records), with_reference=len(refs), errors=len(records) - len(refs),
                       coverage=len(refs) / max(len(records), 1))
        if len(refs):
            summary["reference"] = {"mean": refs.mean().item(), "std": refs.std().item() if len(refs) > 1 else 0.0,
                                    "min": refs.min().item(), "max": refs.max().item()}
        report["rms"][name] = summary
    return labels, report


def estimate_references(
    prompts: Sequence[str],
    sampler: Optional[Sampler],
    reward_fns: Mapping[str, RewardFn],
    *,
    method: Union[str, Sequence[str], Mapping[str, str]] = "quantile",
    q: Union[float, Sequence[float], Mapping[str, float]] = 0.85,
    k: int = 64,
    quantiles: Sequence[float] = (),
    canned_responses: Sequence[str] = CANNED_RESPONSES,
    features: Optional[torch.Tensor] = None,
    num_learned_prompts: Optional[int] = None,
    holdout: float = 0.1,
    seed: int = 0,
    par_m: int = 0,
) -> Tuple[List[Dict[str, Dict[str, Any]]], Dict[str, Any]]:
    """Reference labels for in-memory prompts and models (the CLI runs the same steps shard by shard).

    Args:
        prompts: prompt texts as the policy sees them.
        sampler: `sampler(prompts, k)` -> k response texts per prompt, e.g.
            `openrlhf_lsc.integration.samplers.HFSampler(policy, tokenizer, max_new_tokens=...)`.
            Seed torch before calling for reproducible samples.
        reward_fns: reward-model name -> `fn(prompts, responses)` -> scores (the RM sees prompt + response).
        method, q: per reward model (one for all, a list aligned with `reward_fns`, or a dict).
        k: samples per prompt. quantiles: extra quantile levels to record.
        canned_responses: for `canned`, scored as given (append the EOS token your samples end with).
        features: `[P, d]` prompt features for `learned`, e.g. `openrlhf_lsc.embed.embed(openrlhf_lsc.embed.load_encoder(), prompts)`.
        num_learned_prompts: when every sampling method is `learned`, sample only this many prompts.
        holdout: fraction of sampled prompts held out to measure `learned` (see `finish`).
        seed: seeds the learned subset and the holdout split.
        par_m: also record M = `par_m` sampled scores per prompt (`par_scores`, for `--lsc.transform par`).

    Returns:
        (labels, report) as `finish`: labels[i] is the label of prompts[i], readable by
        `openrlhf_lsc.references.references_from_labels` (and, with `par_m`, `par_references_from_labels`) where no
        entry has an error.
    """
    names = list(reward_fns)
    methods, qs = per_rm(method, names, "method"), per_rm(q, names, "q")
    levels = check_settings(methods, qs, k, quantiles, par_m)
    sampled = sampled_mask(len(prompts), methods, num_learned_prompts, seed)
    records = score_prompts(prompts, sampler, reward_fns, methods, k, levels, canned_responses, sampled, par_m)
    return finish(records, methods, qs, features, holdout, seed)
