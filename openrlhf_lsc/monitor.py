"""Over-optimisation monitor: is PPO exploiting its proxy reward models? Torch only, no OpenRLHF.

Held-out *evaluator* reward models score every rollout but never enter the utility. Per PPO step, from the
batch's proxy rewards `[N, K]` and evaluator rewards `[N, M]`, `Monitor.update` returns:

- `monitor/<E>/mean`, `monitor/<E>/gain` (mean - mean at the first step) and `monitor/<E>/gain_std` (gain in
  units of E's SFT std) per evaluator E; `monitor/<P>/gain_std` per proxy P;
- `monitor/<P>-<E>/gap_std`: proxy gain - evaluator gain, each in its own SFT std; it grows when the policy
  gains proxy reward the evaluator does not confirm;
- `monitor/<P>~<E>/spearman`: the rank correlation of P and E over the batch (ties averaged, as scipy);
- `monitor/<P>/above_ref`: the fraction of samples above their reference (saturation), when given;
- `monitor/pattern/<name>`: fraction of responses matching each shortcut regex; `monitor/response_chars`;
- `monitor/signal/evaluator`, `monitor/signal/proxy`: the two series the stop rule reads (below);
  `monitor/best_step`, `monitor/fired` (1.0 from the step the rule fired on).

Stop rule (`stop_rule`): evaluator signal e_t = mean over evaluators of gain_std, proxy signal p_t = the same over
proxies. With moving averages over the last W steps (`window`), the rule holds at step t when the evaluator's
average fell strictly at each of the last N steps (`patience`) while the proxy's average rose over those N steps.
It needs W + N steps of history; an equal average breaks a run of falls. The monitor fires once (the first step the
rule holds) and records the best-evaluator step (highest e_t, the first of equal ones); callers warn, and may
save a checkpoint and stop.
"""

import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from openrlhf_lsc.estimate import spearman

NAME = re.compile(r"^[A-Za-z_][\w.-]*$")


def check_evaluators(evaluators: Sequence[str], proxies: Sequence[str]) -> None:
    """Refuse an evaluator that is also a training (proxy) reward model: it would only confirm the proxy.

    Args:
        evaluators: evaluator model paths or names (`--lsc.monitor.reward_models`).
        proxies: the training reward models' paths or names, compared after path normalisation.

    Example:
        >>> check_evaluators(["/rm/judge"], ["/rm/helpful", "/rm/harmless/"])
    """
    norm = {os.path.normpath(p.rstrip("/")): p for p in proxies}
    for e in evaluators:
        if os.path.normpath(e.rstrip("/")) in norm:
            raise ValueError(
                f"--lsc.monitor.reward_models: {e!r} is also a training reward model; an evaluator must be a held-out "
                "model that never enters the utility (e.g. a model trained on other pairs)"
            )


def compile_patterns(patterns: Sequence[str]) -> Dict[str, "re.Pattern"]:
    """Compile shortcut probes given as `name=regex` (or a bare regex, named by itself).

    Args:
        patterns: items of `--lsc.monitor.patterns`; the text before the first `=` is a name when it looks like one
            (letters, digits, `_.-`), so `(?=x)` stays a bare regex. Compiled with `re.MULTILINE`: `^` and `$`
            match at every line of a response.

    Returns:
        name -> compiled pattern, in the given order.

    Example:
        >>> sorted(compile_patterns([r"list=^\\s*(?:[-*]|\\d+\\.)\\s", r"(?i)I can't"]))
        ["(?i)I can't", 'list']
    """
    out = {}
    for item in patterns:
        name, sep, regex = item.partition("=")
        if not sep or not NAME.match(name):
            name, regex = item, item
        try:
            compiled = re.compile(regex, re.MULTILINE)
        except re.error as e:
            raise ValueError(f"--lsc.monitor.patterns: {regex!r} is not a valid regular expression ({e})") from None
        if name in out:
            raise ValueError(f"--lsc.monitor.patterns: the name {name!r} is used twice")
        out[name] = compiled
    return out


def moving_average(x: Sequence[float], window: int) -> List[float]:
    """Trailing means of `window` values: element i averages x[i : i + window] (len(x) - window + 1 values)."""
    return [sum(x[i : i + window]) / window for i in range(len(x) - window + 1)]


def stop_rule(evaluator: Sequence[float], proxy: Sequence[float], window: int, patience: int) -> bool:
    """Whether the early-stop rule holds at the last step of the two signal histories.

    Args:
        evaluator, proxy: one value per step so far (same length).
        window: moving-average window W (>= 1).
        patience: N (>= 1): the evaluator average must have fallen strictly at each of the last N steps while the
            proxy average is higher than N steps ago.

    Returns:
        True when the rule holds now (False while fewer than W + N steps are known).

    Example:
        >>> stop_rule([0, 1, 2, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6], window=2, patience=2)
        True
    """
    if window < 1 or patience < 1:
        raise ValueError(f"--lsc.monitor.window and --lsc.monitor.patience must be >= 1, got {window}, {patience}")
    if len(evaluator) != len(proxy):
        raise ValueError(f"evaluator and proxy histories differ in length: {len(evaluator)} vs {len(proxy)}")
    if len(evaluator) < window + patience:
        return False
    e = moving_average(evaluator[-(window + patience) :], window)
    p = moving_average(proxy[-(window + patience) :], window)
    return all(b < a for a, b in zip(e, e[1:])) and p[-1] > p[0]


def first_stop(evaluator: Sequence[float], proxy: Sequence[float], window: int, patience: int) -> Optional[int]:
    """Index of the first step at which `stop_rule` holds (None if never): the rule applied to a finished run."""
    for t in range(len(evaluator)):
        if stop_rule(evaluator[: t + 1], proxy[: t + 1], window, patience):
            return t
    return None


def _columns(x: Any, names: Sequence[str], what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    x = x.to(torch.promote_types(x.dtype, torch.float64))
    if x.dim() != 2 or x.shape[1] != len(names):
        raise ValueError(f"{what} must be [N, {len(names)}] (one column per model {list(names)}), got {tuple(x.shape)}")
    bad = ~torch.isfinite(x)
    if bad.any():
        i, j = bad.nonzero()[0].tolist()
        raise ValueError(f"{what}: model {names[j]!r} gave {x[i, j].item()} for sample {i}; scores must be finite")
    return x


class Monitor:
    """Per-step over-optimisation metrics and the early-stop rule (module docstring).

    Args:
        proxies: the K training reward-model names (the columns of `proxy_rewards`).
        evaluators: the M evaluator names (columns of `evaluator_rewards`); none may be a proxy.
        patterns: shortcut probes, `name=regex` items (`compile_patterns`).
        window, patience: W and N of `stop_rule`.
        sft_std: name -> the model's reward std under the SFT policy (e.g. the reference labels' `std`); a model
            not given takes the std of its scores in the first batch.

    Example:
        >>> import torch
        >>> m = Monitor(["helpful"], ["judge"], patterns=["list=^- "], window=1, patience=1)
        >>> metrics, stop = m.update(0, torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [3.0]]), responses=["- a", "b"])
        >>> metrics["monitor/pattern/list"], metrics["monitor/judge/mean"], stop
        (0.5, 2.0, False)
    """

    def __init__(
        self,
        proxies: Sequence[str],
        evaluators: Sequence[str],
        patterns: Sequence[str] = (),
        window: int = 5,
        patience: int = 3,
        sft_std: Optional[Mapping[str, float]] = None,
    ):
        if not evaluators:
            raise ValueError("--lsc.monitor.reward_models: the monitor needs at least one evaluator reward model")
        check_evaluators(evaluators, proxies)
        stop_rule([], [], window, patience)  # validates window and patience
        self.proxies, self.evaluators = list(proxies), list(evaluators)
        self.patterns = compile_patterns(patterns)
        self.window, self.patience = window, patience
        self.sft_std = {}
        for name, s in (sft_std or {}).items():
            if not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise ValueError(f"the SFT std of reward model {name!r} must be a finite number > 0, got {s!r}")
            self.sft_std[name] = float(s)
        self.start: Dict[str, float] = {}  # first-step mean per model
        self.steps: List[int] = []
        self.signals: Dict[str, List[float]] = {"evaluator": [], "proxy": []}
        self.fired_step: Optional[int] = None

    def update(
        self,
        step: int,
        proxy_rewards: Any,
        evaluator_rewards: Any,
        above_ref: Optional[Mapping[str, Any]] = None,
        responses: Optional[Sequence[str]] = None,
    ) -> Tuple[Dict[str, float], bool]:
        """Add one PPO step's batch.

        Args:
            step: the global step (strictly increasing).
            proxy_rewards: `[N, K]` raw proxy rewards, columns in `proxies` order.
            evaluator_rewards: `[N, M]` evaluator rewards, columns in `evaluators` order.
            above_ref: proxy name -> `[N]` 0/1 (`reward_utilities`' `lsc/<name>/above_ref`).
            responses: the N response texts, for the shortcut probes and `monitor/response_chars`.

        Returns:
            (metrics: name -> float, stop: True only at the step the rule first holds).
        """
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"monitor steps must increase: got step {step} after {self.steps[-1]}")
        proxy = _columns(proxy_rewards, self.proxies, "proxy rewards")
        evaluator = _columns(evaluator_rewards, self.evaluators, "evaluator rewards")
        if proxy.shape[0] != evaluator.shape[0]:
            raise ValueError(f"{proxy.shape[0]} proxy-scored samples but {evaluator.shape[0]} evaluator-scored ones")
        if responses is not None and len(responses) != proxy.shape[0]:
            raise ValueError(f"{len(responses)} responses for {proxy.shape[0]} scored samples")
        scores = {n: proxy[:, j] for j, n in enumerate(self.proxies)}
        scores.update({n: evaluator[:, j] for j, n in enumerate(self.evaluators)})
        if not self.steps:
            for name, s in scores.items():
                self.start[name] = s.mean().item()
                if name not in self.sft_std:
                    std = s.std().item() if s.numel() > 1 else 0.0
                    if not std > 0:
                        raise ValueError(
                            f"reward model {name!r} has no spread in the first batch ({s.numel()} samples): "
                            "cannot measure gains in SFT std units; give its SFT std"
                        )
                    self.sft_std[name] = std

        metrics: Dict[str, float] = {}
        gain = {n: (s.mean().item() - self.start[n]) / self.sft_std[n] for n, s in scores.items()}
        for e in self.evaluators:
            mean = scores[e].mean().item()
            metrics.update({f"monitor/{e}/mean": mean, f"monitor/{e}/gain": mean - self.start[e],
                            f"monitor/{e}/gain_std": gain[e]})
        for p in self.proxies:
            metrics[f"monitor/{p}/gain_std"] = gain[p]
            for e in self.evaluators:
                metrics[f"monitor/{p}-{e}/gap_std"] = gain[p] - gain[e]
                metrics[f"monitor/{p}~{e}/spearman"] = spearman(scores[p], scores[e]) if len(proxy) > 1 else math.nan
            if above_ref is not None and p in above_ref:
                metrics[f"monitor/{p}/above_ref"] = torch.as_tensor(above_ref[p], dtype=torch.float64).mean().item()
        if responses is not None:
            for name, pattern in self.patterns.items():
                metrics[f"monitor/pattern/{name}"] = sum(bool(pattern.search(r)) for r in responses) / len(responses)
            metrics["monitor/response_chars"] = sum(len(r) for r in responses) / max(len(responses), 1)

        self.steps.append(step)
        e_sig = sum(gain[e] for e in self.evaluators) / len(self.evaluators)
        p_sig = sum(gain[p] for p in self.proxies) / len(self.proxies)
        self.signals["evaluator"].append(e_sig)
        self.signals["proxy"].append(p_sig)
        stop = self.fired_step is None and stop_rule(self.signals["evaluator"], self.signals["proxy"],
                                                      self.window, self.patience)
        if stop:
            self.fired_step = step
        metrics.update({"monitor/signal/evaluator": e_sig, "monitor/signal/proxy": p_sig,
                        "monitor/best_step": float(self.best_step()), "monitor/fired": float(self.fired_step is not None)})
        return metrics, stop

    def best_step(self) -> int:
        """The step with the highest evaluator signal so far (the first of equal ones)."""
        e = self.signals["evaluator"]
        return self.steps[max(range(len(e)), key=lambda i: (e[i], -i))]

    def summary(self) -> Dict[str, Any]:
        """What the run's output records: best-evaluator step and signal, the step the rule fired (or None), a message."""
        best = self.best_step()
        out = {"best_step": best, "best_evaluator_gain_std": self.signals["evaluator"][self.steps.index(best)],
               "fired_step": self.fired_step, "window": self.window, "patience": self.patience}
        if self.fired_step is not None:
            out["message"] = (
                f"over-optimisation: the evaluators' {self.window}-step average fell for {self.patience} steps while "
                f"the proxies' rose (step {self.fired_step}); the best evaluator score was at step {best}"
            )
        return out

    def state_dict(self) -> Dict[str, Any]:
        """JSON-ready state: the history PPO writes to `lsc_monitor.json` each step (a resumed PPO run starts a new
        history; `load_state_dict` takes one back)."""
        return {"start": self.start, "sft_std": self.sft_std, "steps": self.steps, "signals": self.signals,
                "fired_step": self.fired_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.start, self.sft_std = dict(state["start"]), dict(state["sft_std"])
        self.steps, self.fired_step = list(state["steps"]), state["fired_step"]
        self.signals = {k: list(v) for k, v in state["signals"].items()}
