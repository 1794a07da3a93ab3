"""LSC / AND rewards and the reward-hacking monitor for TRL's `GRPOTrainer` and `RLOOTrainer` (trl 1.16).

TRL calls each entry of `reward_funcs` as `f(prompts=, completions=, completion_ids=, **kw)` (`kw`: every dataset
column, `trainer_state`, `log_metric`, `log_extra`), puts what it returns into one column of its `[N, K]` reward
table, sums the columns with `reward_weights` and normalises per prompt group. `lsc_reward_funcs` turns K reward
sources into K such functions, function k returning its transformed utility u_k = log sigmoid(r_k - r_ref,k(x)),
so TRL's sum is the AND-aggregation of Wang et al. 2024; with `transform="raw"` and `reward_weights` it is the
weighted-sum baseline. Every number comes from `openrlhf_lsc.rewards.reward_utilities`.

Facts about TRL 1.16 this module relies on (`trl/trainer/grpo_trainer.py`, `rloo_trainer.py`,
`_calculate_rewards` and `_generate_and_score_completions`; `tests/test_trl.py` runs them):
- the K functions are called one after the other, in list order, with the same `completions` list;
- `log_metric` is the trainer's bound `_log_metric`: `log_metric.__self__` is the trainer, whose `accelerator`,
  `num_generations` / `num_generations_eval` and `model.training` (train or eval batch) are read here;
- with several processes a prompt's samples may sit on different processes; the gathered table is process 0's
  samples, then process 1's, ..., and groups are `num_generations` consecutive rows of it;
- `None` becomes NaN: TRL's sums and group statistics skip it (`nansum`, `nanmean`), a completion that every
  function scored None gets advantage 0.
"""

import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from accelerate.utils import gather_object
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from transformers.utils import logging
from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import get_callable_name, is_async_callable

from openrlhf_lsc.monitor import Monitor, check_evaluators
from openrlhf_lsc.rewards import RewardSpec, reward_utilities

__all__ = ["LSCRewardFunc", "MonitorCallback", "lsc_reward_funcs"]
logger = logging.get_logger(__name__)

Source = Union[str, Callable[..., List[Optional[float]]]]


class _Scorer:
    """One reward source: a TRL-style callable, or a reward-model checkpoint scored the way TRL scores one."""

    def __init__(self, source: Source, name: Optional[str] = None):
        if isinstance(source, str):
            # As GRPOTrainer.__init__ loads a reward model given by path: one logit, the tokenizer saved with it.
            self.name = name or os.path.basename(source.rstrip("/"))
            self.model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            # The model reads its score at the last non-pad token: it must know the tokenizer's pad id.
            self.model.config.get_text_config().pad_token_id = self.tokenizer.pad_token_id
        elif callable(source):
            if is_async_callable(source):
                raise TypeError(f"reward source {get_callable_name(source)!r} is async: give a synchronous callable")
            self.name = name or get_callable_name(source)
            self.model = None
        else:
            raise TypeError(
                f"a reward source must be a callable f(prompts, completions, **kw) -> list of floats or a reward-model "
                f"path, got {type(source).__name__} {source!r:.80}"
            )
        self.source = source

    def __call__(self, prompts: list, completions: list, kw: Dict[str, Any], trainer: Any) -> List[Optional[float]]:
        if self.model is None:
            out = list(self.source(prompts=prompts, completions=completions, **kw))
            if len(out) != len(prompts):
                raise ValueError(f"reward source {self.name!r} returned {len(out)} rewards for {len(prompts)} completions")
            return out
        device = trainer.accelerator.device if trainer is not None else torch.device("cpu")
        self.model.to(device)
        if is_conversational({"prompt": prompts[0]}):
            template = getattr(trainer, "chat_template_kwargs", None) or {}
            texts = [apply_chat_template({"messages": p + c}, self.tokenizer, **template)["text"]
                     for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        inputs = self.tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                                add_special_tokens=False).to(device)
        with torch.inference_mode():
            return self.model(**inputs).logits[:, 0].float().tolist()


def _where(prompt: Any) -> str:
    return f"prompt {prompt!r:.100}"


def _rewards(scorer: _Scorer, prompts: list, completions: list, kw: Dict[str, Any], trainer: Any) -> torch.Tensor:
    """The source's rewards as float64 with NaN for None; any other non-finite value is refused, naming the prompt."""
    out = scorer(prompts, completions, kw, trainer)
    for value, prompt in zip(out, prompts):
        if value is not None and not math.isfinite(value):
            raise ValueError(
                f"reward source {scorer.name!r} returned {value} for {_where(prompt)}: rewards must be finite numbers "
                "(or None where the source does not apply)"
            )
    return torch.tensor([math.nan if v is None else float(v) for v in out], dtype=torch.float64)


class LSCRewardFunc:
    """A TRL reward function returning one reward source's utility u_k; made by `lsc_reward_funcs`.

    `__name__` is `lsc_<name>`: TRL's `rewards/lsc_<name>/mean` is the mean utility, while `lsc/<name>/reward`,
    `lsc/<name>/utility` and, with a reference, `lsc/<name>/margin` and `lsc/<name>/above_ref` come through
    `log_metric` (means over this process's scored samples).
    """

    def __init__(self, scorer: _Scorer, spec: RewardSpec, monitor: Optional["MonitorCallback"], last: bool):
        self.scorer, self.spec, self.monitor, self.last = scorer, spec, monitor, last
        self.name = scorer.name
        self.__name__ = f"lsc_{self.name}"

    def __repr__(self) -> str:
        return f"LSCRewardFunc({self.name!r}, transform={self.spec.transform!r}, reference={self.spec.reference!r})"

    def __call__(self, prompts: list, completions: list, **kw: Any) -> List[Optional[float]]:
        log_metric = kw.get("log_metric")
        trainer = getattr(log_metric, "__self__", None)  # GRPOTrainer / RLOOTrainer: see the module docstring
        r = _rewards(self.scorer, prompts, completions, kw, trainer)
        utility, metrics = self._utilities(r, prompts, kw, trainer)
        for key, values in metrics.items():
            if log_metric is not None and key != "lsc/utility" and not torch.isnan(values).all():
                log_metric(key, torch.nanmean(values).item())
        if self.monitor is not None:
            above = metrics.get(f"lsc/{self.name}/above_ref")
            if above is None and self.spec.reference != "none":  # every sample None here: the columns must agree
                above = torch.full_like(r, math.nan)  # across processes for the monitor's gather
            self.monitor._record(self, completions, r, above)
            if self.last:
                self.monitor._observe(prompts, completions, kw, trainer, log_metric)
        return [None if math.isnan(u) else u for u in utility.tolist()]

    def _utilities(self, r: torch.Tensor, prompts: list, kw: Dict[str, Any], trainer: Any):
        """u_k and the per-sample metrics of this process's samples, NaN where the source gave None."""
        if self.spec.reference == "group":
            return self._group_utilities(r, trainer)
        labels = None
        if self.spec.reference == "label":
            if self.spec.label_key not in kw:
                columns = sorted(k for k in kw if k not in ("trainer_state", "log_metric", "log_extra", "completion_ids"))
                raise ValueError(
                    f"reference='label' reads the dataset column {self.spec.label_key!r}, which the batch lacks "
                    f"(columns: {columns}); add it (schema: openrlhf_lsc.references) or set label_key"
                )
            labels = kw[self.spec.label_key]
        # A source that returns None for a sample does not apply to it: its label is not read either.
        rows = (~torch.isnan(r)).nonzero().flatten().tolist()
        return _scatter(len(r), [(rows, 1)], r, self.spec,
                        labels=[labels[i] for i in rows] if labels is not None else None,
                        where=[_where(prompts[i]) for i in rows])

    def _group_utilities(self, r: torch.Tensor, trainer: Any):
        """Gather every process's rewards, take each prompt's quantile over its scored samples, keep this slice."""
        if trainer is None:
            raise ValueError(
                "reference='group' needs TRL's trainer (its num_generations and processes): call the function "
                "through GRPOTrainer or RLOOTrainer"
            )
        acc = trainer.accelerator
        n = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        full = acc.gather(r.to(acc.device)).cpu()
        scored = ~torch.isnan(full).reshape(-1, n)
        if scored.all():
            blocks = [(list(range(len(full))), n)]
        else:  # groups with None: each group's quantile over its scored samples (fewer than 2: no reference)
            blocks = [([g * n + j for j in range(n) if ok[j]], int(ok.sum())) for g, ok in enumerate(scored) if ok.sum() >= 2]
        utility, metrics = _scatter(len(full), blocks, full, self.spec)
        local = slice(acc.process_index * len(r), (acc.process_index + 1) * len(r))
        return utility[local], {k: v[local] for k, v in metrics.items()}


def _scatter(n: int, blocks, r: torch.Tensor, spec: RewardSpec, labels=None, where=None):
    """Run `reward_utilities` on each block (rows, group size) of `r`; rows outside every block get NaN."""
    utility = torch.full((n,), math.nan, dtype=torch.float64)
    metrics: Dict[str, torch.Tensor] = {}
    for rows, group_size in blocks:
        if not rows:
            continue
        u, m = reward_utilities(r[rows].unsqueeze(1), spec, labels=labels, group_size=group_size, where=where)
        utility[rows] = u.double()
        for key, values in m.items():
            metrics.setdefault(key, torch.full((n,), math.nan, dtype=torch.float64))[rows] = values.double()
    return utility, metrics


def lsc_reward_funcs(
    sources: Union[Sequence[Source], Mapping[str, Source]],
    *,
    reference: str,
    transform: str = "lsc",
    quantile: Optional[float] = None,
    reference_value: Optional[Sequence[float]] = None,
    label_key: str = "lsc_ref",
    monitor: Optional["MonitorCallback"] = None,
) -> List[LSCRewardFunc]:
    """Turn K reward sources into K TRL reward functions whose sum is the AND of their LSC utilities.

    Args:
        sources: the reward sources, a list (named as TRL names them: a callable's `__name__`, a checkpoint's folder
            name) or a dict name -> source. A source is a TRL reward callable `f(prompts, completions, **kw)`
            returning one float (or None) per completion, or a path to a reward-model checkpoint
            (`AutoModelForSequenceClassification`, one label; scored as TRL scores one: prompt + completion, or the
            chat template for conversational data).
        reference: `label` (per prompt, from the dataset column `label_key`), `group` (the `quantile` of the
            prompt's `num_generations` samples, gathered across processes), `constant` (`reference_value`) or
            `none` (transforms `raw`, `logsigmoid` only).
        transform: `lsc` (log sigmoid(r - r_ref)), `center`, `sigmoid`, `logsigmoid` or `raw` (see
            `openrlhf_lsc.rewards.transform_reward`).
        quantile: in (0, 1), with `reference="group"`.
        reference_value: one constant per source, with `reference="constant"`.
        label_key: the dataset column holding `{"<name>": {"reference": float, ...}}` per prompt.
        monitor: a `MonitorCallback` to feed every training batch (pass it to the trainer's `callbacks` too).

    Returns:
        K reward functions for `GRPOTrainer(reward_funcs=...)` / `RLOOTrainer(reward_funcs=...)`, named
        `lsc_<name>`. Their weights are `reward_weights` (leave it unset for AND).

    Example:
        >>> def helpful(prompts, completions, **kw):
        ...     return [float(len(c)) for c in completions]
        >>> (f,) = lsc_reward_funcs([helpful], reference="constant", reference_value=[2.0])
        >>> f.__name__, [round(u, 4) for u in f(prompts=["q", "q"], completions=["ab", "abcd"])]
        ('lsc_helpful', [-0.6931, -0.1269])
    """
    items = list(sources.items()) if isinstance(sources, Mapping) else [(None, s) for s in sources]
    scorers = [_Scorer(source, name) for name, source in items]
    names = tuple(s.name for s in scorers)
    if len(set(names)) != len(names):
        raise ValueError(f"reward sources share a name ({list(names)}): name them with a dict {{name: source}}")
    # One spec over all K validates every setting against K (K constants, a quantile for group, ...); its
    # messages name the settings as the OpenRLHF plugin's flags, --lsc.<keyword argument>.
    RewardSpec(names=names, transform=transform, reference=reference, quantile=quantile,
               reference_value=reference_value, label_key=label_key)
    if monitor is not None:
        monitor._attach(scorers)
    funcs = []
    for k, scorer in enumerate(scorers):
        spec = RewardSpec(names=(scorer.name,), transform=transform, reference=reference, quantile=quantile,
                          reference_value=None if reference_value is None else (reference_value[k],),
                          label_key=label_key)
        funcs.append(LSCRewardFunc(scorer, spec, monitor, last=k == len(scorers) - 1))
    return funcs


class MonitorCallback(TrainerCallback):
    """Reward-hacking monitor for TRL: held-out evaluators score every training batch; stops when the rule fires.

    Give it to `lsc_reward_funcs(..., monitor=)` and to the trainer's `callbacks`. On each training batch (not
    evaluation batches) the last LSC function scores the completions with the evaluators, gathers proxies and
    evaluators across processes, calls `openrlhf_lsc.monitor.Monitor.update` (same result on every process) and
    logs its `monitor/*` metrics through `log_metric`. Samples with a None proxy or evaluator reward are left out.
    When the stop rule fires (the evaluators' `window`-step average fell for `patience` steps while the proxies'
    rose) it warns and, with `stop=True`, sets `control.should_training_stop` at the end of that step.
    `summary()` gives the best-evaluator step and the step the rule fired.

    Args:
        evaluators: held-out reward sources (list or name -> source, as in `lsc_reward_funcs`), never a proxy.
        patterns: shortcut probes `name=regex` (`openrlhf_lsc.monitor.compile_patterns`).
        window, patience: W and N of `openrlhf_lsc.monitor.stop_rule`.
        sft_std: name -> the model's reward std under the SFT policy (default: the std of the first batch).
        stop: stop training when the rule fires (False: warn and log only).

    Example:
        >>> def judge(prompts, completions, **kw):
        ...     return [float(c.count("a")) for c in completions]
        >>> monitor = MonitorCallback([judge], window=2, patience=2)
        >>> def helpful(prompts, completions, **kw):
        ...     return [float(len(c)) for c in completions]
        >>> funcs = lsc_reward_funcs([helpful], reference="constant", reference_value=[2.0], monitor=monitor)
        >>> monitor.monitor.proxies, monitor.monitor.evaluators
        (['helpful'], ['judge'])
    """

    def __init__(
        self,
        evaluators: Union[Sequence[Source], Mapping[str, Source]],
        patterns: Sequence[str] = (),
        window: int = 5,
        patience: int = 3,
        sft_std: Optional[Mapping[str, float]] = None,
        stop: bool = True,
    ):
        items = list(evaluators.items()) if isinstance(evaluators, Mapping) else [(None, e) for e in evaluators]
        self.evaluators = [_Scorer(source, name) for name, source in items]
        self.options = dict(patterns=patterns, window=window, patience=patience, sft_std=sft_std)
        self.stop = stop
        self.monitor: Optional[Monitor] = None
        self.batch: Dict[str, Any] = {}

    def _attach(self, proxies: Sequence[_Scorer]) -> None:
        if self.monitor is not None:
            raise ValueError("this MonitorCallback already watches a set of reward functions: make one per set")
        for e in self.evaluators:
            for p in proxies:
                if e.source is p.source or e.name == p.name:
                    raise ValueError(
                        f"evaluator {e.name!r} is also the reward source {p.name!r}: an evaluator must be held out "
                        "(never in the reward), under a name of its own"
                    )
        # the same checkpoint under two spellings of its path
        check_evaluators([e.source for e in self.evaluators if e.model is not None],
                         [p.source for p in proxies if p.model is not None])
        self.proxies = [p.name for p in proxies]
        self.monitor = Monitor(self.proxies, [e.name for e in self.evaluators], **self.options)

    def _record(self, func: LSCRewardFunc, completions: list, r: torch.Tensor, above: Optional[torch.Tensor]) -> None:
        self.batch[func.name] = (completions, r, above)

    def _observe(self, prompts: list, completions: list, kw: Dict[str, Any], trainer: Any, log_metric) -> None:
        batch, self.batch = self.batch, {}
        if trainer is None:
            raise ValueError("the monitor needs TRL's trainer: call the reward functions through GRPOTrainer or RLOOTrainer")
        if not trainer.model.training:  # evaluation batches share the training step number: not monitored
            return
        if any(name not in batch or batch[name][0] is not completions for name in self.proxies):
            raise RuntimeError(
                "the monitor expected TRL to call the LSC reward functions one after the other on the same batch; "
                "keep them together in reward_funcs, in the order lsc_reward_funcs returned them"
            )
        columns = [batch[p][1] for p in self.proxies]
        columns += [_rewards(e, prompts, completions, kw, trainer) for e in self.evaluators]
        above = {p: batch[p][2] for p in self.proxies if batch[p][2] is not None}
        columns += list(above.values())
        acc = trainer.accelerator
        table = acc.gather(torch.stack(columns, 1).to(acc.device)).cpu()
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        texts = gather_object(texts)  # every process's texts, in process order (one process: as is)
        keep = ~torch.isnan(table[:, : len(self.proxies) + len(self.evaluators)]).any(1)
        k, m = len(self.proxies), len(self.evaluators)
        metrics, fired = self.monitor.update(
            kw["trainer_state"].global_step,
            table[keep, :k],
            table[keep, k : k + m],
            above_ref={p: table[keep, k + m + j] for j, p in enumerate(above)},
            responses=[t for t, ok in zip(texts, keep.tolist()) if ok],
        )
        for key, value in metrics.items():
            if not math.isnan(value):
                log_metric(key, value)
        if fired:
            logger.warning(self.monitor.summary()["message"])

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop and self.monitor is not None and self.monitor.fired_step is not None:
            control.should_training_stop = True
        return control

    def summary(self) -> Dict[str, Any]:
        """The monitor's summary: best-evaluator step and signal, the step the rule fired (or None), a message."""
        if self.monitor is None or not self.monitor.steps:
            raise ValueError("the monitor has seen no training batch yet")
        return self.monitor.summary()

