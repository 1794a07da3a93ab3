"""Test-only stand-in for Ray on the GPU check machine, which has no Ray (its wheel is too large to carry).

OpenRLHF's trainer modules import Ray at module level and decorate their actor classes with `ray.remote`;
the GPU suite only uses the plain classes and functions those modules define (ActorPPOTrainer,
compute_advantages_and_returns, ...), never a Ray call. `remote` returns the class itself (with the
`__ray_metadata__.modified_class` the plugin patches); every other call raises. Only put on sys.path when
`import ray` fails (tests/gpu/conftest.py, benchmarks/gpu_check.sh).
"""

from types import SimpleNamespace

from . import util  # noqa: F401

__lsc_stub__ = True


def remote(*args, **kwargs):
    def decorate(cls):
        cls.__ray_metadata__ = SimpleNamespace(modified_class=cls)
        return cls

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    return decorate


def is_initialized():
    return False


def _no_ray(*args, **kwargs):
    raise RuntimeError("Ray is not installed here: the GPU suite's stand-in only lets OpenRLHF's modules import")


init = get = put = wait = get_gpu_ids = _no_ray
