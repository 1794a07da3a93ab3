"""The plugin's math on CUDA in bf16/fp16 against the fp32 CPU results.

Two kinds of comparison, with their tolerances:
- same inputs: the bf16/fp16 values, moved to CUDA, against the same values cast to fp32 on CPU. The
  functions compute in fp32 internally, so only the device's fp32 arithmetic may differ: rtol 1e-5, atol 1e-5.
- low-precision inputs: the CUDA pipeline on bf16/fp16-rounded inputs against fp32 CPU on the exact inputs;
  the difference is the input rounding (bf16 keeps 8 bits: relative 2^-8 = 0.4 %, fp16 2^-11), times the
  function's slope (at most 1 for the transforms; K for AND over K rewards): stated per test.
The device computations run inside `device_trap()` (tests/device_trap.py): a tensor the code builds without the
inputs' device is a meta tensor there and fails, so the CPU self-test (LSC_GPU_SELFTEST=cpu) catches it as well.
"""

import numpy as np
import pytest
import torch
from device_trap import device_trap

from openrlhf_lsc.am_loss import AdvantageModelLoss, pairwise_metrics
from openrlhf_lsc.rehearsal import token_nll
from openrlhf_lsc.rewards import TRANSFORMS, RewardSpec, aggregate_rewards, reward_utilities, transform_reward

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # relative rounding of one value


def _rewards(n=4096, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 3, torch.randn(n, k, generator=g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", TRANSFORMS)
def test_transforms(device, dtype, kind):
    r, ref = _rewards()
    r_low, ref_low = r.to(dtype), ref.to(dtype)
    with device_trap():
        got = transform_reward(r_low.to(device), ref_low.to(device), kind)
    assert got.device.type == torch.device(device).type and got.dtype == torch.float32
    same = transform_reward(r_low.float(), ref_low.float(), kind)
    torch.testing.assert_close(got.cpu(), same, rtol=1e-5, atol=1e-5)
    exact = transform_reward(r, ref, kind)
    # |d u / d r| <= 1 and |d u / d ref| <= 1: the error is at most the two inputs' rounding
    bound = EPS[dtype] * (r.abs() + ref.abs()) + 1e-5
    assert ((got.cpu() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform, aggregate, weights", [("lsc", "and", None), ("raw", "weighted", (0.3, 0.7)),
                                                            ("center", "and", None)])
def test_aggregation(device, dtype, transform, aggregate, weights):
    r, ref = _rewards()
    with device_trap():
        got = aggregate_rewards(r.to(dtype).to(device), ref.to(dtype).to(device), transform, aggregate, weights)
    same = aggregate_rewards(r.to(dtype).float(), ref.to(dtype).float(), transform, aggregate, weights)
    torch.testing.assert_close(got.cpu(), same, rtol=1e-5, atol=1e-5)
    exact = aggregate_rewards(r, ref, transform, aggregate, weights)
    bound = (EPS[dtype] * (r.abs() + ref.abs())).sum(1) + 1e-5  # a sum over K of slope-<=1 terms
    assert ((got.cpu() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_reward_pipeline_with_labels(device, dtype):
    """reward_utilities (the one pipeline PPO uses) on CUDA: references from labels, per-prompt groups."""
    n_prompts, group = 512, 8
    r, _ = _rewards(n_prompts * group)
    refs = np.random.default_rng(1).normal(size=(n_prompts, 2))
    labels = [{"helpful": {"reference": float(refs[i // group, 0])}, "harmless": {"reference": float(refs[i // group, 1])}}
              for i in range(n_prompts * group)]
    spec = RewardSpec(names=("helpful", "harmless"), transform="lsc", aggregate="and", reference="label", label_key="lsc_ref")
    with device_trap():
        got, metrics = reward_utilities(r.to(dtype).to(device), spec, labels=labels, group_size=group)
    same, _ = reward_utilities(r.to(dtype).float(), spec, labels=labels, group_size=group)
    torch.testing.assert_close(got.cpu(), same, rtol=1e-5, atol=1e-5)
    assert {v.device for v in metrics.values()} == {got.device}
    # numpy from the rounded rewards: sum_k log sigmoid(r_k - ref_k)
    low = r.to(dtype).double().numpy()
    margin = low - np.repeat(refs, group, axis=0)
    expected = -np.logaddexp(0, -margin).sum(1)
    np.testing.assert_allclose(got.cpu().double().numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reference", ["constant", "group"])
def test_reward_pipeline_constant_and_group_references(device, dtype, reference):
    """reward_utilities on the device with constant references (built from Python floats) and group references
    (the q-quantile of each prompt's 8 samples), weighted, against numpy on the rounded rewards."""
    n_prompts, group = 512, 8
    r, _ = _rewards(n_prompts * group)
    low = r.to(dtype).double().numpy()
    extra = {"reference_value": (0.25, -0.5)} if reference == "constant" else {"quantile": 0.75}
    spec = RewardSpec(names=("helpful", "harmless"), transform="lsc", aggregate="weighted", weights=(0.4, 0.6),
                      reference=reference, **extra)
    with device_trap():
        got, metrics = reward_utilities(r.to(dtype).to(device), spec, group_size=group)
    assert {v.device for v in metrics.values()} == {got.device} and got.dtype == torch.float32
    if reference == "constant":
        refs = np.broadcast_to([0.25, -0.5], low.shape)
    else:
        refs = np.repeat(np.quantile(low.reshape(n_prompts, group, 2), 0.75, axis=1), group, axis=0)
    expected = (-np.logaddexp(0, -(low - refs)) * [0.4, 0.6]).sum(1)
    np.testing.assert_allclose(got.cpu().double().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["lsc/harmless/margin"].cpu().double().numpy(), (low - refs)[:, 1],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_am_loss_and_gradients(device, dtype):
    """AM loss on low-precision scores on CUDA = the same scores in fp32 on CPU (the loss runs in fp32)."""
    g = torch.Generator().manual_seed(2)
    c, r = torch.randn(64, generator=g) * 2, torch.randn(64, generator=g) * 2
    tasks = ["code" if i % 3 else "qa" for i in range(64)]
    results = {}
    for where, (cc, rr) in {"device": (c.to(dtype).to(device), r.to(dtype).to(device)),
                            "cpu": (c.to(dtype).float(), r.to(dtype).float())}.items():
        cc, rr = cc.clone().requires_grad_(), rr.clone().requires_grad_()
        loss_fn = AdvantageModelLoss(task_momentum=0.5)
        with device_trap():
            for _ in range(3):  # running statistics move the same way
                loss = loss_fn(cc, rr, tasks)
        loss.backward()
        results[where] = (loss.detach().cpu(), cc.grad.float().cpu(), rr.grad.float().cpu(), loss_fn.running)
    dev, cpu = results["device"], results["cpu"]
    assert dev[0].dtype == torch.float32
    torch.testing.assert_close(dev[0], cpu[0], rtol=1e-5, atol=1e-5)
    # gradients come back in the scores' dtype: compare at its precision
    torch.testing.assert_close(dev[1], cpu[1], rtol=4 * EPS[dtype], atol=1e-6)
    torch.testing.assert_close(dev[2], cpu[2], rtol=4 * EPS[dtype], atol=1e-6)
    for task in cpu[3]:
        np.testing.assert_allclose(dev[3][task], cpu[3][task], rtol=1e-6)
    m_dev = pairwise_metrics(c.to(dtype).to(device), r.to(dtype).to(device), tasks)
    assert m_dev == pairwise_metrics(c.to(dtype).float(), r.to(dtype).float(), tasks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rehearsal_nll(device, dtype):
    """token_nll on bf16/fp16 logits on CUDA (the policy's dtype) vs the same logits in fp32 on CPU, and vs
    fp32 logits: the log-softmax of rounded logits moves each token's NLL by at most 2 * rounding * max|logit|."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 64, 1000, generator=g) * 4
    ids = torch.randint(0, 1000, (4, 64), generator=g)
    mask = torch.zeros(4, 64, dtype=torch.long)
    mask[:, 20:50] = 1
    with device_trap():
        got = token_nll(logits.to(dtype).to(device), ids.to(device), mask.to(device))
    assert got.dtype == torch.float32
    same = token_nll(logits.to(dtype).float(), ids, mask)
    torch.testing.assert_close(got.cpu(), same, rtol=1e-5, atol=1e-5)
    exact = token_nll(logits, ids, mask)
    assert abs(got.item() - exact.item()) <= 2 * EPS[dtype] * logits.abs().max().item()
