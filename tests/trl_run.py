"""Tiny TRL runs on CPU for tests/test_trl.py (tests only): models from tests/cpu_harness/tiny_models.py,
TRL's real GRPOTrainer / RLOOTrainer, a callback that records each step's batch as TRL logged it.

Also a script for the multi-process test: `torchrun --nproc_per_node 2 tests/trl_run.py MODELS OUT.json` runs
2 GRPO steps with group references and writes, from process 0, the batches TRL gathered.
"""

import importlib
import json
import sys
from pathlib import Path


def _import_trl_without_stubs() -> None:
    """Import TRL's trainers with tests/stubs hidden: TRL would take the stub vLLM (there for OpenRLHF) for a real
    one and import vLLM modules the stub lacks. TRL decides at import time, so the stubs come back afterwards."""
    stubs = str(Path(__file__).resolve().parent / "stubs")
    path = sys.path[:]
    modules = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "vllm" or k.startswith("vllm.")}
    sys.path[:] = [p for p in path if p != stubs]
    try:
        for name in ("trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer"):
            importlib.import_module(name)
    finally:
        sys.path[:] = path
        sys.modules.update(modules)


_import_trl_without_stubs()

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from openrlhf_lsc.frameworks.trl import lsc_reward_funcs  # noqa: E402

GROUP = 2  # num_generations
PER_DEVICE = 4  # completions per process per step


def vowels(prompts, completions, **kw):
    """A rule reward: the completion's vowel count / 4 (recomputable from the logged completion text)."""
    return [sum(c.count(v) for v in "aeiou") / 4.0 for c in completions]


def prompt_rows(models: Path, label_key: str = "lsc_ref") -> list:
    rows = [json.loads(line) for line in open(models / "prompts.jsonl")]
    return [{"prompt": r["input"], label_key: r["lsc_ref"]} for r in rows]


class Record(TrainerCallback):
    """Copies what TRL logged for the step's generation batch (prompts, completions, per-function rewards,
    advantages: all processes, gathered) at the end of each training step."""

    def __init__(self):
        self.steps, self.trainer = [], None

    def on_step_end(self, args, state, control, **kwargs):
        logs = self.trainer._logs
        self.steps.append({
            "prompt": list(logs["prompt"]),
            "completion": list(logs["completion"]),
            "rewards": {k: list(v) for k, v in logs["rewards"].items()},
            "advantages": list(logs["advantages"]),
        })


def train(models: Path, out: Path, reward_funcs, rows=None, trainer="grpo", steps=2, callbacks=(), per_device=PER_DEVICE,
          **config):
    """Run `steps` steps of TRL's trainer on the tiny policy; return (trainer, Record)."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    Config, Trainer = (GRPOConfig, GRPOTrainer) if trainer == "grpo" else (RLOOConfig, RLOOTrainer)
    settings = dict(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=per_device, num_generations=GROUP,
        max_completion_length=6, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
        bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0, use_cpu=True, dataloader_num_workers=0,
    )
    args = Config(**{**settings, **config})
    record = Record()
    t = Trainer(model=str(models / "policy"), reward_funcs=reward_funcs, args=args,
                train_dataset=Dataset.from_list(rows if rows is not None else prompt_rows(models)),
                processing_class=None, callbacks=[record, *callbacks])
    record.trainer = t
    t.train()
    return t, record


if __name__ == "__main__":
    models, out = Path(sys.argv[1]), Path(sys.argv[2])
    funcs = lsc_reward_funcs({"A": str(models / "rm_a"), "B": vowels}, reference="group", quantile=0.75)
    # 3 completions per process in groups of 2: process 0 holds [p0, p0, p1], process 1 [p1, p2, p2].
    t, record = train(models, out.parent / "trl_out", funcs, steps=2, per_device=3)
    if t.accelerator.is_main_process:
        out.write_text(json.dumps({"num_processes": t.accelerator.num_processes, "steps": record.steps,
                                   "log_history": t.state.log_history}))
