"""The over-optimisation monitor inside OpenRLHF PPO (`--lsc.monitor.*`, `openrlhf_lsc.monitor.Monitor`).

- The evaluators (`--lsc.monitor.reward_models`) are scored by the reward actors after the K proxies; `reward_hook`
  (`reward_path`) hands both to `observe` in the PPO trainer process, once per step.
- `observe` logs the `monitor/*` metrics as constant per-sample `experience.info` entries (OpenRLHF's step status:
  console, wandb, tensorboard), rewrites `<ckpt.output_dir>/lsc_monitor.json` each step and warns the step the stop
  rule fires.
- With `--lsc.monitor.stop`, the `train_step` wrapper then makes fit's `save_logs_and_checkpoints` save that step
  (as at a `--ckpt.save_steps` step) and the `generate_samples` wrapper reports the prompts exhausted, so stock's
  `fit` ends and saves the final model.
- The step number is OpenRLHF's global step (`train_step` wrapped), so it continues after a resume; `--lsc.dump_rewards`
  rows carry it too.
"""

import json
import os
from types import SimpleNamespace

from openrlhf_lsc.files import write_atomic
from openrlhf_lsc.integration import wrap
from openrlhf_lsc.monitor import Monitor

MONITOR_FILE = "lsc_monitor.json"
_step = 0  # OpenRLHF's global step of the rollout being processed (set by the train_step wrapper)
_monitor = None  # SimpleNamespace(cfg, monitor, tokenizer) of this process's run (the process running reward_hook)


def apply() -> None:
    from openrlhf.trainer import ppo_trainer, ppo_trainer_async
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    for trainer in (ppo_trainer.PPOTrainer, ppo_trainer_async.TrainingActor):  # sync, async
        # @ray.remote copies each method into the class Ray instantiates (and ships to workers): patch that one.
        cls = trainer.__ray_metadata__.modified_class
        wrap(cls, "train_step", ["self", "rollout_samples", "global_step"], _wrap_train_step)
    wrap(SamplesGenerator, "generate_samples", ["self", "generate_kwargs"], _wrap_generate)


def step() -> int:
    """OpenRLHF's global step of the rollout being processed in this process."""
    return _step


def _wrap_train_step(original):
    def train_step(self, rollout_samples, global_step, **ray_kwargs):
        _set_step(global_step + 1)  # the step OpenRLHF logs for this rollout
        out = original(self, rollout_samples, global_step, **ray_kwargs)
        if _stopping():  # fit's save_logs_and_checkpoints, next, then saves this step through OpenRLHF's own path
            self.args.ckpt.save_steps = 1
        return out

    return train_step


def _wrap_generate(original):
    def generate_samples(self, **generate_kwargs):
        if _stopping():  # "prompts exhausted": PPOTrainer.fit ends its episodes, closes its loggers and returns
            return [], None, 0, True
        return original(self, **generate_kwargs)

    return generate_samples


def _stopping() -> bool:
    """--lsc.monitor.stop and the monitor fired in this process (the sync PPO trainer: sampler and reward_hook)."""
    return _monitor is not None and _monitor.cfg.stop and _monitor.monitor.fired_step is not None


def _set_step(value: int) -> None:
    # A module function, not `global` in the wrapper: Ray ships the trainer's actor class with this wrapper by value
    # (cloudpickle), and a by-value function writes its globals into a copy; this function is shipped by name.
    global _step
    _step = value


def observe(cfg, args, experiences, order, proxies, evaluators, metrics) -> None:
    """One `Monitor.update` per step; its metrics go to every sample's info (logged as batch means), its summary to
    `<ckpt.output_dir>/lsc_monitor.json`, and a warning to the log the step the stop rule fires."""
    global _monitor
    mon = cfg.monitor
    if _monitor is None or _monitor.cfg is not mon:
        from transformers import AutoTokenizer  # the policy's, for the responses' text (patterns, length)

        tokenizer = AutoTokenizer.from_pretrained(args.actor.model_name_or_path, trust_remote_code=True,
                                                  use_fast=not args.data.disable_fast_tokenizer)
        _monitor = SimpleNamespace(cfg=mon, tokenizer=tokenizer,
                                   monitor=Monitor(cfg.spec.names, mon.names, mon.patterns, mon.window, mon.patience))
    responses = [None] * len(proxies)
    for i, seq, act in zip(order.tolist(), (s for e in experiences for s in e.sequences),
                           (m for e in experiences for m in e.action_mask)):
        responses[i] = seq[1:][act.bool()]  # action_mask[t] marks token t + 1 (OpenRLHF's shifted mask)
    responses = _monitor.tokenizer.batch_decode(responses, skip_special_tokens=True)
    above = {n: metrics[f"lsc/{n}/above_ref"] for n in cfg.spec.names if f"lsc/{n}/above_ref" in metrics}
    values, fired = _monitor.monitor.update(_step, proxies, evaluators, above, responses)
    for e in experiences:
        e.info.update({key: [v] * len(e.index) for key, v in values.items()})
    summary = _monitor.monitor.summary()
    if fired:
        from openrlhf.utils.logging_utils import init_logger

        then = "saving a checkpoint and stopping (--lsc.monitor.stop)" if mon.stop else "training goes on"
        init_logger(__name__).warning(f"openrlhf_lsc monitor: {summary['message']}; {then}")
    os.makedirs(args.ckpt.output_dir, exist_ok=True)
    write_atomic(os.path.join(args.ckpt.output_dir, MONITOR_FILE),
                 json.dumps({**summary, "evaluators": dict(zip(mon.names, mon.reward_models)),
                             "history": _monitor.monitor.state_dict()}, indent=1))
