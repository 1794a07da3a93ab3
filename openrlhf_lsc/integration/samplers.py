"""The offline tools' samplers, `sampler(prompts, k) -> k response texts per prompt` (`openrlhf_lsc.estimate.Sampler`):
HF `generate` in this process, or OpenRLHF's vLLM engines on GPUs. `from_args` builds the one the flags ask for.

Both return response texts ending with the EOS token when the model stopped (special tokens kept), as OpenRLHF's
rollouts do, so reward models score what PPO would show them.
"""

from typing import Any, List, Optional

import torch


def from_args(args: Any, tokenizer: Any):
    """The sampler of the `--rollout.*`, `--vllm.*`, `--ds.param_dtype` and `--actor.model_name_or_path` flags."""
    r = args.rollout
    if args.vllm.num_engines > 0:
        return VLLMSampler(
            args.actor.model_name_or_path, tokenizer, r.max_new_tokens, r.temperature, r.top_p, args.data.max_len,
            args.vllm.num_engines, args.vllm.tensor_parallel_size, args.seed, args.vllm.gpu_memory_utilization,
            args.vllm.enforce_eager,
        )
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.ds.param_dtype == "bf16" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(args.actor.model_name_or_path, dtype=dtype, trust_remote_code=True)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return HFSampler(model, tokenizer, r.max_new_tokens, r.temperature, r.top_p, args.data.max_len, r.batch_size)


def _eos_ids(model: Any, tokenizer: Any) -> List[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted(set(eos) | {tokenizer.eos_token_id})


class HFSampler:
    """A `Sampler`: k responses per prompt with a Hugging Face causal LM's `generate` (no vLLM, any device)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_len: Optional[int] = None,
        batch_size: int = 8,
    ):
        """
        Args:
            model, tokenizer: an HF causal LM and its tokenizer (with a pad token).
            max_new_tokens, temperature, top_p: as `--rollout.*`.
            max_len: prompt + response budget (`--data.max_len`); longer prompts lose their start.
            batch_size: prompts per `generate` call (each expands to k sequences).
        """
        if temperature <= 0:
            raise ValueError(f"--rollout.temperature must be > 0 to draw k different samples, got {temperature}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.max_prompt = None if max_len is None else max_len - max_new_tokens
        if self.max_prompt is not None and self.max_prompt < 1:
            raise ValueError(
                f"--data.max_len {max_len} leaves no room for a prompt with --rollout.max_new_tokens {max_new_tokens}"
            )
        self.batch_size = batch_size
        self.eos = _eos_ids(model, tokenizer)

    def decode(self, ids: List[int]) -> str:
        """Response text up to and including the first EOS, special tokens kept."""
        for j, t in enumerate(ids):
            if t in self.eos:
                ids = ids[: j + 1]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @torch.inference_mode()
    def __call__(self, prompts: List[str], k: int) -> List[List[str]]:
        """Return k sampled response texts for each prompt."""
        out = []
        device = self.model.device
        pad = self.tokenizer.pad_token_id
        for b in range(0, len(prompts), self.batch_size):
            ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[b : b + self.batch_size]]
            if self.max_prompt is not None:
                ids = [x[-self.max_prompt :] for x in ids]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            gen = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=0,  # off, as vLLM's default and OpenRLHF's --rollout.top_k -1
                max_new_tokens=self.max_new_tokens,
                min_new_tokens=1,
                num_return_sequences=k,
                pad_token_id=pad,
                eos_token_id=self.eos,
            )[:, width:].tolist()
            out += [[self.decode(gen[j * k + t]) for t in range(k)] for j in range(len(ids))]
        return out


class VLLMSampler:
    """Sample on GPUs through OpenRLHF's vLLM engines (`create_vllm_engines`, `generate_responses`)."""

    def __init__(
        self,
        pretrain: str,
        tokenizer: Any,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_len: int = 2048,
        num_engines: int = 1,
        tensor_parallel_size: int = 1,
        seed: int = 42,
        gpu_memory_utilization: float = 0.95,
        enforce_eager: bool = False,
    ):
        """Start `num_engines` vLLM Ray actors of `tensor_parallel_size` GPUs each on the policy `pretrain`.

        Engine i is seeded with seed + i once, at start (OpenRLHF's `create_vllm_engines`); prompts go to
        the engines round-robin, so samples are random but not reproducible shard by shard.
        `gpu_memory_utilization` defaults to OpenRLHF's `--vllm.gpu_memory_utilization` (0.95).
        """
        import ray
        from vllm import SamplingParams

        from openrlhf.trainer.ray.vllm_engine import create_vllm_engines

        if temperature <= 0:
            raise ValueError(f"--rollout.temperature must be > 0 to draw k different samples, got {temperature}")
        self.engines = create_vllm_engines(
            num_engines=num_engines,
            tensor_parallel_size=tensor_parallel_size,
            pretrain=pretrain,
            seed=seed,
            full_determinism=False,
            enable_prefix_caching=True,  # the k samples of a prompt share its prefix
            enforce_eager=enforce_eager,
            max_model_len=max_len,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        self.params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=-1,
            max_tokens=max_new_tokens,
            min_tokens=1,
            skip_special_tokens=False,
        )
        self.tokenizer = tokenizer
        self.tokenizer_ref = ray.put(tokenizer)  # shipped once, not with every request
        self.max_len = max_len

    def __call__(self, prompts: List[str], k: int) -> List[List[str]]:
        """Return k sampled response texts for each prompt, prompts spread round-robin over the engines."""
        import ray

        refs = [
            self.engines[i % len(self.engines)].generate_responses.remote(
                prompt=p, label="", sampling_params=self.params, max_length=self.max_len,
                hf_tokenizer=self.tokenizer_ref, num_samples=k,
            )
            for i, p in enumerate(prompts)
        ]
        out = []
        for samples in ray.get(refs):
            texts = []
            for s in samples:
                start, end = s["action_ranges"][0]
                texts.append(self.tokenizer.decode(s["observation_tokens"][start:end], skip_special_tokens=False))
            out.append(texts)
        return out
