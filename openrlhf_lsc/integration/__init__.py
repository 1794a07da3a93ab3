"""The only place openrlhf_lsc touches OpenRLHF.

`register()` installs the plugin into the OpenRLHF of one process. It runs in the plugin CLIs' driver, in every
Ray worker through Ray's `worker_process_setup_hook` (`setup_worker`), or, on an OpenRLHF with `patches/`
applied, through the `openrlhf.plugins` entry point. It is idempotent and checks the OpenRLHF version and the
signature of every function it wraps, failing loudly when OpenRLHF changes. Each patch does nothing unless its
flags are set (`args.lsc` / `args.am`, attached by the CLIs): a stock launch runs exactly as stock.

`StockCLI` reads a stock OpenRLHF CLI's `if __name__ == "__main__":` block without importing the module, so the
plugin CLIs build stock's own parser, run stock's own post-parse checks, and only then import OpenRLHF's
trainer (which needs flash-attn / vLLM) and call stock's `train(args)`.
"""

import argparse
import ast
import functools
import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.version import Version

SUPPORTED = (Version("0.11.2"), Version("0.12"))
SETUP_HOOK = "openrlhf_lsc.integration.setup_worker"
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


class StockCLI:
    """A stock OpenRLHF CLI (e.g. `openrlhf.cli.train_ppo_ray`) with a plugin's flags, run as its `__main__` would.

    Stock's `__main__` block is: parser statements; `args = parser.parse_args()`; `args = hierarchize(args)`;
    stock's checks; `train(args)`. It is read from the installed source (ast), so `parse()` and `check()` import
    neither the module nor OpenRLHF's trainer (no flash-attn / vLLM needed); `train()` imports the module and
    calls its `train(args)`.

    Args:
        module: the stock CLI module.
        prog: the plugin CLI's name in usage and error lines.
        prefix: the plugin's flag prefix ("--lsc."); `add_flags(parser)` adds those flags to stock's parser.
    """

    def __init__(self, module: str, prog: str, prefix: str, add_flags):
        self.module, self.prog, self.prefix, self.add_flags = module, prog, prefix, add_flags
        source = Path(importlib.util.find_spec(module).origin)
        tree = ast.parse(source.read_text(), str(source))
        mains = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
        lines = [ast.unparse(s) for s in mains[0].body] if mains else []
        try:
            parse, end = lines.index("args = parser.parse_args()"), lines.index("args = hierarchize(args)")
        except ValueError:
            parse = end = -1
        if parse < 0 or lines[parse + 1 : end] != ["from openrlhf.utils.config import hierarchize"] or lines[-1] != "train(args)":
            raise RuntimeError(
                f"openrlhf_lsc cannot read the __main__ block of {source} (parse_args, hierarchize, train(args)): "
                "OpenRLHF changed; use a matching openrlhf_lsc"
            )
        build, checks = mains[0].body[:parse], mains[0].body[end + 1 : -1]
        # The module-level imports these statements use (argparse, datetime, ...), not the trainer imports.
        used = {n.id for s in build + checks for n in ast.walk(s) if isinstance(n, ast.Name)}
        imports = [
            type(node)(**{**node.__dict__, "names": [alias]})
            for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
            if (alias.asname or alias.name.split(".")[0]) in used
        ]
        self._build = compile(ast.Module(imports + build, []), str(source), "exec")
        self._checks = compile(ast.Module(imports + checks, []), str(source), "exec")

    def parser(self) -> argparse.ArgumentParser:
        """Stock's parser (built by stock's own statements) plus the plugin's flags; --help shows every default."""
        scope = {}
        exec(self._build, scope)
        parser = scope["parser"]
        self.add_flags(parser)
        parser.prog = self.prog
        parser.usage = f"{self.prog} [stock {self.module} flags] [{self.prefix}* flags]"
        for action in parser._actions:
            if action.option_strings and action.default is not argparse.SUPPRESS and "%(default)" not in (action.help or ""):
                action.help = f"{action.help or ''} (default: %(default)s)".strip()
        parser.error = self.error
        return parser

    def error(self, message: str):
        """A user error: one line `<tool>: error: <message>`, exit 2 (argparse's convention, without the usage)."""
        print(f"{self.prog.rsplit('.', 1)[-1]}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def parse(self, argv: list) -> dict:
        """The parsed flags, {dest: value}. `--lsc.weights -1,1` works: "-1,1" is glued to its plugin flag."""
        parser = self.parser()
        flags = {s for a in parser._actions for s in a.option_strings if s.startswith(self.prefix)}
        glued = []
        for token in argv:
            if glued and glued[-1] in flags and token.startswith("-") and token[1:2].isdigit():
                glued[-1] = f"{glued[-1]}={token}"
            else:
                glued.append(token)
        return vars(parser.parse_args(glued))

    def check(self, flat: dict):
        """OpenRLHF's `hierarchize` of the parsed flags, then stock's own post-parse checks and defaults."""
        scope = {"args": _hierarchize()(argparse.Namespace(**flat))}
        exec(self._checks, scope)
        return scope["args"]

    def require(self, *packages: str) -> None:
        """Stop with one line when OpenRLHF's trainer cannot import here (no flash-attn / vLLM on a CPU install)."""
        missing = [name for name in packages if importlib.util.find_spec(name) is None]
        if missing:
            self.error(f"{self.module} needs {' and '.join(missing)}, not installed here: on a CUDA machine "
                       "pip install 'openrlhf_lsc[gpu]' (OpenRLHF with vLLM and flash-attn)")

    def train(self, args) -> None:
        importlib.import_module(self.module).train(args)


@functools.lru_cache(maxsize=None)
def _hierarchize():
    # OpenRLHF's own function, loaded from its file: importing openrlhf.utils would load DeepSpeed & co (~15 s).
    path = Path(importlib.util.find_spec("openrlhf").submodule_search_locations[0]) / "utils" / "config.py"
    spec = importlib.util.spec_from_file_location("openrlhf_lsc._openrlhf_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hierarchize


def register() -> None:
    """Install every openrlhf_lsc hook into the OpenRLHF of this process (idempotent).

    A part whose OpenRLHF code needs a package this process lacks (vLLM for PPO on a reward-model trainer, say)
    is skipped: that OpenRLHF code cannot run here either.
    """
    global _registered
    if _registered:
        return
    check_openrlhf_version()
    for part in ("ppo", "rehearsal", "reward_model"):
        try:
            module = importlib.import_module(f"openrlhf_lsc.integration.{part}")
            module.apply()
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

