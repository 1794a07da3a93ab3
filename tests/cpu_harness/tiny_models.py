"""Tiny models and data for CPU end-to-end runs (tests only): nothing is downloaded.

`build(root)` writes under `root`:
- `tokenizer` files inside every model dir: a byte-level BPE trained on a generated corpus;
- `policy/`: a tiny Llama causal LM (also the reference policy);
- `rm_a/`, `rm_b/`: two tiny Llama reward models (different seeds) in the layout OpenRLHF's
  `get_llm_for_sequence_regression` loads (`model.*` + value head `score.weight`);
- `prompts.jsonl`: rows `{"input": str, "lsc_ref": {"A": {"reference": float, ...}, "B": {...}}}`,
  the reference label schema of `openrlhf_lsc.references`.

Run as a script to build into a folder: `python tests/cpu_harness/tiny_models.py OUT_DIR`.
"""

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

WORDS = "the a one two three four five six seven eight nine ten plus minus is what how why good bad answer question".split()
SPECIALS = ["<pad>", "<s>", "</s>"]
REWARD_MODELS = {"A": ("rm_a", 1), "B": ("rm_b", 2)}  # name -> (folder, seed)
LABEL_KEY = "lsc_ref"


def _corpus(n: int = 400):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        idx = torch.randint(len(WORDS), (12,), generator=g).tolist()
        yield " ".join(WORDS[i] for i in idx) + "?"


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _config(tokenizer, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **extra,
    )


@torch.no_grad()
def _reward_model(tokenizer, seed: int, probe: torch.Tensor) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    rm = LlamaForSequenceClassification(_config(tokenizer, num_labels=1)).eval()
    # A random head gives rewards of order 1e-2; rescale so the probe rewards have unit spread and
    # the LSC transform is neither linear nor saturated over them.
    scores = rm(input_ids=probe).logits[:, 0]
    rm.score.weight /= scores.std()
    return rm


@torch.no_grad()
def build(root: Path, num_prompts: int = 8) -> Path:
    """Write tokenizer, policy, two reward models and the prompt file under `root`; return `root`."""
    root = Path(root)
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    policy = LlamaForCausalLM(_config(tokenizer))
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")

    g = torch.Generator().manual_seed(3)
    prompts = [f"question {i}: what is {WORDS[i % 10]} plus {WORDS[(3 * i + 1) % 10]}?" for i in range(num_prompts)]
    probe = torch.randint(3, len(tokenizer), (32, 16), generator=g)
    labels = [{} for _ in prompts]
    for name, (folder, seed) in REWARD_MODELS.items():
        rm = _reward_model(tokenizer, seed, probe)
        rm.save_pretrained(root / folder)
        tokenizer.save_pretrained(root / folder)
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            # Reference near the prompt's own score, spread so some responses beat it and some do not.
            offset = float(torch.empty(()).uniform_(-1.0, 1.0, generator=g))
            labels[i][name] = {"reference": round(float(rm(input_ids=ids).logits[0, 0]) + offset, 4), "method": "fixed"}
    with open(root / "prompts.jsonl", "w") as f:
        for prompt, label in zip(prompts, labels):
            f.write(json.dumps({"input": prompt, LABEL_KEY: label}) + "\n")
    return root


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
