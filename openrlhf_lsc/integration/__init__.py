"""The only place openrlhf_lsc touches OpenRLHF.

`register()` is the plugin entry point (group `openrlhf.plugins`, see patches/): it runs in every
process before work starts — called by a patched OpenRLHF, or on stock OpenRLHF by the plugin's
CLIs in the driver and by Ray's `worker_process_setup_hook` (`setup_worker`) in every actor. It is
idempotent and checks the OpenRLHF version and the signature of every function it wraps, failing
loudly when OpenRLHF changes.

Each patch does nothing unless its flags are set (`args.lsc` / `args.am`, attached by the CLIs), so
a stock launch in a process where the plugin is registered runs exactly as stock.
"""

import functools
import inspect
import os
import runpy
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

SUPPORTED = (Version("0.11.2"), Version("0.12"))
_registered = False


def check_openrlhf_version() -> str:
    """Return the installed OpenRLHF version; raise if it is outside the range the patches target."""
    try:
        v = version("openrlhf")
    except PackageNotFoundError:
        raise RuntimeError("openrlhf_lsc needs OpenRLHF >=0.11.2,<0.12 installed (pip install 'openrlhf>=0.11.2,<0.12')") from None
    if not SUPPORTED[0] <= Version(v) < SUPPORTED[1]:
        raise RuntimeError(
            f"openrlhf_lsc supports OpenRLHF >=0.11.2,<0.12 but found {v}: its patches target that code; "
            "install a supported OpenRLHF or an openrlhf_lsc release made for yours"
        )
    return v


def wrap(owner, name: str, expected_params, make_wrapper):
    """Replace `owner.name` by `make_wrapper(original)` once, after checking its parameter names.

    Raises RuntimeError naming the function when OpenRLHF's signature is not the one the plugin was
    written against (the wrapper would silently misbehave otherwise).
    """
    original = inspect.getattr_static(owner, name)
    if getattr(original, "__lsc_original__", None) is not None:
        return  # already wrapped in this process
    # Ray adds `_ray_trace_ctx` to actor methods; wrappers of actor methods pass **kwargs through.
    params = [p for p in inspect.signature(original).parameters if p != "_ray_trace_ctx"]
    if params != list(expected_params):
        raise RuntimeError(
            f"openrlhf_lsc cannot patch {owner.__module__}.{owner.__qualname__}.{name}: expected parameters "
            f"{list(expected_params)}, found {params}. OpenRLHF changed; use a matching openrlhf_lsc."
        )
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper.__lsc_original__ = original
    setattr(owner, name, wrapper)


def run_stock_cli(module: str, argv: list, on_args) -> None:
    """Run the stock OpenRLHF CLI `module` (e.g. "openrlhf.cli.train_rm") as __main__ with `argv`.

    `on_args(args)` gets OpenRLHF's parsed args namespace right after stock parsing (stock `__main__` calls
    `openrlhf.utils.config.hierarchize` right after `parse_args`): the plugin attaches and checks its flags
    there, before any work starts.
    """
    import openrlhf.utils.config as config

    stock = config.hierarchize

    def hierarchize(args):
        args = stock(args)
        on_args(args)
        return args

    config.hierarchize = hierarchize
    sys.argv = [module] + list(argv)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        config.hierarchize = stock


def register() -> None:
    """Install every openrlhf_lsc hook into the OpenRLHF of this process (idempotent)."""
    global _registered
    if _registered:
        return
    check_openrlhf_version()
    from openrlhf_lsc.integration import ppo, rehearsal, reward_model

    ppo.apply()
    rehearsal.apply()
    reward_model.apply()
    _registered = True


def setup_worker() -> None:
    """Ray `worker_process_setup_hook`: runs in each Ray worker before any task or actor method."""
    # CPU harnesses (tests only) can ask for their shims to load first via this variable.
    extra = os.environ.get("OPENRLHF_LSC_WORKER_PRELOAD")
    if extra:
        import importlib

        importlib.import_module(extra)
    register()
