"""Test-only stand-in for flash-attn: importable, but its attention kernels raise."""

__version__ = "2.8.3"


def _unavailable(*args, **kwargs):
    raise RuntimeError("flash-attn is a test stub on this CPU machine; use --ds.attn_implementation eager")


flash_attn_func = flash_attn_varlen_func = _unavailable
