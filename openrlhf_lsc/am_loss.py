"""Advantage Model (AM) reward-model loss and pairwise RM metrics (Peng et al. 2023). Torch only.

The paper does not publish its equations (only an expected-reward parameterisation, a bounded advantage with
margin m = 2.5 and per-task regulation of the score distribution); this is the formulation we implement.

The network's score s(x, y) on prompt + response *is* the advantage a(x, y) = r(x, y) - E_y'[r(x, y')],
so the saved model is a stock OpenRLHF reward model that PPO loads and calls unchanged. (A separate
prompt-only baseline b(x) would need a second forward pass that stock PPO never makes.) For pairs
i = 1..B with chosen score c_i, rejected score r_i, task t_i and optional per-pair margin mu_i:

    L =             mean_i -log sigmoid(c_i - r_i - mu_i)                   ranking
        + l_exp   * mean_i ((c_i + r_i) / 2)^2                              expected reward
        + l_bound * mean_{a in all c, r} relu(|a| - m)^2                    bounded advantage
        + l_task  * mean_{t in batch} [ M_t^2 / 2 + (V_t - tau^2)^2 / 2 ]    per-task regulation

- ranking: the Bradley-Terry likelihood, exactly OpenRLHF's `PairWiseLoss` (all l = 0 gives it back).
  c - r is the same for r(x, y) and a(x, y), so the advantage parameterisation costs no accuracy.
- expected reward: the two responses of a pair are two responses to the same prompt, so their mean
  estimates E_y[a(x, y)], which is 0 for an advantage. BT is blind to any per-prompt offset (it only
  sees c - r); this term pins that offset and, depending on c + r only, never fights the ranking.
  (If chosen and rejected come from different sources, the zero point is their average.)
- bounded advantage: on separable pairs BT keeps widening c - r, i.e. unbounded, over-confident
  scores for PPO to chase; |a| <= m caps a pair's confidence at sigmoid(2m) (m = 2.5: 0.993).
- per-task regulation: every task's scores get mean 0 and the same spread tau, so no task scores
  systematically higher or wider (the paper's code-vs-QA drift that PPO exploits). M_t, V_t are the
  mean and variance of task t's scores (chosen and rejected), from exponential moving averages of
  the mean and mean square over training batches (weight `task_momentum` for the newest):
  micro-batches hold a few pairs per task, and a variance from one batch would force every pair of
  the task to the same gap. The running values set the penalty, the current batch carries its
  gradient (straight-through): the usual stochastic gradient of a penalty on population statistics.
  The penalty is on the variance, not the std, whose gradient grows as 1/std while a task's scores
  are still nearly constant (as at initialisation).

With data parallelism, pass `all_reduce` (a sum over ranks) and the training tasks: each update then uses
the whole global batch (counts, sums and sums of squares summed over ranks), so every rank holds the same
running statistics; the gradient still comes from the rank's own batch. The running statistics are part of
`state_dict()` (as extra state), for checkpoints.
"""

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

ALL = "all"  # task name of every pair when the data has no task field


class AdvantageModelLoss(torch.nn.Module):
    """The AM loss above; call as `loss(chosen, rejected, tasks, margin)`.

    Args:
        margin: m, bound on |a| (paper: 2.5).
        expected_coef: l_exp, weight of the expected-reward (per-pair mean zero) term.
        bound_coef: l_bound, weight of the bounded-advantage term.
        task_coef: l_task, weight of the per-task regulation term (needs tasks).
        task_std: tau, the spread every task is pulled to.
        task_momentum: weight of the newest batch in the running task statistics, in (0, 1].
        task_names: every task of the training data (a fixed order for `all_reduce`); needed with it.
        all_reduce: sums a float tensor over data-parallel ranks (returns the sum); None: this process only.
    """

    def __init__(
        self,
        margin: float = 2.5,
        expected_coef: float = 1.0,
        bound_coef: float = 1.0,
        task_coef: float = 1.0,
        task_std: float = 1.0,
        task_momentum: float = 0.1,
        task_names: Optional[Sequence[str]] = None,
        all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        super().__init__()
        if margin <= 0 or task_std <= 0:
            raise ValueError(f"margin and task_std must be > 0, got {margin} and {task_std}")
        if min(expected_coef, bound_coef, task_coef) < 0:
            raise ValueError(f"AM coefficients must be >= 0, got {expected_coef}, {bound_coef}, {task_coef}")
        if not 0 < task_momentum <= 1:
            raise ValueError(f"task_momentum must be in (0, 1], got {task_momentum}")
        if all_reduce is not None and not task_names:
            raise ValueError("all_reduce needs task_names: every rank must sum the same statistics in the same order")
        self.margin, self.task_std, self.task_momentum = margin, task_std, task_momentum
        self.task_names = list(dict.fromkeys(task_names)) if task_names else None
        self.all_reduce = all_reduce
        self.coefs = {"expected": expected_coef, "bound": bound_coef, "task": task_coef}
        self.running: Dict[str, List[float]] = {}  # task -> [mean, mean of squares]
        self.terms: Dict[str, float] = {}  # last call's unweighted terms, for logging

    def forward(
        self,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        tasks: Optional[Sequence[str]] = None,
        margin: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Compute the loss of one batch of pairs.

        Args:
            chosen: [B] scores a(x, y_chosen).
            rejected: [B] scores a(x, y_rejected).
            tasks: B task names; needed when task_coef > 0.
            margin: optional [B] per-pair margins mu_i of the ranking term (stock --model.margin_loss_enable).

        Returns:
            The scalar loss (float32; float64 for float64 scores). Running task statistics update only
            in training mode.
        """
        dtype = torch.promote_types(chosen.dtype, torch.float32)  # bf16 scores: loss in fp32
        c, r = chosen.to(dtype).flatten(), rejected.to(dtype).flatten()
        if c.shape != r.shape:
            raise ValueError(f"chosen and rejected scores differ in shape: {tuple(c.shape)} vs {tuple(r.shape)}")
        if not (torch.isfinite(c).all() and torch.isfinite(r).all()):
            raise FloatingPointError(f"reward scores are not finite (chosen {c.tolist()}, rejected {r.tolist()})")
        gap = c - r if margin is None else c - r - margin.to(c)
        terms = {"rank": -F.logsigmoid(gap).mean()}
        if self.coefs["expected"]:
            terms["expected"] = ((c + r) / 2).pow(2).mean()
        if self.coefs["bound"]:
            terms["bound"] = F.relu(torch.cat([c, r]).abs() - self.margin).pow(2).mean()
        if self.coefs["task"]:
            if tasks is None or len(tasks) != len(c):
                got = "none" if tasks is None else len(tasks)
                raise ValueError(f"the per-task term needs one task per pair: {len(c)} pairs, tasks: {got}")
            terms["task"] = self._task_term(c, r, list(tasks))
        self.terms = {k: v.item() for k, v in terms.items()}
        return terms["rank"] + sum(self.coefs[k] * v for k, v in terms.items() if k != "rank")

    def get_extra_state(self) -> dict:
        return {"running": {task: list(v) for task, v in self.running.items()}}

    def set_extra_state(self, state: dict) -> None:
        self.running = {task: [float(m), float(sq)] for task, (m, sq) in state["running"].items()}

    def _update_running(self, scores: Dict[str, torch.Tensor]) -> None:
        """EMA update of every task's (mean, mean of squares) with this batch, summed over ranks if all_reduce."""
        names = self.task_names if self.all_reduce is not None else list(scores)
        unknown = set(scores) - set(names)
        if unknown:
            raise ValueError(f"tasks {sorted(unknown)} are not among the training tasks {names}")
        device = next(iter(scores.values())).device
        sums = torch.zeros(len(names), 3, dtype=torch.float64, device=device)  # count, sum, sum of squares
        for i, task in enumerate(names):
            if task in scores:
                a = scores[task].double()
                sums[i, 0], sums[i, 1], sums[i, 2] = len(a), a.sum(), a.pow(2).sum()
        if self.all_reduce is not None:
            sums = self.all_reduce(sums)
        for task, (count, total, squares) in zip(names, sums.tolist()):
            if count > 0:
                new = (total / count, squares / count)
                old = self.running.get(task, new)
                self.running[task] = [(1 - self.task_momentum) * o + self.task_momentum * n for o, n in zip(old, new)]

    def _task_term(self, c: torch.Tensor, r: torch.Tensor, tasks: List[str]) -> torch.Tensor:
        scores = {}
        for task in dict.fromkeys(tasks):  # first-seen order
            idx = torch.tensor([i for i, t in enumerate(tasks) if t == task], device=c.device)
            scores[task] = torch.cat([c[idx], r[idx]])
        if self.training:
            self._update_running({task: a.detach() for task, a in scores.items()})
        penalties = []
        for task, a in scores.items():
            batch_mean, batch_sq = a.mean(), a.pow(2).mean()
            batch_var = (a - batch_mean).pow(2).mean()
            run_mean, run_sq = self.running.get(task, (batch_mean.item(), batch_sq.item()))
            # value of the running statistic, gradient of this batch's (straight-through); the variance
            # gradient is centred on the batch mean so it only spreads or shrinks, never shifts, the scores
            mean = run_mean + (batch_mean - batch_mean.detach())
            var = max(run_sq - run_mean**2, 0.0) + (batch_var - batch_var.detach())
            penalties.append(mean.pow(2) / 2 + (var - self.task_std**2).pow(2) / 2)
        return torch.stack(penalties).mean()


def pairwise_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, tasks: Optional[Sequence[str]] = None, n_bins: int = 10
) -> dict:
    """Accuracy, expected calibration error and per-task score statistics of a reward model on pairs.

    ECE: the model's probability that the chosen response wins is p = sigmoid(c - r); its
    prediction is correct when c > r, with confidence max(p, 1 - p) in [0.5, 1]. Confidences fall
    into `n_bins` equal bins over [0.5, 1] (the last one closed) and
    ECE = sum_b n_b / N * |accuracy_b - mean confidence_b|.

    Args:
        chosen: [N] scores of the chosen responses.
        rejected: [N] scores of the rejected responses.
        tasks: N task names (default: every pair in task "all").
        n_bins: number of confidence bins.

    Returns:
        {"n_pairs", "accuracy", "ece", "per_task": {task: {"n_pairs", "mean", "std"}},
        "task_mean_spread"}: mean and population std over the task's chosen and rejected scores;
        the spread is the largest minus the smallest task mean.
    """
    c, r = chosen.double().flatten().cpu(), rejected.double().flatten().cpu()
    n = len(c)
    if n == 0 or len(r) != n:
        raise ValueError(f"need equally many chosen and rejected scores, at least one: got {n} and {len(r)}")
    tasks = [ALL] * n if tasks is None else [str(t) for t in tasks]
    if len(tasks) != n:
        raise ValueError(f"got {len(tasks)} task names for {n} pairs")
    correct = (c > r).double()
    p = torch.sigmoid(c - r)
    conf = torch.maximum(p, 1 - p)
    bin_of = ((conf - 0.5) * 2 * n_bins).long().clamp(0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bin_of == b
        if in_bin.any():
            ece += in_bin.sum().item() / n * abs(correct[in_bin].mean().item() - conf[in_bin].mean().item())
    per_task = {}
    for task in sorted(set(tasks)):
        idx = torch.tensor([i for i, t in enumerate(tasks) if t == task])
        scores = torch.cat([c[idx], r[idx]])
        per_task[task] = {
            "n_pairs": len(idx),
            "mean": scores.mean().item(),
            "std": scores.std(unbiased=False).item(),
        }
    means = [s["mean"] for s in per_task.values()]
    return {
        "n_pairs": n,
        "accuracy": correct.mean().item(),
        "ece": ece,
        "per_task": per_task,
        "task_mean_spread": max(means) - min(means),
    }
