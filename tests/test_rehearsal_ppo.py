"""Rehearsal loss in the real OpenRLHF actor step: DeepSpeed ZeRO-2 on CPU (gloo, world size 1), the real
`ActorPPOTrainer.training_step` patched by `openrlhf_lsc.integration.rehearsal.apply()`, a tiny Llama.

Gradients are read after the step's single backward (DeepSpeed's own fp32 gradient partitions) with the
learning rate at 0, so every case starts from the same weights.
"""

import json
import os
import socket
import sys
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

WORDS = ["<pad>", "<unk>", "</s>", "Q:", "A:"] + [f"w{i}" for i in range(40)]
TEMPLATE = "Q: {} A: "  # SFTDataset joins prompt + response with no separator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _rows(n: int):
    g = np.random.default_rng(0)
    words = lambda k: " ".join(f"w{i}" for i in g.integers(0, 40, k))  # noqa: E731
    return [{"q": words(int(g.integers(2, 5))), "a": words(int(g.integers(1, 4)))} for _ in range(n)]


def _args(root, stage, dynamic, max_tokens=None):
    return NS(
        local_rank=-1,
        ds=NS(param_dtype="bf16", zero_stage=stage, adam_offload=False, zpg=1, use_universal_ckpt=False,
              grad_accum_dtype=None, overlap_comm=False, deepcompile=False, tensor_parallel_size=1, ring_attn_size=1,
              packing_samples=False, enable_sleep=False),
        train=NS(dynamic_batch_enable=dynamic, max_tokens_per_gpu=max_tokens, batch_size=4, max_epochs=1,
                 colocate_all=False, async_enable=False, seed=7),
        rollout=NS(batch_size=4, n_samples_per_prompt=1),
        actor=NS(eps_clip_low_high=(0.2, 0.2), dual_clip=None, loss_agg_mode="token-mean", policy_loss_type="ppo",
                 aux_loss_coef=0, entropy_coef=None),
        algo=NS(advantage=NS(is_correction_level="off", is_correction_mode="mask", is_correction_gating="ratio",
                             is_correction_threshold=(0.5, 5.0)), kl=NS(use_loss=False)),
        vllm=NS(sync_backend="gloo"),
        data=NS(apply_chat_template=False, input_template=TEMPLATE, max_len=64),
        ckpt=NS(path=str(root / f"ckpt{stage}{'d' if dynamic else ''}"), max_num=3, max_mem=1000),
        lsc=NS(rehearsal=NS(dataset=str(root / "dr.jsonl"), coef=0.3, input_key="q", output_key="a",
                            micro_batch_size=2, max_len=None)),
    )


def build(root, tok, stage=2, dynamic=False, train_batch_size=2, max_tokens=None):
    """A real OpenRLHF actor (DeepSpeed ZeRO-`stage`, fp32 on CPU) and its patched ActorPPOTrainer.

    fp32 (DeepSpeed's bf16 mode off, weights loaded in fp32) so gradient sums compare to float32 rounding;
    torch AdamW (no compiled DeepSpeed op); lr 0, so every step leaves the weights as they were.
    `strategy.optimizer_step` records DeepSpeed's full gradients at each accumulation boundary in `grads`.
    """
    import deepspeed
    import openrlhf.utils.utils as ou
    from openrlhf.models import Actor
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    args = _args(root, stage, dynamic, max_tokens)
    strategy = DeepspeedStrategy(seed=7, micro_train_batch_size=2, train_batch_size=train_batch_size,
                                 zero_stage=stage, args=args)
    strategy.setup_distributed()
    stock_config = strategy.get_ds_train_config

    def ds_config(*a, **k):
        c = stock_config(*a, **k)
        if "optimizer" in c:
            c["optimizer"]["params"]["torch_adam"] = True
        c["bf16"]["enabled"] = False  # ZeRO-3 builds the model under zero.Init with this dtype
        if stage == 3:  # partition even these tiny tensors (by default ZeRO-3 keeps small ones whole)
            c["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return c

    strategy.get_ds_train_config = ds_config
    dtype = ou.convert_to_torch_dtype
    ou.convert_to_torch_dtype = lambda _: torch.float32  # Actor reads it at load time
    try:
        actor = Actor(str(root / "model"), attn_implementation="eager", param_dtype="bf16",
                      ds_config=strategy.get_ds_train_config())
    finally:
        ou.convert_to_torch_dtype = dtype
    optim_cfg = dict(optim="adam", muon={}, adam=dict(lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),
                     lr_scheduler="constant", lr_warmup_ratio=0.0, min_lr_ratio=0.1, max_norm=0.0, scheduler_steps=10)
    model, optim, sched = strategy.prepare((actor, optim_cfg))
    assert isinstance(model.model, deepspeed.DeepSpeedEngine) and model.model.zero_optimization_stage() == stage
    trainer = _trainer(strategy, model, optim, sched, tok)  # the patched __init__ attaches the stream
    grads = {}

    def optimizer_step(_optim, m, _sched, name="model", **kw):  # record, then the real (lr 0) step
        if m.model.is_gradient_accumulation_boundary():
            grads.clear()
            for n, p in m.model.module.named_parameters():
                grads[n] = deepspeed.utils.safe_get_full_grad(p).detach().clone().float()
        m.model.step()

    strategy.optimizer_step = optimizer_step
    return NS(strategy=strategy, model=model, optim=optim, sched=sched, trainer=trainer,
              stream=strategy.lsc_rehearsal, grads=grads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Distributed env (world size 1), CPU shims, a tiny Llama policy and D_R on disk; the hooks installed."""
    dist_env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="-1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    saved = {k: os.environ.get(k) for k in dist_env}
    os.environ.update(dist_env)
    import cpu_shims

    cpu_shims.install()
    cpu_shims.skip_deepspeed_op_builds()
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("rehearsal_ppo")
    tok = _tokenizer()
    tok.save_pretrained(root / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=2, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    rows = _rows(12)
    with open(root / "dr.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    from openrlhf_lsc.integration import rehearsal

    rehearsal.apply()
    yield NS(root=root, rows=rows, tok=tok, rehearsal=rehearsal)
    # Leave no process group or rank variables behind for later tests (Ray workers inherit the environment).
    torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def env(files):
    """ZeRO-2, one micro-batch per optimizer step."""
    return NS(**vars(files), **vars(build(files.root, files.tok)))


def _trainer(strategy, model, optim, sched, tok):
    import openrlhf.trainer.ray.ppo_actor as ppo_actor

    # The replay buffer is unused by training_step without dynamic batching; its constructor needs CUDA.
    buffer = ppo_actor.NaiveReplayBuffer
    ppo_actor.NaiveReplayBuffer = lambda *a, **k: None
    try:
        return ppo_actor.ActorPPOTrainer(strategy, model, None, optim, sched, micro_train_batch_size=2, tokenizer=tok)
    finally:
        ppo_actor.NaiveReplayBuffer = buffer


def _experience():
    from openrlhf.trainer.ppo_utils.experience import Experience

    g = torch.Generator().manual_seed(1)
    return Experience(
        sequences=torch.randint(5, len(WORDS), (2, 10), generator=g),
        attention_mask=torch.ones(2, 10, dtype=torch.long),
        action_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool),
        action_log_probs=-3.7 - 0.2 * torch.rand(2, 5, generator=g),
        advantages=torch.randn(2, 5, generator=g),
    )


def _step(env, coef):
    """One patched training step from the stream's start; coef None = rehearsal off (stock)."""
    env.stream.load_state_dict({"epoch": 0, "batches": 0})
    env.strategy.lsc_rehearsal = None if coef is None else env.stream
    env.stream.coef = coef
    try:
        status = env.trainer.training_step(_experience(), 0.0, 0)
    finally:
        env.strategy.lsc_rehearsal = env.stream
    return status, dict(env.grads)


def test_one_backward_equals_ppo_plus_gamma_nll_gradients(env):
    gamma = 0.3
    combined, g_both = _step(env, gamma)
    stock, g_ppo = _step(env, None)
    # gamma * NLL alone, on the same first micro-batch, through the same engine backward.
    env.stream.load_state_dict({"epoch": 0, "batches": 0})
    nll = env.stream.nll(env.model)
    env.strategy.backward(gamma * nll, env.model, env.optim)
    env.strategy.optimizer_step(env.optim, env.model, None)
    g_nll = dict(env.grads)

    assert set(g_both) == set(g_ppo) == set(g_nll) and len(g_both) > 10
    for name in g_both:
        torch.testing.assert_close(g_both[name], g_ppo[name] + g_nll[name], rtol=1e-5, atol=1e-7, msg=name)
    # Both terms matter here, so the check above can fail.
    diff = max((g_both[n] - g_ppo[n]).abs().max().item() for n in g_both)
    scale = max(g_ppo[n].abs().max().item() for n in g_ppo)
    assert diff > 0.05 * scale
    m = combined["metrics"]
    assert m["rehearsal_coef"].item() == pytest.approx(gamma) and combined["weights"]["rehearsal_nll"] == "sample"
    assert m["rehearsal_nll"].item() == pytest.approx(nll.item(), rel=1e-6)
    assert m["policy_loss"].item() == pytest.approx(stock["metrics"]["policy_loss"].item(), rel=1e-6)
    assert "rehearsal_nll" not in stock["metrics"]


def test_gamma_zero_reproduces_stock_gradients_exactly(env):
    _, g_zero = _step(env, 0.0)
    _, g_stock = _step(env, None)
    assert all(torch.equal(g_zero[n], g_stock[n]) for n in g_stock)


def test_rehearsal_nll_is_the_response_likelihood(env):
    """Independent NLL: tokenize template(prompt) and response + EOS separately, score every row alone."""
    from scipy.special import logsumexp

    tok, module = env.tok, env.model.model.module
    full = {}
    for r in env.rows:
        p = tok(TEMPLATE.format(r["q"]), add_special_tokens=False)["input_ids"]
        a = tok(r["a"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        full[tuple(p + a)] = len(p)
    env.stream.load_state_dict({"epoch": 0, "batches": 3})
    with torch.no_grad():
        got = env.stream.nll(env.model).item()
        env.stream.load_state_dict({"epoch": 0, "batches": 3})
        ids, mask, _ = env.stream.next_batch()
        total, count = 0.0, 0
        for row_ids, row_mask in zip(ids, mask):
            seq = tuple(row_ids[row_mask.bool()].tolist())
            assert seq in full, "rehearsal tokens differ from template(prompt) + response + EOS"
            n_prompt = full[seq]
            logits = module(torch.tensor([seq])).logits[0].double().numpy()
            logp = logits - logsumexp(logits, axis=-1, keepdims=True)
            for t in range(n_prompt, len(seq)):
                total -= logp[t - 1, seq[t]]
                count += 1
    assert got == pytest.approx(total / count, rel=1e-5)


def _sharded_stream(env, rank, world, state=None):
    """A stream that sees itself as DP rank `rank` of `world` (OpenRLHF's DistributedSampler)."""
    from openrlhf.utils.distributed_sampler import DistributedSampler

    real = env.strategy.setup_dataloader

    def setup_dataloader(dataset, *a, **k):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=env.strategy.seed, drop_last=True)
        return real(dataset, *a, sampler=sampler, **k)

    env.strategy.setup_dataloader = setup_dataloader
    try:
        return env.rehearsal.RehearsalStream.from_config(env.strategy, env.tok, env.strategy.args.lsc.rehearsal, state)
    finally:
        del env.strategy.setup_dataloader


def _rows_of(batch):
    return [tuple(r[m.bool()].tolist()) for r, m in zip(batch[0], batch[1])]


def test_ranks_split_each_pass_and_resume_mid_pass_and_across_passes(env):
    world, per_pass = 2, 3  # 12 pairs / (2 ranks x micro-batch 2)
    streams = [_sharded_stream(env, r, world) for r in range(world)]
    drawn = {r: [_rows_of(streams[r].next_batch()) for _ in range(2 * per_pass + 2)] for r in range(world)}
    for p in range(2):  # every pass: the two ranks together see each pair exactly once
        seen = [row for r in range(world) for b in drawn[r][p * per_pass:(p + 1) * per_pass] for row in b]
        assert len(seen) == 12 and len(set(seen)) == 12
    first = [row for b in drawn[0][:per_pass] for row in b]
    second = [row for b in drawn[0][per_pass:2 * per_pass] for row in b]
    assert first != second  # reshuffled between passes
    for k in (1, per_pass, per_pass + 1, 2 * per_pass + 1):  # resume after k micro-batches on rank 1
        s = _sharded_stream(env, 1, world)
        for _ in range(k):
            s.next_batch()
        resumed = _sharded_stream(env, 1, world, state=s.state_dict())
        assert [_rows_of(resumed.next_batch()) for _ in range(2 * per_pass + 2 - k)] == drawn[1][k:]


def test_position_saved_in_openrlhf_checkpoint_and_restored(env):
    """Real PolicyModelActor.save_checkpoint -> DeepSpeed checkpoint -> load_ckpt -> a new trainer resumes D_R."""
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

    actor_cls = PolicyModelActor.__ray_metadata__.modified_class.__ray_actor_class__
    env.stream.load_state_dict({"epoch": 0, "batches": 0})
    for _ in range(8):  # into the second pass (6 micro-batches of 2 per pass at world size 1)
        env.stream.next_batch()
    owner = NS(strategy=env.strategy, actor=env.model, disable_ds_ckpt=False, save_hf_ckpt=False)
    actor_cls.save_checkpoint(owner, "global_step3", client_states={"global_step": 3})
    expected = [_rows_of(env.stream.next_batch()) for _ in range(3)]

    try:
        # As PolicyModelActor.init_model_from_pretrained: load the checkpoint, then build the trainer.
        _, states = env.strategy.load_ckpt(env.model.model, os.path.join(env.strategy.args.ckpt.path, "_actor"))
        assert states["global_step"] == 3 and states["lsc_rehearsal"] == {"epoch": 1, "batches": 2}
        _trainer(env.strategy, env.model, env.optim, env.sched, env.tok)
        resumed = env.strategy.lsc_rehearsal
        assert resumed is not env.stream
        assert [_rows_of(resumed.next_batch()) for _ in range(3)] == expected
    finally:
        env.strategy.lsc_rehearsal = env.stream
        del env.strategy.lsc_loaded_client_states


def test_bad_rehearsal_input_names_the_flag(env, tmp_path):
    cfg = env.strategy.args.lsc.rehearsal
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "w1", "answer": "w2"}) + "\n")
    with pytest.raises(ValueError, match=r"no field 'a' \(--lsc.rehearsal.output_key\)"):
        env.rehearsal.RehearsalStream.from_config(env.strategy, env.tok, NS(**{**vars(cfg), "dataset": str(bad)}))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"q": "w1", "a": "w2"}) + "\n")
    with pytest.raises(ValueError, match="1 usable pairs, fewer than --lsc.rehearsal.micro_batch_size 2"):
        env.rehearsal.RehearsalStream.from_config(env.strategy, env.tok, NS(**{**vars(cfg), "dataset": str(one)}))
    for key, value, flag in (("coef", -0.1, "coef"), ("coef", float("nan"), "coef"), ("micro_batch_size", 0, "micro_batch_size")):
        with pytest.raises(ValueError, match=f"--lsc.rehearsal.{flag}"):
            env.rehearsal.check_config(NS(**{**vars(cfg), key: value}))


def _nll_gradient(files, batches, coef):
    """coef * grad of the mean NLL over `batches`, in plain transformers (fp32, no DeepSpeed, no OpenRLHF)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(files.root / "model", dtype=torch.float32)
    nlls = []
    for ids, mask, loss_mask in batches:
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logp = model(ids, attention_mask=mask, position_ids=position_ids).logits[:, :-1].float().log_softmax(-1)
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        target = loss_mask[:, :-1].float()  # OpenRLHF's SFT loss_mask[t] marks the prediction of token t + 1
        nlls.append(-(token_logp * target).sum() / target.sum())
    (coef * torch.stack(nlls).mean()).backward()
    return {n: p.grad for n, p in model.named_parameters()}, [v.item() for v in nlls]


def _assert_rehearsal_gradient(with_rehearsal, stock, expected):
    assert set(with_rehearsal) == set(stock) == set(expected) and len(expected) > 10
    for name in expected:
        torch.testing.assert_close(with_rehearsal[name] - stock[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _drawn(stream, n):
    stream.load_state_dict({"epoch": 0, "batches": 0})
    batches = [stream.next_batch() for _ in range(n)]
    stream.load_state_dict({"epoch": 0, "batches": 0})
    return batches


def test_zero3_second_forward_in_one_backward(files):
    """ZeRO-3 partitions parameters and gathers them per forward: the rehearsal forward after the PPO forward,
    then one backward, still gives grad L_PPO + coef * grad NLL (DeepSpeed issue #5321 is about this shape)."""
    z3 = build(files.root, files.tok, stage=3)
    grads = {}
    for coef in (0.3, None):
        z3.stream.load_state_dict({"epoch": 0, "batches": 0})
        z3.strategy.lsc_rehearsal = None if coef is None else z3.stream
        status = z3.trainer.training_step(_experience(), 0.0, 0)
        grads[coef] = dict(z3.grads)
    assert status["metrics"]["policy_loss"].isfinite()
    _assert_rehearsal_gradient(grads[0.3], grads[None], _nll_gradient(files, _drawn(z3.stream, 1), 0.3)[0])
    # still partitioned after the step: ZeRO-3 released every gathered parameter
    params = list(z3.model.model.module.parameters())
    assert all(p.ds_status.name == "NOT_AVAILABLE" and p.numel() == 0 for p in params)


def _rollout(lengths, response=8):
    """One replay-buffer batch: prompts + responses of the given total lengths, right-padded."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    g = torch.Generator().manual_seed(5)
    b, t, a = len(lengths), max(lengths), response
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    action_mask = torch.zeros(b, a, dtype=torch.bool)
    for i, n in enumerate(lengths):  # actions are the last `a` positions; padding eats into them from the right
        action_mask[i, : a - (t - n)] = True  # a > t - n for every sample
    return Experience(
        sequences=torch.randint(5, len(WORDS), (b, t), generator=g) * mask,
        attention_mask=mask,
        action_mask=action_mask,
        action_log_probs=-3.7 - 0.2 * torch.rand(b, a, generator=g),
        advantages=torch.randn(b, a, generator=g),
        total_length=torch.tensor(lengths, dtype=torch.float),
        response_length=action_mask.sum(1).float(),
        info={},
    )


def _ppo_train(setup, coef, lengths):
    """OpenRLHF's real ActorPPOTrainer.ppo_train over one rollout (4 samples = one optimizer step)."""
    from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer

    device = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0  # NaiveReplayBuffer.__init__ names a CUDA device it never uses here
    try:
        buffer = NaiveReplayBuffer(2, 0, False, False, setup.strategy.args.train.dynamic_batch_enable)
    finally:
        torch.cuda.current_device = device
    buffer.append(_rollout(lengths))
    setup.trainer.replay_buffer = buffer
    setup.trainer.dataloader_pin_memory = False
    setup.stream.load_state_dict({"epoch": 0, "batches": 0})
    setup.stream.coef = coef
    setup.strategy.lsc_rehearsal = None if coef is None else setup.stream
    torch.manual_seed(0)  # ppo_train shuffles the buffer (without dynamic batching): same order every run
    status = setup.trainer.ppo_train(0.0)
    setup.strategy.lsc_rehearsal = setup.stream
    return status, dict(setup.grads), buffer


@pytest.fixture(scope="module")
def step_setups(files):
    """One optimizer step of 4 samples under ZeRO-3: 2 micro-batches of 2 (gas 2), and dynamic batching (gas 1).

    ZeRO-3, because DeepSpeed 0.19.6's ZeRO-1/2 keep only the last backward's gradient when gas is 1 (every
    backward is an accumulation boundary), which stock OpenRLHF's dynamic batching runs into
    (allenai/open-instruct#1498 describes the mechanism); ZeRO-3 accumulates, as the test checks for stock PPO.
    """
    return NS(fixed=build(files.root, files.tok, stage=3, train_batch_size=4),
              dynamic=build(files.root, files.tok, stage=3, train_batch_size=4, dynamic=True, max_tokens=12))


@pytest.mark.parametrize("max_tokens, micro_batches", [(17, 2), (12, 3)])
def test_rehearsal_weight_per_step_is_coef_times_mean_nll_with_and_without_dynamic_batching(
    files, step_setups, max_tokens, micro_batches
):
    """Review defect: with --train.dynamic_batch_enable DeepSpeed does not divide micro-batch losses by gas
    (it is 1) and a step packs a varying number of micro-batches; the rehearsal term must still add
    coef * mean NLL of the step's rehearsal micro-batches, as it does without dynamic batching."""
    lengths, coef = [12, 10, 7, 5], 0.3
    step_setups.dynamic.strategy.args.train.max_tokens_per_gpu = max_tokens
    status, dynamic, buffer = _ppo_train(step_setups.dynamic, coef, lengths)
    _, dyn_stock, _ = _ppo_train(step_setups.dynamic, None, lengths)
    assert len(buffer.dynamic_indices) == micro_batches and buffer.dynamic_optimizer_step == [0] * (micro_batches - 1) + [1]
    expected, nlls = _nll_gradient(files, _drawn(step_setups.dynamic.stream, micro_batches), coef)
    _assert_rehearsal_gradient(dynamic, dyn_stock, expected)
    assert status["rehearsal_coef"] == pytest.approx(coef)
    assert min(nlls) <= status["rehearsal_nll"] <= max(nlls)  # averaged over micro-batches, weighted by PPO samples

    status, fixed, _ = _ppo_train(step_setups.fixed, coef, lengths)
    _, fixed_stock, _ = _ppo_train(step_setups.fixed, None, lengths)
    for name in fixed_stock:  # stock PPO: the same step gradient with and without dynamic batching
        torch.testing.assert_close(dyn_stock[name], fixed_stock[name], rtol=1e-4, atol=1e-6)
    # without dynamic batching (gas 2) the step draws two D_R micro-batches
    expected, nlls = _nll_gradient(files, _drawn(step_setups.fixed.stream, 2), coef)
    _assert_rehearsal_gradient(fixed, fixed_stock, expected)
    assert status["rehearsal_nll"] == pytest.approx(sum(nlls) / 2, rel=1e-5)  # 2 PPO samples per micro-batch


def test_step_weight_follows_the_replay_buffer_plan(files, env):
    """Positions in dynamic_optimizer_step -> 1 / micro-batches of their step; epochs repeat; a new plan restarts."""
    stream = env.stream
    trainer = NS(args=NS(train=NS(dynamic_batch_enable=True)), replay_buffer=NS(dynamic_optimizer_step=[0, 0, 1, 1, 0, 1]))
    weights = [stream.step_weight(trainer) for _ in range(12)]  # two epochs
    assert weights == [1 / 3] * 3 + [1.0] + [1 / 2] * 2 + [1 / 3] * 3 + [1.0] + [1 / 2] * 2
    stream.step_weight(trainer)  # mid-epoch of the old plan ...
    trainer.replay_buffer.dynamic_optimizer_step = [0, 1]  # ... then ppo_train builds a new one
    assert [stream.step_weight(trainer) for _ in range(2)] == [0.5, 0.5]
    assert stream.step_weight(NS(args=NS(train=NS(dynamic_batch_enable=False)))) == 1.0


def test_patched_openrlhf_gets_the_hook_registered(files, env, monkeypatch):
    """With patches/0002's ACTOR_LOSS_HOOKS present, attaching a stream registers `actor_loss_hook` (once); the
    hook's term is what the stock wrappers add: coef * NLL of the next D_R micro-batch, metrics in info."""
    import types

    import openrlhf.utils

    plugins = types.ModuleType("openrlhf.utils.plugins")
    plugins.ACTOR_LOSS_HOOKS = []
    monkeypatch.setitem(sys.modules, "openrlhf.utils.plugins", plugins)
    monkeypatch.setattr(openrlhf.utils, "plugins", plugins, raising=False)
    try:
        for _ in range(2):
            _trainer(env.strategy, env.model, env.optim, env.sched, env.tok)
        assert plugins.ACTOR_LOSS_HOOKS == [env.rehearsal.actor_loss_hook]
    finally:
        env.strategy.lsc_rehearsal = env.stream
    exp = _experience()
    env.stream.coef = 0.3
    env.stream.load_state_dict({"epoch": 0, "batches": 0})
    with torch.no_grad():
        term = env.rehearsal.actor_loss_hook(env.trainer, exp, None)
        env.stream.load_state_dict({"epoch": 0, "batches": 0})
        nll = env.stream.nll(env.model)
    assert term.item() == pytest.approx(env.stream.coef * nll.item(), rel=1e-6)
    assert exp.info["rehearsal_nll"].tolist() == [pytest.approx(nll.item(), rel=1e-6)]
    assert exp.info["rehearsal_coef"].tolist() == [pytest.approx(env.stream.coef)]
    env.strategy.lsc_rehearsal = None
    try:
        assert env.rehearsal.actor_loss_hook(env.trainer, _experience(), None) is None
    finally:
        env.strategy.lsc_rehearsal = env.stream
