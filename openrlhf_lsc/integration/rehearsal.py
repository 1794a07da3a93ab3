"""Selective Rehearsal inside OpenRLHF PPO.

flag -> patched function -> tensor -> logged metric:
- `--lsc.rehearsal.dataset PATH` (+ `coef`, `input_key`, `output_key`, `micro_batch_size`, `max_len` on
  `args.lsc.rehearsal`) -> `ActorPPOTrainer.__init__` (in each PolicyModelActor) puts a `RehearsalStream`
  on the actor's strategy: D_R tokenized by OpenRLHF's `SFTDataset` (PPO's `--data.input_template` /
  `--data.apply_chat_template`), sharded over data-parallel ranks by `strategy.setup_dataloader`
  (OpenRLHF's `DistributedSampler`, reshuffled each pass with seed + pass number). Every actor reads the file
  itself: on a multi-node cluster it must exist at the same path on every node (shared storage).
- `actor_loss_hook(trainer, experience, loss_batch_info)` returns `coef * w * NLL(next D_R micro-batch)` for
  each PPO micro-batch, added to the PPO loss before its one backward: the actor gradient is
  grad L_PPO + coef * w * grad NLL. On a patched OpenRLHF (patches/0002) it is registered in
  `ACTOR_LOSS_HOOKS`; on stock OpenRLHF, `ActorPPOTrainer.training_step` arms `DeepspeedStrategy.backward`,
  which adds the hook's term to the loss it is given. w makes every optimizer step add
  coef * (mean NLL over the step's rehearsal micro-batches): DeepSpeed divides each micro-batch's loss by
  the gradient-accumulation steps (w = 1), except with `--train.dynamic_batch_enable`, where DeepSpeed
  accumulates unscaled (gas 1) over a varying number m of micro-batches per step (w = 1 / m).
  DP ranks are averaged by DeepSpeed either way.
- The hook puts `rehearsal_nll` (token-mean NLL of the micro-batch, before coef and w) and `rehearsal_coef`
  into `experience.info`; OpenRLHF averages them over micro-steps and ranks into `train/rehearsal_nll`,
  `train/rehearsal_coef`.
- `DeepspeedStrategy.save_ckpt` adds the stream position (pass, batches) to the actor checkpoint's client
  states under `lsc_rehearsal`; `DeepspeedStrategy.load_ckpt` keeps the loaded client states so that
  `--ckpt.load_enable` resumes D_R where it stopped. (No hook list covers these: they are wrapped always.)

Only plain OpenRLHF classes are patched: methods of the `@ray.remote` PolicyModelActor are copied into
Ray's generated actor class when ppo_actor is imported, so patching that class later has no effect.
The NLL is the policy's own likelihood (temperature 1), not the rollout-temperature-scaled one of the
PPO loss. It is a second forward of the DeepSpeed engine in the same step (tested under ZeRO-2 and ZeRO-3).
Ring attention (`--ds.ring_attn_size > 1`) is not supported.
"""

import math
from types import SimpleNamespace
from typing import Any, Dict, Optional

import torch

from openrlhf_lsc.integration import bind, wrap
from openrlhf_lsc.rehearsal import token_nll

STATE_KEY = "lsc_rehearsal"
TRAINER_INIT = ["self", "strategy", "actor", "ema_model", "actor_optim", "actor_scheduler", "ema_beta",
                "micro_train_batch_size", "buffer_limit", "buffer_cpu_offload", "eps_clip", "tokenizer",
                "dataloader_pin_memory", "vllm_engines", "kwargs"]
SAVE_CKPT = ["self", "model", "save_dir", "tag", "max_num", "max_mem", "client_state", "save_latest", "metric_value",
             "metric_key"]
LOAD_CKPT = ["self", "model", "load_dir", "tag", "load_module_strict", "load_optimizer_states",
             "load_lr_scheduler_states", "load_module_only"]


def actor_loss_hooks() -> Optional[list]:
    """`openrlhf.utils.plugins.ACTOR_LOSS_HOOKS` of a patched OpenRLHF (patches/0002), or None on stock."""
    try:
        from openrlhf.utils import plugins
    except ImportError:
        return None
    return getattr(plugins, "ACTOR_LOSS_HOOKS", None)


def apply() -> None:
    """Install the rehearsal hooks (each does nothing unless `args.lsc.rehearsal.dataset` is set)."""
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    wrap(ActorPPOTrainer, "__init__", TRAINER_INIT, _wrap_trainer_init)
    if actor_loss_hooks() is None:  # stock OpenRLHF: call the hook from inside training_step's backward
        wrap(ActorPPOTrainer, "training_step", ["self", "experience", "kl_ctl", "step", "loss_batch_info"], _wrap_step)
        wrap(DeepspeedStrategy, "backward", ["self", "loss", "model", "_optimizer", "kwargs"], _wrap_backward)
    wrap(DeepspeedStrategy, "save_ckpt", SAVE_CKPT, _wrap_save_ckpt)
    wrap(DeepspeedStrategy, "load_ckpt", LOAD_CKPT, remember_loaded_states)


def rehearsal_config(args: Any) -> Optional[SimpleNamespace]:
    """`args.lsc.rehearsal` when a rehearsal dataset is set, else None (rehearsal off)."""
    cfg = getattr(getattr(args, "lsc", None), "rehearsal", None)
    return cfg if cfg is not None and cfg.dataset else None


def check_config(cfg: SimpleNamespace) -> None:
    """Raise ValueError naming the flag when a `--lsc.rehearsal.*` value is out of range (the plugin CLI calls it at
    parse time; the actors again, for launches of a patched OpenRLHF that skip the plugin CLI)."""
    if not (math.isfinite(cfg.coef) and cfg.coef >= 0):
        raise ValueError(f"--lsc.rehearsal.coef must be a finite number >= 0, got {cfg.coef}")
    if cfg.micro_batch_size < 1:
        raise ValueError(f"--lsc.rehearsal.micro_batch_size must be >= 1, got {cfg.micro_batch_size}")
    if cfg.max_len is not None and cfg.max_len < 3:
        raise ValueError(f"--lsc.rehearsal.max_len must be >= 3 tokens, got {cfg.max_len}")
    for key in ("input_key", "output_key"):
        if not getattr(cfg, key).strip():
            raise ValueError(f"--lsc.rehearsal.{key} must name a dataset field, got an empty string")


class RehearsalStream:
    """D_R on one actor rank: an endless, DP-sharded stream of SFT micro-batches and the NLL on them."""

    def __init__(self, loader: Any, coef: float, state: Optional[Dict] = None):
        """
        Args:
            loader: a DataLoader of `(input_ids, attention_mask, loss_mask)` micro-batches (OpenRLHF's SFT
                collate) whose sampler is OpenRLHF's `DistributedSampler`; `from_config` builds it.
            coef: gamma, `--lsc.rehearsal.coef`.
            state: a `state_dict()` from a checkpoint to resume from, or None.
        """
        self.loader, self.coef = loader, float(coef)
        self.micro_batch_size = loader.batch_size
        self.epoch, self.batches = 0, 0  # pass over D_R, micro-batches drawn in this pass
        self._it = None
        self._plan, self._position = None, 0  # dynamic batching: the replay buffer's step plan, position in it
        if state:
            self.load_state_dict(state)

    @classmethod
    def from_config(cls, strategy: Any, tokenizer: Any, cfg: SimpleNamespace, state: Optional[Dict] = None):
        """The stream of `args.lsc.rehearsal`: D_R read and tokenized like OpenRLHF's SFT data, sharded over DP ranks.

        Args:
            strategy: the actor's `DeepspeedStrategy` (distributed already set up).
            tokenizer: the actor's tokenizer.
            cfg: `args.lsc.rehearsal` (dataset, coef, input_key, output_key, micro_batch_size, max_len).
            state: a `state_dict()` from a checkpoint to resume from, or None.
        """
        from openrlhf.datasets import SFTDataset
        from openrlhf.datasets.utils import blending_datasets

        check_config(cfg)
        args = strategy.args
        if getattr(args.ds, "ring_attn_size", 1) > 1:
            raise NotImplementedError("--lsc.rehearsal.dataset does not support --ds.ring_attn_size > 1")
        rows = blending_datasets(cfg.dataset, None, strategy, args.train.seed, dataset_split="train")
        for key, flag in ((cfg.input_key, "input_key"), (cfg.output_key, "output_key")):
            if key not in rows.column_names:
                raise ValueError(
                    f"--lsc.rehearsal.dataset {cfg.dataset} has no field {key!r} (--lsc.rehearsal.{flag}); "
                    f"fields: {rows.column_names}"
                )
        # SFTDataset reads its keys and chat-template switch from strategy.args.data.
        data_args = SimpleNamespace(
            input_key=cfg.input_key,
            output_key=cfg.output_key,
            apply_chat_template=args.data.apply_chat_template,
            tokenizer_chat_template=getattr(args.data, "tokenizer_chat_template", None),
        )
        max_len = cfg.max_len or args.data.max_len
        # D_R is small (top-k per cluster): one tokenizing process is enough.
        dataset = SFTDataset(
            rows, tokenizer, max_len, SimpleNamespace(args=SimpleNamespace(data=data_args)),
            input_template=args.data.input_template, num_processors=1,
        )
        dropped = len(rows) - len(dataset)
        if dropped:
            strategy.print(
                f"[openrlhf_lsc] rehearsal: {dropped} of {len(rows)} pairs in {cfg.dataset} skipped "
                f"(empty prompt/response, or prompt of >= {max_len - 2} tokens)"
            )
        loader = strategy.setup_dataloader(dataset, cfg.micro_batch_size, False, True, dataset.collate_fn, drop_last=True)
        if len(loader) == 0:
            raise ValueError(
                f"--lsc.rehearsal.dataset {cfg.dataset} has {len(dataset)} usable pairs, fewer than "
                f"--lsc.rehearsal.micro_batch_size {cfg.micro_batch_size} x data-parallel ranks "
                f"{loader.sampler.num_replicas}"
            )
        return cls(loader, cfg.coef, state)

    def state_dict(self) -> Dict[str, int]:
        """Position in the stream: {"epoch": pass number, "batches": micro-batches drawn in that pass}."""
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue after the last micro-batch drawn when `state` was taken."""
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._it = None

    def next_batch(self):
        """The next `(input_ids, attention_mask, loss_mask)` micro-batch of this rank; passes repeat forever."""
        while True:
            if self._it is None:
                sampler = self.loader.sampler
                # OpenRLHF's DistributedSampler skips the samples all ranks consumed earlier in this pass.
                consumed = self.batches * self.micro_batch_size * sampler.num_replicas
                sampler.set_epoch(self.epoch, consumed_samples=consumed)
                self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is not None:
                self.batches += 1
                return batch
            self.epoch, self.batches, self._it = self.epoch + 1, 0, None  # next pass, reshuffled

    def nll(self, model: Any) -> torch.Tensor:
        """Token-mean NLL of the next micro-batch under `model` (an OpenRLHF `Actor`), with autograd."""
        engine = model.model  # the DeepSpeed engine (or HF model) inside the Actor
        device = next(engine.parameters()).device
        input_ids, attention_mask, loss_mask = (t.to(device) for t in self.next_batch())
        position_ids = attention_mask.long().cumsum(-1) - 1  # as Actor.forward
        position_ids.masked_fill_(attention_mask == 0, 1)
        logits = engine(input_ids, attention_mask=attention_mask, position_ids=position_ids)["logits"]
        return token_nll(logits, input_ids, loss_mask)

    def step_weight(self, trainer: Any) -> float:
        """w of the module docstring for the PPO micro-batch `trainer` is on (1 unless dynamic batching).

        With `--train.dynamic_batch_enable`, OpenRLHF's replay buffer plans each PPO epoch as a list
        `dynamic_optimizer_step` with one entry per micro-batch, 1 on the last micro-batch of each optimizer
        step, and `ppo_train` calls `training_step` once per entry, in order, every epoch (a new plan is a new
        list). The position in that plan tells which step this micro-batch is in and how many it has.
        """
        if not trainer.args.train.dynamic_batch_enable:
            return 1.0
        plan = trainer.replay_buffer.dynamic_optimizer_step
        if plan is not self._plan or self._position >= len(plan):  # new plan (ppo_train), or its next epoch
            self._plan, self._position = plan, 0
        i = self._position
        self._position += 1
        first = i
        while first > 0 and not plan[first - 1]:
            first -= 1
        last = i
        while not plan[last]:
            last += 1
        return 1.0 / (last - first + 1)


def actor_loss_hook(trainer: Any, experience: Any, loss_batch_info: Optional[Dict]) -> Optional[torch.Tensor]:
    """The rehearsal term for one PPO micro-batch: `coef * w * NLL(next D_R micro-batch)`, or None when off.

    The signature of patches/0002's `ACTOR_LOSS_HOOKS`; on stock OpenRLHF the `training_step`/`backward`
    wrappers call it. The term must join the PPO loss in the same backward.

    Args:
        trainer: the actor's `ActorPPOTrainer` (its strategy carries the stream when rehearsal is on).
        experience: the PPO micro-batch; the hook adds `rehearsal_nll` / `rehearsal_coef` to its `info`.
        loss_batch_info: OpenRLHF's loss normalisers for this micro-batch (unused: the rehearsal term is a
            mean over the step's rehearsal micro-batches, not over PPO tokens; None on stock's dynamic path).

    Returns:
        A scalar tensor with autograd to add to the actor loss, or None without a rehearsal stream.
    """
    rehearsal = getattr(trainer.strategy, "lsc_rehearsal", None)
    if rehearsal is None:
        return None
    nll = rehearsal.nll(trainer.actor)
    # 1-element tensors: OpenRLHF logs them as per-sample metrics (averaged over micro-steps and ranks)
    experience.info["rehearsal_nll"] = nll.detach().float().reshape(1)
    experience.info["rehearsal_coef"] = torch.tensor([rehearsal.coef])
    return rehearsal.coef * rehearsal.step_weight(trainer) * nll


def attach(trainer: Any, tokenizer: Any, checkpoint_states: Optional[Dict] = None) -> Optional[RehearsalStream]:
    """Put a rehearsal stream on the trainer's strategy when `args.lsc.rehearsal.dataset` is set.

    On a patched OpenRLHF this also registers `actor_loss_hook` in `ACTOR_LOSS_HOOKS` (only then, so a run
    without rehearsal never calls it).

    Args:
        trainer: the actor's `ActorPPOTrainer`.
        tokenizer: the actor's tokenizer.
        checkpoint_states: client states of the loaded checkpoint (resume), or None.

    Returns:
        The stream (also `trainer.strategy.lsc_rehearsal`), or None when rehearsal is off.
    """
    cfg = rehearsal_config(trainer.strategy.args)
    if cfg is None:
        return None
    state = (checkpoint_states or {}).get(STATE_KEY)
    if checkpoint_states and state is None:
        trainer.strategy.print("[openrlhf_lsc] rehearsal: the checkpoint has no rehearsal position; starting D_R from the top")
    trainer.strategy.lsc_rehearsal = RehearsalStream.from_config(trainer.strategy, tokenizer, cfg, state)
    hooks = actor_loss_hooks()
    if hooks is not None and actor_loss_hook not in hooks:
        hooks.append(actor_loss_hook)
    return trainer.strategy.lsc_rehearsal


def _wrap_trainer_init(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # PolicyModelActor loads its checkpoint (strategy.load_ckpt) before it builds this trainer.
        attach(self, self.tokenizer, getattr(self.strategy, "lsc_loaded_client_states", None))

    return __init__


def remember_loaded_states(original):
    """`DeepspeedStrategy.load_ckpt` wrapper keeping the loaded client states on the strategy
    (`lsc_loaded_client_states`) for the rehearsal stream and the AM loss, which are built after it."""

    def load_ckpt(self, *args, **kwargs):
        load_path, states = original(self, *args, **kwargs)
        self.lsc_loaded_client_states = states
        return load_path, states

    return load_ckpt


def _wrap_save_ckpt(original):
    def save_ckpt(self, *args, **kwargs):
        rehearsal = getattr(self, "lsc_rehearsal", None)
        if rehearsal is None:
            return original(self, *args, **kwargs)
        # Only the actor's strategy has a stream, and the actor saves nothing else with save_ckpt.
        bound = bind(original, self, *args, **kwargs)
        bound.arguments["client_state"] = {**(bound.arguments.get("client_state") or {}), STATE_KEY: rehearsal.state_dict()}
        return original(*bound.args, **bound.kwargs)

    return save_ckpt


def _wrap_step(original):
    def training_step(self, *args, **kwargs):
        if getattr(self.strategy, "lsc_rehearsal", None) is None:
            return original(self, *args, **kwargs)
        call = bind(original, self, *args, **kwargs).arguments
        # consumed by the one strategy.backward of this step
        self.strategy.lsc_pending_term = lambda: actor_loss_hook(self, call["experience"], call["loss_batch_info"])
        try:
            status = original(self, *args, **kwargs)
        finally:
            missed = self.strategy.__dict__.pop("lsc_pending_term", None)
        if missed is not None:
            raise RuntimeError("openrlhf_lsc rehearsal: ActorPPOTrainer.training_step did not call strategy.backward")
        return status

    return training_step


def _wrap_backward(original):
    def backward(self, loss, model, _optimizer, **kwargs):
        pending = self.__dict__.pop("lsc_pending_term", None)
        term = pending() if pending is not None else None
        return original(self, loss if term is None else loss + term, model, _optimizer, **kwargs)

    return backward
