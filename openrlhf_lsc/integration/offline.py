"""What the offline tools (`estimate_reference`, `rerank`, `select_rehearsal`) take from OpenRLHF: dataset loading and
prompt formatting, tokenizers and reward models (their samplers: `integration.samplers`).

Conventions follow a stock OpenRLHF PPO run, so references and scores land on the scale of the rewards PPO sees:
- prompts: OpenRLHF's dataset loading and `preprocess_data` (`--data.input_key`, `--data.input_template`,
  `--data.apply_chat_template`);
- samples (vLLM): prompt tokenized without special tokens, cut from the left to leave room for the response
  (`SingleTurnAgentExecutor`), response text decoded with special tokens kept (EOS included);
- scores: the RM sees prompt + response text, tokenized as `serve_rm` does; local RMs load through
  `get_llm_for_sequence_regression` (value head, `--reward.normalize_enable`); remote ones go through
  `openrlhf_lsc.serve_rm.ServeRMClient`.

OpenRLHF, vLLM and Ray are imported inside the functions that need them (openrlhf.models needs flash-attn,
which only GPU installs have; CPU tests put a stand-in on the path).
"""

import logging
import math
from types import SimpleNamespace
from typing import Any, List, Optional, Tuple

import torch


def load_tokenizer(path: str, flag: str) -> Any:
    """The tokenizer of a model as OpenRLHF loads it (left padding); errors name `flag`."""
    from openrlhf.utils import get_tokenizer

    try:
        return get_tokenizer(path, None, "left", None)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: cannot load its tokenizer: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_rows(dataset: str, flag: str, split: str = "train", max_count: int = int(1e8)) -> Any:
    """A dataset as `train_ppo_ray --data.prompt_dataset` reads it (OpenRLHF's `blending_datasets`).

    Args:
        dataset: JSONL/JSON/CSV/parquet file, `save_to_disk` folder or hub id (comma-separated to concatenate).
        flag: the flag naming it, for errors. split, max_count: as `--data.prompt_split`, `--data.max_samples`.

    Returns:
        `datasets.Dataset`. Unreadable data (not UTF-8, broken JSON, a missing split, no rows) raises
        ValueError naming the flag and the file.
    """
    from datasets import Dataset
    from datasets import utils as ds_utils
    from openrlhf.datasets.utils import blending_datasets

    quiet = SimpleNamespace(print=lambda *a, **k: None, is_rank_0=lambda: False, args=SimpleNamespace(use_ms=False))
    log = logging.getLogger("datasets")  # its loaders log the errors we report below, in one line
    level, bars = log.level, ds_utils.are_progress_bars_disabled()
    log.setLevel(logging.CRITICAL)
    ds_utils.disable_progress_bars()  # "Generating train split" would come before a one-line error
    try:
        rows = blending_datasets(dataset, None, quiet, max_count=max_count, dataset_split=split)
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {dataset}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except StopIteration:  # what `datasets` raises on an empty file
        raise ValueError(f"{flag} {dataset}: no rows") from None
    except AttributeError:  # blending_datasets calls .select on a DatasetDict without that split
        raise ValueError(f"{flag} {dataset}: no split {split!r}") from None
    except Exception as e:  # datasets' own errors: name the file and the underlying reason
        cause = e.__cause__ or e.__context__ or e
        if isinstance(cause, UnicodeDecodeError):
            raise ValueError(f"{flag} {dataset}: not UTF-8 text ({cause.reason} at byte {cause.start})") from None
        raise ValueError(f"{flag} {dataset}: cannot load it as a dataset: {_first_line(cause)}") from None
    finally:
        log.setLevel(level)
        if not bars:
            ds_utils.enable_progress_bars()
    if not isinstance(rows, Dataset):
        raise ValueError(f"{flag} {dataset}: no split {split!r}")
    if len(rows) == 0:
        raise ValueError(f"{flag} {dataset}: no rows")
    return rows


def row_name(i: int, row: dict, id_key: Optional[str]) -> str:
    """How errors name a dataset row: its index and, with an id field, its id."""
    return f"row {i}" + (f" ({id_key} {row[id_key]!r})" if id_key and id_key in row else "")


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
        (rows as a `datasets.Dataset`, prompt texts ("" where the input is empty), ids). A row without the
        input field, an input that is not text (or chat messages with `apply_chat_template`), or a missing or
        duplicate id raises ValueError naming the row.
    """
    from openrlhf.datasets.prompts_dataset import preprocess_data

    rows = load_rows(dataset, "--data.prompt_dataset", split, max_samples)
    template = tokenizer.apply_chat_template if apply_chat_template else None
    prompts, ids, seen = [], [], {}
    for i, row in enumerate(rows):
        where = f"--data.prompt_dataset {dataset} {row_name(i, row, id_key)}"
        if input_key not in row:
            raise ValueError(f"{where} has no field {input_key!r} (--data.input_key); fields: {sorted(row)}")
        if id_key is not None:
            if row.get(id_key) is None:
                raise ValueError(f"{where} has no field {id_key!r} (--data.id_key)")
            if row[id_key] in seen:
                raise ValueError(f"{where}: duplicate id {row[id_key]!r} (--data.id_key), first in row {seen[row[id_key]]}")
            seen[row[id_key]] = i
        raw = row[input_key]
        chat = isinstance(raw, list) and all(isinstance(m, dict) for m in raw)
        if raw is not None and not (isinstance(raw, str) or (chat and apply_chat_template)):
            need = "text or, with --data.apply_chat_template, a list of chat messages"
            raise ValueError(f"{where}: field {input_key!r} (--data.input_key) is {type(raw).__name__} {str(raw)[:40]!r}; "
                             f"expected {need}")
        empty = not raw or (isinstance(raw, str) and not raw.strip())
        prompts.append("" if empty else preprocess_data(row, input_template, input_key, None, template)[0])
        ids.append(i if id_key is None else row[id_key])
    return rows, prompts, ids


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
