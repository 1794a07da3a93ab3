"""Advantage Model training and RM evaluation metrics inside OpenRLHF's `train_rm` (0.11.x).

Active only when the args namespace carries `args.am` (attached by `openrlhf_lsc.cli.train_rm`);
otherwise every patched function runs as stock. With it:
- `RewardDataset` keeps each row's task (`--am.task_key`; "all" without it): its items carry
  `(margin, task)` and its collate returns the stock margins list with a `.tasks` attribute;
- `RewardModelTrainer` wraps its dataloaders so the trainer knows the tasks (and dataset indices) of the
  batch it is on, replaces the loss with `AdvantageModelLoss` for `--model.loss_type am`, stops with the
  batch named when a loss is not finite, adds the AM terms to the training logs, and after each evaluation
  computes `pairwise_metrics` (accuracy, ECE, per-task mean/std) over every evaluation pair once, logs
  them, writes them to `<ckpt.output_dir>/rm_eval_metrics.json` and puts the per-task statistics into the
  model config (`lsc_am_task_stats`, saved in config.json with the model).
- Across data-parallel ranks: the AM loss's running per-task statistics are updated with the global batch
  (summed over the DP group), so all ranks hold the same; they are saved in DeepSpeed checkpoints
  (client state `lsc_am_loss`) and restored by `--ckpt.load_enable`. Evaluation scores are gathered from
  all ranks and each pair counted once: the distributed sampler pads the last batch with repeated pairs.
"""

import json
import os
from collections import Counter

import torch

from openrlhf_lsc.am_loss import ALL, AdvantageModelLoss, pairwise_metrics
from openrlhf_lsc.files import write_atomic
from openrlhf_lsc.integration import bind, wrap
from openrlhf_lsc.integration.rehearsal import LOAD_CKPT, remember_loaded_states

METRICS_FILE = "rm_eval_metrics.json"
CONFIG_KEY = "lsc_am_task_stats"
STATE_KEY = "lsc_am_loss"


class TaskList(list):
    """The list of margins stock `collate_fn` returns, carrying each pair's task in `.tasks`."""

    def __init__(self, margins, tasks):
        super().__init__(margins)
        self.tasks = list(tasks)


def read_tasks(dataset, task_key) -> list:
    """Each row's task as a string ("all" for every row when `task_key` is None).

    Raises ValueError naming `--am.task_key` and the row when the field is absent or empty.
    """
    if task_key is None:
        return [ALL] * len(dataset)
    if task_key not in dataset.column_names:
        raise ValueError(
            f"--am.task_key {task_key!r}: the dataset rows have no such field (fields: {dataset.column_names})"
        )
    tasks = dataset[task_key]
    for i, task in enumerate(tasks):
        if task is None or str(task) == "":
            raise ValueError(f"--am.task_key {task_key!r}: row {i} of the dataset has no task (value {task!r})")
    return [str(t) for t in tasks]


class _TaskFeed:
    """Yields the stock dataloader's batches, telling the trainer which batch (tasks, dataset indices) it is on.

    Done at hand-over to the training loop, so it stays right with dataloader workers prefetching.
    """

    def __init__(self, loader, trainer, name):
        self.loader, self.trainer, self.name, self.passes = loader, trainer, name, 0

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, attr):  # sampler, dataset, ... of the stock dataloader
        return getattr(self.loader, attr)

    def __iter__(self):
        self.passes += 1
        order, start = list(self.loader.sampler), 0  # the dataset indices this rank's batches hold, in order
        for i, batch in enumerate(self.loader):
            tasks = batch[-1].tasks
            self.trainer.lsc_tasks, self.trainer.lsc_indices = tasks, order[start : start + len(tasks)]
            self.trainer.lsc_where = f"{self.name} pass {self.passes}, micro-batch {i}"
            start += len(tasks)
            yield batch


def _check_task_sizes(dataset, which: str, min_pairs: int) -> None:
    small = {t: n for t, n in Counter(dataset.lsc_tasks).items() if n < min_pairs}
    if small:
        raise ValueError(
            f"{which} set: tasks {small} have fewer than --am.min_task_pairs {min_pairs} pairs, too few for "
            "per-task statistics; merge them into other tasks or lower --am.min_task_pairs"
        )


def _dataset_init(original):
    def __init__(self, *args, **kwargs):
        call = bind(original, self, *args, **kwargs).arguments
        am = getattr(call["strategy"].args, "am", None)
        tasks = read_tasks(call["dataset"], am.task_key) if am is not None and not call["is_dpo"] else None
        original(self, *args, **kwargs)
        if tasks is not None:
            if len(tasks) != len(self):  # stock drops rows whose prompt is None
                raise ValueError(
                    f"{len(tasks) - len(self)} rows have no prompt (--data.prompt_key is null); remove them so "
                    "each pair keeps its task"
                )
            self.lsc_tasks = tasks

    return __init__


def _dataset_getitem(original):
    def __getitem__(self, idx):
        item = original(self, idx)
        if getattr(self, "lsc_tasks", None) is None:
            return item
        return (*item[:-1], (item[-1], self.lsc_tasks[idx]))

    return __getitem__


def _dataset_collate(original):
    def collate_fn(self, item_list):
        if getattr(self, "lsc_tasks", None) is None:
            return original(self, item_list)
        *batch, margins = original(self, [(*item[:-1], item[-1][0]) for item in item_list])
        return (*batch, TaskList(margins, [item[-1][1] for item in item_list]))

    return collate_fn


def _trainer_init(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        call = bind(original, self, *args, **kwargs).arguments
        strategy, loss = call["strategy"], call["loss"]
        train_dataloader, eval_dataloader = call["train_dataloader"], call["eval_dataloader"]
        am = getattr(strategy.args, "am", None)
        if am is None:
            if loss == "am":  # stock would quietly train LogExp
                raise ValueError(
                    "--model.loss_type am needs the plugin CLI: deepspeed --module openrlhf_lsc.cli.train_rm"
                )
            return
        self.lsc_tasks, self.lsc_where, self.lsc_eval, self.lsc_history = None, None, [], None
        self.train_dataloader = _TaskFeed(train_dataloader, self, "training epoch")
        if eval_dataloader is not None:
            self.eval_dataloader = _TaskFeed(eval_dataloader, self, "evaluation")
            if am.task_key:
                _check_task_sizes(eval_dataloader.dataset, "evaluation", am.min_task_pairs)
        if loss == "am":
            if am.task_coef:
                _check_task_sizes(train_dataloader.dataset, "training", am.min_task_pairs)
            self.lsc_am = AdvantageModelLoss(
                am.margin, am.expected_coef, am.bound_coef, am.task_coef, am.task_std, am.task_momentum,
                task_names=sorted(set(train_dataloader.dataset.lsc_tasks)), all_reduce=_dp_sum(strategy),
            )
            # train_rm loads its checkpoint (strategy.load_ckpt) before it builds this trainer
            states = getattr(strategy, "lsc_loaded_client_states", None)
            if states:
                if STATE_KEY in states:
                    self.lsc_am.load_state_dict(states[STATE_KEY])
                else:
                    strategy.print("[openrlhf_lsc] the checkpoint has no AM task statistics; they restart")
            strategy.print(f"Advantage Model loss (openrlhf_lsc): {vars(am)}")
            base = self.lsc_am
        else:
            self.lsc_am = None
            base = self.loss_fn
        self.loss_fn = _checked_loss(self, base, loss)

    return __init__


def _checked_loss(trainer, base, name):
    """The trainer's loss_fn: AM gets the batch's tasks; every loss must be finite; eval scores are kept."""

    def loss_fn(chosen_reward, reject_reward, margin=None):
        training = torch.is_grad_enabled()  # stock evaluate() runs under no_grad (the DS engine keeps .training)
        try:
            if trainer.lsc_am is not None:
                trainer.lsc_am.train(training)
                loss = base(chosen_reward, reject_reward, trainer.lsc_tasks, margin)
            else:
                loss = base(chosen_reward, reject_reward, margin)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()}")
        except FloatingPointError as e:
            raise FloatingPointError(
                f"{name} reward-model loss failed at {trainer.lsc_where}: {e}"
                + (f"; AM terms {trainer.lsc_am.terms}" if trainer.lsc_am is not None else "")
                + ". Lower --adam.lr, or check the data of this batch"
            ) from None
        if not training:  # stock evaluate() calls loss_fn on every eval batch: collect its scores here
            trainer.lsc_eval.append((chosen_reward.detach().float().cpu(), reject_reward.detach().float().cpu(),
                                     trainer.lsc_tasks, trainer.lsc_indices))
        return loss

    return loss_fn


def _dp_sum(strategy):
    """A sum over the data-parallel ranks for the AM running statistics, or None with one rank."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    group = strategy.ds_device_mesh["dp"].get_group()

    def all_reduce(tensor):
        dist.all_reduce(tensor, group=group)
        return tensor

    return all_reduce


def _save_logs(original):
    def save_logs_and_checkpoints(self, *args, **kwargs):
        if getattr(self, "lsc_am", None) is None:
            return original(self, *args, **kwargs)
        call = bind(original, self, *args, **kwargs)
        if call.arguments["logs_dict"] is not None:
            call.arguments["logs_dict"].update({f"am_{k}": v for k, v in self.lsc_am.terms.items()})
        call.arguments["client_states"] = {**(call.arguments["client_states"] or {}), STATE_KEY: self.lsc_am.state_dict()}
        return original(*call.args, **call.kwargs)

    return save_logs_and_checkpoints


def _gather_eval(trainer):
    """Every rank's evaluation scores, each evaluation pair once, in dataset order."""
    rows = [row for c, r, tasks, idx in trainer.lsc_eval
            for row in zip(idx, c.flatten().tolist(), r.flatten().tolist(), tasks)]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part]
    unique = {}
    for row in rows:  # the sampler repeats pairs to fill the last batch of every rank
        unique.setdefault(row[0], row)
    rows = [unique[i] for i in sorted(unique)]
    return torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows]), [r[3] for r in rows]


def _evaluate(original):
    def evaluate(self, *args, **kwargs):
        if not hasattr(self, "lsc_eval"):
            return original(self, *args, **kwargs)
        steps = bind(original, self, *args, **kwargs).arguments["steps"]
        self.lsc_eval = []
        original(self, *args, **kwargs)
        metrics = {"global_step": steps, **pairwise_metrics(*_gather_eval(self))}
        self.lsc_eval = []
        self.strategy._unwrap_model(self.model).config.update({CONFIG_KEY: metrics["per_task"]})
        if self.strategy.is_rank_0():
            _publish(self, metrics, steps)

    return evaluate


def _publish(trainer, metrics, steps):
    """Print, log to wandb/tensorboard and write the metrics JSON beside the model (rank 0)."""
    args = trainer.strategy.args
    flat = {"rm_accuracy": metrics["accuracy"], "rm_ece": metrics["ece"],
            "rm_task_mean_spread": metrics["task_mean_spread"]}
    for task, stats in metrics["per_task"].items():
        flat[f"rm_task_mean/{task}"], flat[f"rm_task_std/{task}"] = stats["mean"], stats["std"]
    trainer.strategy.print(f"[openrlhf_lsc] RM eval at step {steps}: {json.dumps(metrics)}")
    if trainer._wandb is not None:
        trainer._wandb.log({f"eval/{k}": v for k, v in {**flat, "global_step": steps}.items()})
    elif trainer._tensorboard is not None:
        for k, v in flat.items():
            trainer._tensorboard.add_scalar(f"eval/{k}", v, steps)

    path = os.path.join(args.ckpt.output_dir, METRICS_FILE)
    if trainer.lsc_history is None:
        trainer.lsc_history = []
        # a resumed run keeps the evaluations its interrupted predecessor finished
        if args.ckpt.load_enable and os.path.exists(path):
            with open(path) as f:
                trainer.lsc_history = [e for e in json.load(f)["evals"] if e["global_step"] < steps]
    trainer.lsc_history.append(metrics)
    record = {"loss_type": args.model.loss_type, "am": vars(args.am), "evals": trainer.lsc_history}
    os.makedirs(args.ckpt.output_dir, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2))


def apply() -> None:
    """Patch OpenRLHF's reward-model dataset and trainer in this process (idempotent, signature-checked)."""
    from openrlhf.datasets import RewardDataset
    from openrlhf.trainer.rm_trainer import RewardModelTrainer
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    wrap(RewardDataset, "__init__", ["self", "dataset", "tokenizer", "max_length", "strategy", "input_template",
                                     "is_dpo", "num_processors"], _dataset_init)
    wrap(RewardDataset, "__getitem__", ["self", "idx"], _dataset_getitem)
    wrap(RewardDataset, "collate_fn", ["self", "item_list"], _dataset_collate)
    wrap(RewardModelTrainer, "__init__", ["self", "model", "strategy", "optim", "train_dataloader", "eval_dataloader",
                                          "scheduler", "tokenizer", "max_norm", "max_epochs", "loss",
                                          "disable_ds_ckpt", "save_hf_ckpt"], _trainer_init)
    wrap(RewardModelTrainer, "save_logs_and_checkpoints", ["self", "args", "global_step", "step_bar", "logs_dict",
                                                           "client_states"], _save_logs)
    wrap(RewardModelTrainer, "evaluate", ["self", "eval_dataloader", "steps"], _evaluate)
    wrap(DeepspeedStrategy, "load_ckpt", LOAD_CKPT, remember_loaded_states)
