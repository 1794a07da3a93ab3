"""Test-only stand-in for vLLM: the names OpenRLHF imports, no engine. Tests that need generation
use the HF-transformers rollout actor in tests/cpu_harness/fake_vllm.py."""

from dataclasses import dataclass
from typing import Optional

__version__ = "0.29.0"


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False
    n: int = 1
    seed: Optional[int] = None


class AsyncEngineArgs:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("vLLM is a test stub on this CPU machine")


class AsyncLLMEngine:
    @classmethod
    def from_engine_args(cls, *args, **kwargs):
        raise RuntimeError("vLLM is a test stub on this CPU machine")
