"""Test-only stand-in for Hugging Face `datasets` on the GPU check machine, which lacks it (its pyarrow wheel
alone is 55 MB, too large to carry). OpenRLHF's `openrlhf.datasets` imports these names at module level; the GPU
suite tokenizes its data itself and never loads a data set, so every call here raises. Put on sys.path only when
`import datasets` fails (tests/gpu/conftest.py, benchmarks/gpu_check.sh).
"""

__lsc_stub__ = True


def _no_datasets(*args, **kwargs):
    raise RuntimeError("`datasets` is not installed here: the GPU suite's stand-in only lets OpenRLHF's modules import")


class Dataset:
    from_list = from_dict = staticmethod(_no_datasets)


load_dataset = load_from_disk = interleave_datasets = _no_datasets
