"""GPU suite steps that need a process of their own (DeepSpeed's distributed state, a fresh CUDA context).

    python -m gpu_steps STEP OUT.json      (tests/gpu, tests/stubs, tests on the path; tests/gpu/test_openrlhf_cuda.py)

Each step runs OpenRLHF's real code (DeepSpeed engines, Actor, ActorPPOTrainer.training_step, the reward
model) on `LSC_GPU_DEVICE` (cuda; cpu only to check this file on a machine without a GPU) with tiny Llama
models built from configs (tests/cpu_harness/tiny_models.py), and writes its measurements as JSON. No data set
library is needed: D_R and the preference pairs are tokenized here (reading them from JSONL is covered on CPU).
DeepSpeed's optimizer is torch AdamW (`torch_adam`), so no CUDA op is compiled on the machine.
"""

import gc
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace as NS

import torch

DEVICE = os.environ.get("LSC_GPU_DEVICE", "cuda")
CUDA = DEVICE == "cuda"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup() -> None:
    """One-rank distributed environment; DeepSpeed on the device with torch AdamW (no compiled ops)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                      LOCAL_RANK="0" if CUDA else "-1", DS_ACCELERATOR="cuda" if CUDA else "cpu")
    if not CUDA:
        import cpu_shims

        cpu_shims.install()
        cpu_shims.skip_deepspeed_op_builds()
        return
    import openrlhf.utils.deepspeed.deepspeed as ds

    stock = ds.get_train_ds_config

    def get_train_ds_config(*args, **kwargs):
        config = stock(*args, **kwargs)
        if config.get("optimizer", {}).get("type") == "AdamW":
            config["optimizer"]["params"]["torch_adam"] = True
        return config

    ds.get_train_ds_config = get_train_ds_config  # the strategy calls it through this module's globals


def _models() -> Path:
    from cpu_harness import tiny_models

    return tiny_models.build(Path(tempfile.mkdtemp(prefix="lsc_gpu_")))


def _args(stage: int, bf16: bool, **train):
    return NS(
        local_rank=0 if CUDA else -1,
        ds=NS(param_dtype="bf16", zero_stage=stage, adam_offload=False, zpg=1, use_universal_ckpt=False,
              grad_accum_dtype=None, overlap_comm=False, deepcompile=False, tensor_parallel_size=1, ring_attn_size=1,
              packing_samples=False, enable_sleep=False, attn_implementation="eager", experts_implementation=None,
              load_in_4bit=False, value_head_prefix="score"),
        train=NS(dynamic_batch_enable=False, max_epochs=1, colocate_all=False, async_enable=False, seed=7, **train),
        actor=NS(eps_clip_low_high=(0.2, 0.2), dual_clip=None, loss_agg_mode="token-mean", policy_loss_type="ppo",
                 aux_loss_coef=0, entropy_coef=None),
        algo=NS(advantage=NS(is_correction_level="off", is_correction_mode="mask", is_correction_gating="ratio",
                             is_correction_threshold=(0.5, 5.0)), kl=NS(use_loss=False)),
        reward=NS(normalize_enable=False, offload=False),
        vllm=NS(sync_backend="nccl"),
        data=NS(apply_chat_template=False, input_template=None, max_len=1024),
        bf16=bf16,
    )


def _strategy(stage: int, bf16: bool, train_batch_size: int = 2, micro: int = 2):
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    strategy = DeepspeedStrategy(seed=7, micro_train_batch_size=micro, train_batch_size=train_batch_size,
                                 zero_stage=stage, args=_args(stage, bf16))
    strategy.setup_distributed()
    stock = strategy.get_ds_train_config

    def ds_config(*a, **k):
        config = stock(*a, **k)
        config["bf16"]["enabled"] = bf16  # fp32 runs compare gradients at fp32 rounding
        if stage == 3:  # partition every tensor, however small (ZeRO-3 keeps small ones whole by default)
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return config

    strategy.get_ds_train_config = ds_config
    return strategy


def _actor(path, stage: int, bf16: bool, grads: dict, micro: int = 2, gradient_checkpointing: bool = False):
    """OpenRLHF Actor in a DeepSpeed engine + the (plugin-patched) ActorPPOTrainer, lr 0 (weights never move)."""
    import deepspeed
    import openrlhf.trainer.ray.ppo_actor as ppo_actor
    import openrlhf.utils.utils as ou
    from openrlhf.models import Actor

    strategy = _strategy(stage, bf16, train_batch_size=micro, micro=micro)
    dtype = ou.convert_to_torch_dtype
    if not bf16:
        ou.convert_to_torch_dtype = lambda _: torch.float32
    try:
        actor = Actor(str(path), attn_implementation="eager", param_dtype="bf16", ds_config=strategy.get_ds_train_config())
    finally:
        ou.convert_to_torch_dtype = dtype
    if gradient_checkpointing:
        actor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = dict(optim="adam", muon={}, adam=dict(lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),
                 lr_scheduler="constant", lr_warmup_ratio=0.0, min_lr_ratio=0.1, max_norm=1.0, scheduler_steps=10)
    model, optimizer, scheduler = strategy.prepare((actor, optim))
    assert model.model.zero_optimization_stage() == stage
    current_device = torch.cuda.current_device
    if not CUDA:  # NaiveReplayBuffer.__init__ names a CUDA device (unused by training_step)
        torch.cuda.current_device = lambda: 0
    try:
        trainer = ppo_actor.ActorPPOTrainer(strategy, model, None, optimizer, scheduler, micro_train_batch_size=micro,
                                            tokenizer=None, dataloader_pin_memory=False)
    finally:
        torch.cuda.current_device = current_device

    def optimizer_step(_optim, m, _sched, name="model", **kw):
        grads.clear()
        for n, p in m.model.module.named_parameters():
            grads[n] = deepspeed.utils.safe_get_full_grad(p).detach().float().cpu()
        m.model.step()

    strategy.optimizer_step = optimizer_step
    return NS(strategy=strategy, model=model, trainer=trainer, grads=grads)


def _pairs(tok, n: int, length: int = 0):
    """n (prompt, response) pairs tokenized as OpenRLHF's SFTDataset does: template(prompt) + response + EOS,
    loss_mask[t] = 1 where token t + 1 is a response token; padded to `length` (or the longest) on the right."""
    g = torch.Generator().manual_seed(11)
    rows = []
    for i in range(n):
        prompt = tok(f"question {i}: what is {i % 7} plus {i % 5}?", add_special_tokens=False)["input_ids"]
        response = tok(" the answer is good" * (1 + i % 3), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if length:  # long rows for the memory step: random tokens to the length
            extra = torch.randint(3, len(tok), (length - len(prompt) - len(response),), generator=g).tolist()
            response = extra + response
        rows.append((prompt, response))
    width = length or max(len(p) + len(r) for p, r in rows)
    items = []
    for prompt, response in rows:
        ids = prompt + response
        pad = width - len(ids)
        loss_mask = [0] * (len(prompt) - 1) + [1] * len(response) + [0] * (pad + 1)
        items.append((torch.tensor(ids + [tok.pad_token_id] * pad), torch.tensor([1] * len(ids) + [0] * pad),
                      torch.tensor(loss_mask)))
    return items


def _rehearsal_stream(tok, coef: float, n: int = 12, micro: int = 2, length: int = 0):
    from openrlhf.utils.distributed_sampler import DistributedSampler
    from torch.utils.data import DataLoader

    from openrlhf_lsc.integration.rehearsal import RehearsalStream

    items = _pairs(tok, n, length)
    sampler = DistributedSampler(items, num_replicas=1, rank=0, shuffle=True, seed=7, drop_last=True)
    loader = DataLoader(items, batch_size=micro, sampler=sampler,
                        collate_fn=lambda batch: tuple(torch.stack(t) for t in zip(*batch)))
    return RehearsalStream(loader, coef)


def _experience(vocab: int, batch: int = 2, length: int = 12, actions: int = 5):
    from openrlhf.trainer.ppo_utils.experience import Experience

    g = torch.Generator().manual_seed(1)
    action_mask = torch.ones(batch, actions, dtype=torch.bool)
    action_mask[-1, actions - 2:] = False
    return Experience(
        sequences=torch.randint(3, vocab, (batch, length), generator=g),
        attention_mask=torch.ones(batch, length, dtype=torch.long),
        action_mask=action_mask,
        action_log_probs=-3.7 - 0.2 * torch.rand(batch, actions, generator=g),
        advantages=torch.randn(batch, actions, generator=g),
        info={},
    ).to_device(torch.device(DEVICE))


def _nll_gradient(path, batches, coef):
    """coef * grad of the mean token NLL over `batches`: plain transformers, fp32, CPU."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    nlls = []
    for ids, mask, loss_mask in batches:
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logp = model(ids, attention_mask=mask, position_ids=position_ids).logits[:, :-1].log_softmax(-1)
        target = loss_mask[:, :-1].float()
        nlls.append(-(logp.gather(-1, ids[:, 1:, None])[..., 0] * target).sum() / target.sum())
    (coef * torch.stack(nlls).mean()).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _step_pair(env, stream, experience_fn, coef):
    """Gradients of one training step with rehearsal (coef) and without (stock), from the same D_R position."""
    grads, status = {}, {}
    for c in (coef, None):
        stream.load_state_dict({"epoch": 0, "batches": 0})
        env.strategy.lsc_rehearsal = None if c is None else stream
        status[c] = env.trainer.training_step(experience_fn(), 0.0, 0)
        grads[c] = dict(env.grads)
    return status[coef], grads[coef], grads[None]


def rehearsal_zero3():
    """One ZeRO-3 actor step with rehearsal: fp32 (gradient = PPO + coef * NLL gradient, exactly) and bf16 (the
    real configuration: finite, and the rehearsal gradient aligned with the fp32 CPU reference)."""
    from transformers import AutoTokenizer

    from openrlhf_lsc.integration import rehearsal

    rehearsal.apply()
    root = _models()
    tok = AutoTokenizer.from_pretrained(root / "policy")
    coef, out = 0.3, {}
    stream = _rehearsal_stream(tok, coef)
    stream.load_state_dict({"epoch": 0, "batches": 0})
    expected = _nll_gradient(root / "policy", [stream.next_batch()], coef)
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        grads = {}
        env = _actor(root / "policy", stage=3, bf16=bf16, grads=grads)
        status, with_rehearsal, stock = _step_pair(env, stream, lambda: _experience(len(tok)), coef)
        delta = torch.cat([(with_rehearsal[n] - stock[n]).flatten() for n in expected])
        ref = torch.cat([expected[n].flatten() for n in expected])
        out[precision] = {
            "max_abs_err": (delta - ref).abs().max().item(),
            "grad_scale": ref.abs().max().item(),
            "cosine": torch.nn.functional.cosine_similarity(delta, ref, dim=0).item(),
            "finite": bool(torch.isfinite(delta).all()) and bool(status["metrics"]["policy_loss"].isfinite()),
            "rehearsal_nll": status["metrics"]["rehearsal_nll"].item(),
            "partitioned": all(p.ds_status.name == "NOT_AVAILABLE" for p in env.model.model.module.parameters()),
        }
    return out


def rehearsal_memory():
    """Peak GPU memory of a ZeRO-3 bf16 actor step with and without the rehearsal forward (a ~100M policy,
    PPO and rehearsal micro-batches of 4 x 1024 tokens), with gradient checkpointing off and on."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from openrlhf_lsc.integration import rehearsal

    if not CUDA:
        return {"skipped": "peak GPU memory needs CUDA"}
    rehearsal.apply()
    root = _models()
    tok = AutoTokenizer.from_pretrained(root / "policy")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "policy_100m")
    tok.save_pretrained(root / "policy_100m")
    out = {"params": sum(p.numel() for p in LlamaForCausalLM(config).parameters())}
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for checkpointing in (False, True):
        grads = {}
        env = _actor(root / "policy_100m", stage=3, bf16=True, grads=grads, micro=4,
                     gradient_checkpointing=checkpointing)
        stream = _rehearsal_stream(tok, 0.01, n=8, micro=4, length=1024)

        def step(with_rehearsal):
            env.strategy.lsc_rehearsal = stream if with_rehearsal else None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            env.trainer.training_step(_experience(len(tok), batch=4, length=1024, actions=512), 0.0, 0)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()

        def activations():
            """Memory one rehearsal micro-batch's forward holds for the backward, measured alone."""
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            nll = stream.nll(env.trainer.actor)
            torch.cuda.synchronize()
            held = torch.cuda.max_memory_allocated() - before
            del nll
            return held

        step(False)  # warm-up: the optimizer states are allocated in the first step
        plain, with_rehearsal, plain_again = step(False), step(True), step(False)
        activation = activations()
        env = stream = None  # the engine and its ZeRO-3 hooks form cycles: collect them before measuring what is left
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        out["checkpointing" if checkpointing else "no_checkpointing"] = {
            "plain_gib": plain / 2**30, "rehearsal_gib": with_rehearsal / 2**30, "plain_again_gib": plain_again / 2**30,
            "ratio": with_rehearsal / plain, "extra_gib": (with_rehearsal - plain) / 2**30,
            "activation_gib": activation / 2**30, "leftover_gib": (torch.cuda.memory_allocated() - baseline) / 2**30,
        }
    return out


def rm_scoring():
    """K = 2 tiny reward models loaded by OpenRLHF's get_llm_for_sequence_regression (bf16, DeepSpeed ZeRO-3
    inference engines, as in RewardModelActor) score the same sequences as RewardModelActor.forward does,
    stacked to [N, K] (the plugin's multi-RM reward actor), then reward_utilities on the device."""
    from device_trap import device_trap
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from openrlhf_lsc.rewards import RewardSpec, reward_utilities

    root = _models()
    tok = AutoTokenizer.from_pretrained(root / "policy")
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    texts = [row["input"] + " the answer is " + ("good" if i % 2 else "two plus two") for i, row in enumerate(rows)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, ids))
    sequences = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])

    strategy = _strategy(stage=3, bf16=True)
    device_scores, cpu_scores = [], []
    for folder in ("rm_a", "rm_b"):
        model = get_llm_for_sequence_regression(
            str(root / folder), "reward", normalize_reward=False, attn_implementation="eager", param_dtype="bf16",
            ds_config=strategy.get_ds_eval_config(offload=False), value_head_prefix="score", packing_samples=False,
        )
        model = strategy.prepare(model)
        model.eval()
        with torch.no_grad():  # RewardModelActor.forward
            reward = model(sequences.to(DEVICE), attention_mask.to(DEVICE), ring_attn_group=None, pad_sequence=True)
        device_scores.append(reward)
        reference = LlamaForSequenceClassification.from_pretrained(root / folder, dtype=torch.float32).eval()
        with torch.no_grad():
            cpu_scores.append(reference(sequences, attention_mask=attention_mask).logits[:, 0])
    rewards = torch.stack(device_scores, dim=-1)  # [N, K], as the plugin's reward actor returns
    spec = RewardSpec(names=("A", "B"), transform="lsc", aggregate="and", reference="label", label_key="lsc_ref")
    labels = [row["lsc_ref"] for row in rows]
    with device_trap():  # a tensor built without the scores' device fails here, on CUDA and in the CPU self-test
        utility, metrics = reward_utilities(rewards, spec, labels=labels)
    cpu_utility, _ = reward_utilities(torch.stack(cpu_scores, dim=-1), spec, labels=labels)
    return {
        "device": str(rewards.device), "dtype": str(rewards.dtype), "utility_dtype": str(utility.dtype),
        "scores": rewards.float().cpu().tolist(), "cpu_fp32_scores": torch.stack(cpu_scores, -1).tolist(),
        "utility": utility.cpu().tolist(), "cpu_fp32_utility": cpu_utility.tolist(),
        "references": [[label[name]["reference"] for name in ("A", "B")] for label in labels],
        "metric_devices": sorted({str(v.device) for v in metrics.values()}),
    }


def am_zero2_bf16():
    """Advantage Model steps on OpenRLHF's reward model under DeepSpeed ZeRO-2 in bf16: forward of chosen and
    rejected together (as RewardModelTrainer.concatenated_forward), AM loss, backward, optimizer step."""
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from openrlhf_lsc.am_loss import AdvantageModelLoss

    root = _models()
    tok = AutoTokenizer.from_pretrained(root / "policy")
    tasks = ["code", "qa"] * 4
    chosen = [f"task {t} : question {i} the answer is good" for i, t in enumerate(tasks)]
    rejected = [f"task {t} : question {i} the answer is bad" for i, t in enumerate(tasks)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in chosen + rejected]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])

    reference = LlamaForSequenceClassification.from_pretrained(root / "rm_a", dtype=torch.float32).eval()
    with torch.no_grad():
        ref_scores = reference(input_ids, attention_mask=mask).logits[:, 0]
    ref_loss = AdvantageModelLoss(task_momentum=0.5)(ref_scores[:8], ref_scores[8:], tasks).item()

    strategy = _strategy(stage=2, bf16=True, train_batch_size=8, micro=8)
    model = get_llm_for_sequence_regression(
        str(root / "rm_a"), "reward", attn_implementation="eager", param_dtype="bf16",
        ds_config=strategy.get_ds_train_config(), value_head_prefix="score", init_value_head=False,
    )
    optim = dict(optim="adam", muon={}, adam=dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),
                 lr_scheduler="constant", lr_warmup_ratio=0.0, min_lr_ratio=0.1, max_norm=1.0, scheduler_steps=10)
    model, optimizer, scheduler = strategy.prepare((model, optim))
    assert model.zero_optimization_stage() == 2 and model.bfloat16_enabled()
    before = next(model.module.parameters()).detach().float().clone()
    loss_fn = AdvantageModelLoss(task_momentum=0.5, task_names=["code", "qa"])
    losses, dtypes = [], set()
    for _ in range(3):
        scores, _ = model(input_ids.to(DEVICE), attention_mask=mask.to(DEVICE), return_output=True)
        dtypes.add(str(scores.dtype))
        loss = loss_fn(scores[:8], scores[8:], tasks)
        strategy.backward(loss, model, optimizer)
        strategy.optimizer_step(optimizer, model, scheduler)
        losses.append(loss.item())
    after = next(model.module.parameters()).detach().float()
    return {"losses": losses, "cpu_fp32_first_loss": ref_loss, "score_dtypes": sorted(dtypes),
            "running": loss_fn.running, "weights_moved": (after - before).abs().max().item()}


def setup_hook():
    """The plugin's Ray worker setup hook in a fresh process must leave CUDA uninitialised (OpenRLHF sets
    CUDA_VISIBLE_DEVICES per actor after it runs)."""
    from openrlhf_lsc.integration import setup_worker

    setup_worker()
    ray = sys.modules.get("ray")
    return {"cuda_initialized": torch.cuda.is_initialized(), "cuda_available": torch.cuda.is_available(),
            "ray": "test-only stand-in" if getattr(ray, "__lsc_stub__", False) else ("real" if ray else "not imported")}


STEPS = {f.__name__: f for f in (rehearsal_zero3, rehearsal_memory, rm_scoring, am_zero2_bf16, setup_hook)}

if __name__ == "__main__":
    name, out = sys.argv[1], sys.argv[2]
    if name != "setup_hook":  # the hook must run in a process nothing else touched
        _setup()
    result = STEPS[name]()
    Path(out).write_text(json.dumps(result, indent=1))
