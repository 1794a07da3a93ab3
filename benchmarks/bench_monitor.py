"""Cost of the over-optimisation monitor on the reward step, measured side by side in one run.

The monitor adds one evaluator forward per sample plus its batch statistics. On one batch of token sequences
(default 64 samples x 64 tokens) and reward models built from configs in OpenRLHF's layout (loaded with
`get_llm_for_sequence_regression`, as the reward actors do):

- stock-plugin step: K proxy forwards + `reward_utilities` (AND-LSC, constant references);
- monitored step: the same + one evaluator forward + `Monitor.update` (Spearman, std-unit gaps, 3 regex probes
  over the decoded responses, the stop rule).

Runs alternate; medians, their ratio and the monitor's statistics alone are reported. The PPO wiring scores the
evaluator in the reward actors beside the proxies, so this ratio is the reward step's; a PPO step also generates
and trains, which this does not time.

    python benchmarks/bench_monitor.py [--samples 64] [--tokens 96] [--proxies 2] [--repeats 5] [--out r.json]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import flash_attn  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "tests" / "stubs"))  # CPU: openrlhf.models imports flash-attn
sys.path.insert(0, str(ROOT / "tests"))  # cpu_harness: the tiny tokenizer
sys.path.insert(0, str(ROOT))

PATTERNS = [r"list=^\s*(?:[-*]|\d+\.)\s", r"refusal=(?i)\bI (?:can't|cannot)\b", r"question=\?\s*$"]


def build_rms(root: Path, count: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from cpu_harness.tiny_models import make_tokenizer

    tok = make_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, num_labels=1,
               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    for i in range(count):
        torch.manual_seed(i)
        LlamaForSequenceClassification(LlamaConfig(**cfg)).save_pretrained(root / f"rm{i}")
        tok.save_pretrained(root / f"rm{i}")
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--proxies", type=int, default=2, help="K proxy reward models")
    ap.add_argument("--micro_batch", type=int, default=16, help="sequences per RM forward")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    opt = ap.parse_args()

    from openrlhf.models import get_llm_for_sequence_regression

    from openrlhf_lsc import RewardSpec, reward_utilities
    from openrlhf_lsc.monitor import Monitor

    k = opt.proxies
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_rms(Path(tmp), k + 1, opt.hidden, opt.layers)
        rms = [get_llm_for_sequence_regression(str(Path(tmp) / f"rm{i}"), "reward", param_dtype="bf16",
                                               attn_implementation="sdpa").eval() for i in range(k + 1)]
    proxies, evaluator = rms[:k], rms[k]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (opt.samples, opt.tokens), generator=g)
    lengths = torch.randint(opt.tokens // 4, opt.tokens + 1, (opt.samples,), generator=g)
    mask = (torch.arange(opt.tokens)[None] >= opt.tokens - lengths[:, None]).long()  # left padding, as OpenRLHF
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    responses = tok.batch_decode(ids[:, opt.tokens // 2 :], skip_special_tokens=True)
    names = tuple(f"proxy{i}" for i in range(k))
    spec = RewardSpec(names=names, transform="lsc", reference="constant", reference_value=(0.0,) * k)

    @torch.inference_mode()
    def scores(models):
        out = []
        for m in models:  # micro-batches, as the reward actor's forward
            out.append(torch.cat([m(ids[b : b + opt.micro_batch], mask[b : b + opt.micro_batch]).float()
                                  for b in range(0, opt.samples, opt.micro_batch)]))
        return torch.stack(out, 1)

    monitor = Monitor(names, ("judge",), patterns=PATTERNS, window=5, patience=3)
    step = iter(range(10**9))

    def plain():
        return reward_utilities(scores(proxies), spec)

    def monitored():
        r = scores(proxies)
        utility, metrics = reward_utilities(r, spec)
        e = scores([evaluator])
        above = {n: metrics[f"lsc/{n}/above_ref"] for n in names}
        return utility, monitor.update(next(step), r, e, above, responses)

    r_fixed, e_fixed = scores(proxies), scores([evaluator])
    above_fixed = {n: reward_utilities(r_fixed, spec)[1][f"lsc/{n}/above_ref"] for n in names}

    def stats_only():
        return monitor.update(next(step), r_fixed, e_fixed, above_fixed, responses)

    plain(), monitored(), stats_only()  # warm up
    # Wall time, and CPU time of this process (steadier when other jobs share the machine).
    times = {f"{n}_{clock}": [] for n in ("plain", "monitored", "stats_only") for clock in ("wall", "cpu")}
    for _ in range(opt.repeats):
        for name, fn in (("plain", plain), ("monitored", monitored), ("stats_only", stats_only)):
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[f"{name}_wall"].append(time.perf_counter() - t)
            times[f"{name}_cpu"].append(time.process_time() - c)
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {"config": vars(opt), "threads": torch.get_num_threads(), "expected_forward_ratio": (k + 1) / k,
              "median_s": med, "times": times}
    print(f"{opt.samples} samples x {opt.tokens} tokens, K={k} proxies + 1 evaluator, RM hidden {opt.hidden} x "
          f"{opt.layers} layers, {torch.get_num_threads()} threads; forwards alone would give {(k + 1) / k:.3f}x")
    for clock in ("wall", "cpu"):
        plain_s, mon_s, stats_s = (med[f"{n}_{clock}"] for n in ("plain", "monitored", "stats_only"))
        result[f"ratio_{clock}"] = mon_s / plain_s
        result[f"statistics_share_{clock}"] = stats_s / plain_s
        print(f"  {clock:4s}: reward step {1000 * plain_s:.1f} ms, with monitor {1000 * mon_s:.1f} ms -> "
              f"{mon_s / plain_s:.3f}x; monitor statistics alone {1000 * stats_s:.2f} ms "
              f"({100 * stats_s / plain_s:.2f}% of the step)")
    if opt.out:
        Path(opt.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
