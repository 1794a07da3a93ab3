"""Reference estimator benchmarks, measured side by side in one run on models built from configs.

1. Scoring throughput: the estimator's scoring step (`estimate.score_prompts` with `LocalRewardModel`:
   length-sorted batches, statistics per prompt) vs a plain batched RM forward as `serve_rm` does it
   (batches in input order, padded to the longest) over the same prompt/response pairs. Runs alternate;
   medians and their ratio are reported (target: estimator >= 0.9x the plain throughput).
2. Scaling: wall time of the whole estimator (HF-generate sampler + RM scoring) as k and the number of
   prompts grow.

    python benchmarks/bench_estimate_reference.py [--prompts 32] [--k 8] [--repeats 3] [--device cuda|cpu]
        [--quick] [--out results.json]

The RM and the policy run on `--device` (default: CUDA when available). `--out` is rewritten after each part, so a
run cut short keeps what it measured; `--quick` shrinks the scaling grid (a check of the command).

On a CPU machine the flash-attn stand-in from tests/stubs is put on the path (openrlhf.models imports it).
"""

import argparse
import json
import random
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
    sys.path.insert(0, str(ROOT / "tests" / "stubs"))
sys.path.insert(0, str(ROOT / "tests"))  # cpu_harness: the tiny tokenizer

WORDS = "the a one two three four five six seven eight nine ten plus minus is what how why good bad answer".split()


def build_models(root: Path, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from cpu_harness.tiny_models import make_tokenizer

    tok = make_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(root / "policy")
    LlamaForSequenceClassification(LlamaConfig(num_labels=1, **cfg)).save_pretrained(root / "rm")
    for d in ("policy", "rm"):
        tok.save_pretrained(root / d)


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def plain_forward(rm, prompts, responses, batch_size):
    """serve_rm's get_reward: batches in input order, each padded to its longest query."""
    queries = [p + r for p, r in zip(prompts, responses)]
    device = next(rm.model.parameters()).device
    out = []
    with torch.inference_mode():
        for b in range(0, len(queries), batch_size):
            batch = rm.tokenizer(queries[b : b + batch_size], return_tensors="pt", add_special_tokens=False,
                                 max_length=rm.max_len, padding=True, truncation=True)
            out += rm.model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().tolist()
    return out


def bench_scoring(rm, num_prompts, k, batch_size, repeats):
    from openrlhf_lsc import estimate

    rng = random.Random(0)
    prompts = [text(rng, rng.randint(8, 40)) + "?" for _ in range(num_prompts)]
    # Response lengths vary like real samples: from a few tokens to a few hundred.
    samples = {p: [text(rng, rng.randint(2, 150)) for _ in range(k)] for p in prompts}
    sampler = lambda ps, kk: [samples[p] for p in ps]  # noqa: E731  (pre-drawn: time scoring only)
    flat_p = [p for p in prompts for _ in range(k)]
    flat_r = [r for p in prompts for r in samples[p]]
    rm.batch_size = batch_size
    methods, levels = {"rm": "quantile"}, [0.5, 0.85]
    times = {"estimator": [], "plain": [], "estimator_cpu": [], "plain_cpu": []}
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        records = estimate.score_prompts(prompts, sampler, {"rm": rm}, methods, k, levels)
        times["estimator"].append(time.perf_counter() - t)
        times["estimator_cpu"].append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        plain = plain_forward(rm, flat_p, flat_r, batch_size)
        times["plain"].append(time.perf_counter() - t)
        times["plain_cpu"].append(time.process_time() - c)
    # Same numbers either way (bf16: padding changes a score by an ulp at most).
    mean_plain = torch.tensor(plain).view(num_prompts, k).double().mean(1)
    mean_est = torch.tensor([r["rm"]["mean"] for r in records])
    med = {key: statistics.median(v) for key, v in times.items()}
    return {
        "pairs": len(flat_p),
        "batch_size": batch_size,
        "estimator_s": med["estimator"],
        "plain_s": med["plain"],
        "estimator_pairs_per_s": len(flat_p) / med["estimator"],
        "plain_pairs_per_s": len(flat_p) / med["plain"],
        "throughput_ratio": med["plain"] / med["estimator"],
        # CPU seconds of this process: steadier than wall time when other jobs share the machine.
        "estimator_cpu_s": med["estimator_cpu"],
        "plain_cpu_s": med["plain_cpu"],
        "throughput_ratio_cpu": med["plain_cpu"] / med["estimator_cpu"],
        "wall_times": {key: times[key] for key in ("estimator", "plain")},
        "max_abs_mean_diff": (mean_plain - mean_est).abs().max().item(),
    }


def bench_scaling(sampler, rm, grid, save):
    from openrlhf_lsc import estimate

    rng = random.Random(1)
    estimate.estimate_references(["warm up"], sampler, {"rm": rm}, k=2)  # one-time costs out of the first row
    rows = []
    for num_prompts, k in grid:
        prompts = [text(rng, rng.randint(8, 40)) + "?" for _ in range(num_prompts)]
        torch.manual_seed(0)
        t = time.perf_counter()
        estimate.estimate_references(prompts, sampler, {"rm": rm}, method="quantile", q=0.85, k=k)
        s = time.perf_counter() - t
        rows.append({"prompts": num_prompts, "k": k, "seconds": s, "ms_per_sample": 1000 * s / (num_prompts * k)})
        print(f"  prompts {num_prompts:4d}  k {k:3d}  {s:7.2f} s  {rows[-1]['ms_per_sample']:7.1f} ms/sample", flush=True)
        save(rows)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="prompts in the scoring benchmark")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt in the scoring benchmark")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the RM/policy built from a config")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=32, help="scaling benchmark: response budget")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="a small scaling grid (checks the command)")
    ap.add_argument("--out", default=None, help="write results as JSON here (after each part)")
    opt = ap.parse_args()
    result = {"config": vars(opt), "threads": torch.get_num_threads(),
              "device_name": torch.cuda.get_device_name() if opt.device == "cuda" else "cpu"}

    def save(**parts):
        result.update(parts)
        if opt.out:
            Path(opt.out + ".tmp").write_text(json.dumps(result, indent=1))
            Path(opt.out + ".tmp").replace(opt.out)

    from transformers import AutoModelForCausalLM

    from openrlhf.utils import get_tokenizer
    from openrlhf_lsc.integration.offline import LocalRewardModel
    from openrlhf_lsc.integration.samplers import HFSampler

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_models(root, opt.hidden, opt.layers)
        rm = LocalRewardModel(str(root / "rm"), attn_implementation="sdpa", batch_size=opt.batch_size)
        rm.model.to(opt.device)
        print(f"scoring: {opt.prompts} prompts x k={opt.k}, RM hidden {opt.hidden} x {opt.layers} layers", flush=True)
        scoring = bench_scoring(rm, opt.prompts, opt.k, opt.batch_size, opt.repeats)
        print(f"  estimator {scoring['estimator_pairs_per_s']:.1f} pairs/s, plain forward "
              f"{scoring['plain_pairs_per_s']:.1f} pairs/s -> ratio {scoring['throughput_ratio']:.2f}x wall, "
              f"{scoring['throughput_ratio_cpu']:.2f}x CPU time (target >= 0.9), "
              f"max |mean diff| {scoring['max_abs_mean_diff']:.2e}", flush=True)
        save(scoring=scoring)

        tok = get_tokenizer(str(root / "policy"), None, "left", None)
        policy = AutoModelForCausalLM.from_pretrained(str(root / "policy"), dtype=torch.bfloat16).to(opt.device).eval()
        sampler = HFSampler(policy, tok, max_new_tokens=opt.max_new_tokens, batch_size=8)
        print(f"scaling (HF generate, {opt.max_new_tokens} new tokens, same RM):", flush=True)
        grid = [(2, 2), (2, 4)] if opt.quick else [(4, k) for k in (2, 4, 8, 16)] + [(p, 4) for p in (2, 8, 16)]
        bench_scaling(sampler, rm, grid, lambda rows: save(scaling=rows))
    print(json.dumps(result["scoring"], indent=1))


if __name__ == "__main__":
    main()
