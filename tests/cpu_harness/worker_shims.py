"""Per-process CPU shims for end-to-end `train_ppo_ray` runs (tests only, never the package).

Importing this module installs them (idempotent); it is loaded in the driver and, through the harness's own
Ray setup hook `setup_worker` (which then calls the plugin's), in every Ray worker before the plugin registers
and before OpenRLHF's trainer modules import (so the names they import from `distributed_util` are the shims,
and the plugin's wrappers sit on top of `_record_returns`).

With `CPU_HARNESS_RETURNS` set to a path, the experience maker also appends one JSON line per sample
with the return the stock code computed: the evidence of what the trainer optimised.
"""

import functools
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

import cpu_shims

TIMEOUT = timedelta(minutes=5)
RETURNS_ENV = "CPU_HARNESS_RETURNS"
_installed = False


class GlooGroup:
    """The part of vLLM's PyNcclCommunicator OpenRLHF uses for weight sync, on gloo over its own TCPStore."""

    def __init__(self, host: str, port: int, rank: int, world_size: int):
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=TIMEOUT)
        self.pg = dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        self.pg.broadcast(tensor, src).wait()


def _stateless_gloo_group(master_address, master_port, rank, world_size, device):
    return GlooGroup(master_address, master_port, rank, world_size)


def _replay_buffer_on_cpu(init):
    def __init__(self, *args, **kwargs):
        # replay_buffer.py:40 builds torch.device(f"cuda:{current_device()}"), which the cpu shim's
        # "cpu" turns into an invalid name; the device is only used by sample(), so put it on CPU.
        current_device = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0
        try:
            init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current_device
        self.target_device = torch.device("cpu")

    return __init__


def _record_returns(compute):
    @functools.wraps(compute)
    def compute_advantages_and_returns(self, experiences):
        experiences = compute(self, experiences)
        self.harness_step = getattr(self, "harness_step", 0) + 1
        with open(os.environ[RETURNS_ENV], "a") as f:
            for e in experiences:
                for seq, mask, ret in zip(e.sequences, e.attention_mask, e.info["return"]):
                    row = {"step": self.harness_step, "sequence": seq[mask.bool()].tolist(), "return": ret.item()}
                    f.write(json.dumps(row) + "\n")
        return experiences

    return compute_advantages_and_returns


def install() -> None:
    """Install every shim in this process (no-op when CUDA is present or already installed)."""
    global _installed
    if torch.cuda.is_available() or _installed:
        return
    _installed = True
    cpu_shims.install()
    cpu_shims.skip_deepspeed_op_builds()

    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer
    from openrlhf.utils import distributed_util

    distributed_util.stateless_init_process_group = _stateless_gloo_group
    NaiveReplayBuffer.__init__ = _replay_buffer_on_cpu(NaiveReplayBuffer.__init__)
    if os.environ.get(RETURNS_ENV):
        maker = RemoteExperienceMaker
        maker.compute_advantages_and_returns = _record_returns(maker.compute_advantages_and_returns)


def setup_worker() -> None:
    """The harness's Ray `worker_process_setup_hook`: CPU shims first, then the plugin's own hook."""
    install()
    from openrlhf_lsc.integration import setup_worker as plugin_setup_worker

    plugin_setup_worker()


install()
