"""The per-rank side of tests/test_am_ranks.py (a module of its own so that spawned processes can import it)."""

import socket
from types import SimpleNamespace as NS

import numpy as np
import torch

from openrlhf_lsc.am_loss import pairwise_metrics

TASKS = ["a", "b", "c"]
MOMENTUM = 0.3
# per step, per rank: (task, chosen, rejected) pairs; rank 0 never sees "c", rank 1 never sees "a"
STEPS = [
    [[("a", 1.0, 0.0), ("a", 0.5, -1.0), ("b", 2.0, 1.5)], [("b", 0.2, 0.1), ("c", -1.0, -2.0), ("c", 3.0, 1.0)]],
    [[("b", 0.7, -0.7), ("a", 2.5, 0.5), ("a", -0.5, -1.5)], [("c", 0.0, 1.0), ("b", 1.2, 0.3), ("b", -2.0, -2.5)]],
]
N_EVAL = 7  # odd: with 2 ranks the sampler pads rank 1's last batch with a repeat of pair 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_scores(i):
    """Deterministic scores of evaluation pair i (stands in for the model)."""
    return float(np.sin(i) * 2), float(np.cos(3 * i)), TASKS[i % 3]


def worker(rank, world, port, folder, out):
    """Rank `rank` of `world` (gloo): AM trainers through the plugin's patched RewardModelTrainer; results in `out`."""
    import cpu_shims  # tests/ is on the spawned process's path through PYTHONPATH (conftest)

    cpu_shims.install()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from openrlhf.trainer.rm_trainer import RewardModelTrainer
        from openrlhf.utils.distributed_sampler import DistributedSampler
        from torch.utils.data import DataLoader

        from openrlhf_lsc.integration import reward_model

        reward_model.apply()
        group = torch.distributed.group.WORLD

        class EvalSet(torch.utils.data.Dataset):
            lsc_tasks = [eval_scores(i)[2] for i in range(N_EVAL)]

            def __len__(self):
                return N_EVAL

            def __getitem__(self, i):
                return i

        def collate(items):
            return torch.tensor(items), reward_model.TaskList([0] * len(items), [eval_scores(i)[2] for i in items])

        sampler = DistributedSampler(EvalSet(), num_replicas=world, rank=rank, shuffle=False, drop_last=False)

        def trainer(loaded_states=None):
            am = NS(task_key="task", min_task_pairs=1, margin=2.5, expected_coef=1.0, bound_coef=1.0, task_coef=1.0,
                    task_std=1.0, task_momentum=MOMENTUM)
            args = NS(am=am, logger=NS(wandb=NS(key=None), tensorboard_dir=None), ds=NS(packing_samples=False),
                      model=NS(aux_loss_coef=0, margin_loss_enable=False, compute_fp32_loss_enable=False))
            strategy = NS(args=args, ds_device_mesh={"dp": NS(get_group=lambda: group)}, print=lambda *a: None,
                          is_rank_0=lambda: rank == 0, lsc_loaded_client_states=loaded_states)
            return RewardModelTrainer(
                model=None, strategy=strategy, optim=None, train_dataloader=NS(dataset=NS(lsc_tasks=TASKS), sampler=[]),
                eval_dataloader=DataLoader(EvalSet(), batch_size=2, sampler=sampler, collate_fn=collate),
                scheduler=None, tokenizer=None, loss="am",
            )

        def train(t):
            for step in STEPS:
                pairs = step[rank]
                t.lsc_tasks = [task for task, _, _ in pairs]
                chosen = torch.tensor([c for _, c, _ in pairs], requires_grad=True)
                rejected = torch.tensor([r for _, _, r in pairs], requires_grad=True)
                t.loss_fn(chosen, rejected, None).backward()

        ours = trainer()
        train(ours)
        ours.lsc_eval = []
        with torch.no_grad():  # what stock evaluate() does with each evaluation batch
            for ids, _ in ours.eval_dataloader:
                scores = [eval_scores(i) for i in ids.tolist()]
                ours.loss_fn(torch.tensor([s[0] for s in scores]), torch.tensor([s[1] for s in scores]), None)
        chosen, rejected, tasks = reward_model._gather_eval(ours)

        saved = {}  # the client states stock save_logs_and_checkpoints hands to strategy.save_ckpt
        ours.strategy.save_ckpt = lambda model, path, tag, max_num, max_mem, client_states: saved.update(client_states)
        ours.num_update_steps_per_epoch = 1000
        ckpt_args = NS(logger=NS(logging_steps=1000), eval=NS(steps=1000), ckpt=NS(save_steps=1, path="-", max_num=1, max_mem=1))
        ours.save_logs_and_checkpoints(ckpt_args, 1, None, {}, {"consumed_samples": 8})

        alone = trainer()
        alone.lsc_am.all_reduce = None  # what the plugin did before: every rank on its own
        train(alone)

        if rank == 0:  # DeepSpeed writes the client states once and every rank reads them back
            torch.save(saved, f"{folder}/client_states.pt")
        torch.distributed.barrier()
        resumed = trainer(torch.load(f"{folder}/client_states.pt", weights_only=False))
        out[rank] = {"running": ours.lsc_am.running, "alone": alone.lsc_am.running, "saved": saved,
                     "restored": resumed.lsc_am.running, "eval": pairwise_metrics(chosen, rejected, tasks),
                     "seen": len(sampler)}
    finally:
        torch.distributed.destroy_process_group()
