"""The only place openrlhf_lsc touches OpenRLHF: one module per OpenRLHF part it changes.

- `reward_path`: the reward/advantage step (`RemoteExperienceMaker.compute_advantages_and_returns`): `reward_hook`
  turns the K rewards into the utility PPO trains on; `lsc/*` metrics, `--lsc.dump_rewards`.
- `reward_actor`: OpenRLHF's reward-model actor scoring K local reward models (`[b, K]` rewards).
- `monitor`: the over-optimisation monitor in the PPO trainer (`--lsc.monitor.*`), its stop.
- `rehearsal`: Selective Rehearsal's loss term in the policy actor (`--lsc.rehearsal.*`).
- `reward_model`: the Advantage Model loss and RM metrics in `train_rm` (`--am.*`).
- `launch`: the plugin CLI's run of stock `train(args)` with the plugin in every Ray worker.
- `stock_cli`: stock CLIs' own parsers and checks with the plugin's flags; OpenRLHF's `hierarchize`.
- `offline`, `samplers`: what the offline tools take from OpenRLHF (datasets, tokenizers, reward models; HF generate
  or OpenRLHF's vLLM engines).
- `autoload`: the opt-in `.pth` autoloader.

`register()` installs the patches into the OpenRLHF of one process. It runs in the plugin CLIs' driver, in every
Ray worker through Ray's `worker_process_setup_hook` (`setup_worker`), or, on an OpenRLHF with `patches/` applied,
through the `openrlhf.plugins` entry point. It is idempotent and checks the OpenRLHF version and the signature of
every function it wraps, failing loudly when OpenRLHF changes. Each patch does nothing unless its flags are set
(`args.lsc` / `args.am`, attached by the CLIs): a stock launch runs exactly as stock.
"""

import functools
import importlib
import inspect
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

SUPPORTED = (Version("0.11.2"), Version("0.12"))
SETUP_HOOK = "openrlhf_lsc.integration.setup_worker"
PARTS = ("reward_path", "reward_actor", "monitor", "rehearsal", "reward_model")  # each has apply()
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

    Raises RuntimeError naming the function when OpenRLHF's signature is not the one the plugin was written
    against (the wrapper would silently misbehave otherwise). Wrappers take `(*args, **kwargs)` and read what they
    need through `bind`, so stock's defaults stay stock's.
    """
    original = inspect.getattr_static(owner, name)
    if getattr(original, "__lsc_original__", None) is not None:
        return  # already wrapped in this process
    # Ray adds `_ray_trace_ctx` to actor methods; wrappers of actor methods pass **kwargs through.
    params = [p for p in inspect.signature(original).parameters if p != "_ray_trace_ctx"]
    if params != list(expected_params):
        where = owner.__name__ if inspect.ismodule(owner) else f"{owner.__module__}.{owner.__qualname__}"
        raise RuntimeError(
            f"openrlhf_lsc cannot patch {where}.{name}: expected parameters "
            f"{list(expected_params)}, found {params}. OpenRLHF changed; use a matching openrlhf_lsc."
        )
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper.__lsc_original__ = original
    setattr(owner, name, wrapper)


def bind(function, *args, **kwargs) -> inspect.BoundArguments:
    """A call's arguments by name with `function`'s own defaults filled in: a wrapper reads them from `.arguments`
    and calls `function(*bound.args, **bound.kwargs)`, so a default OpenRLHF changes is followed, not restated."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


def register() -> None:
    """Install every openrlhf_lsc hook into the OpenRLHF of this process (idempotent).

    A part whose OpenRLHF code needs a package this process lacks (vLLM for PPO on a reward-model trainer, say)
    is skipped: that OpenRLHF code cannot run here either.
    """
    global _registered
    if _registered:
        return
    check_openrlhf_version()
    for part in PARTS:
        try:
            importlib.import_module(f"openrlhf_lsc.integration.{part}").apply()
        except ModuleNotFoundError as e:
            if e.name not in ("vllm", "flash_attn"):
                raise
    _registered = True


def setup_worker() -> None:
    """Ray `worker_process_setup_hook`: registers the plugin in each Ray worker before any task or actor method.

    It must not initialise CUDA: OpenRLHF sets CUDA_VISIBLE_DEVICES per actor after this runs.
    """
    register()


def registered() -> bool:
    """Whether this process has the plugin registered (the probe task the CLIs run in a Ray worker)."""
    return _registered
