"""Stock OpenRLHF CLIs with a plugin's flags, and OpenRLHF's own `hierarchize` for every CLI of the plugin.

`StockCLI` reads a stock CLI's `if __name__ == "__main__":` block without importing the module, so the plugin CLIs
build stock's own parser, run stock's own post-parse checks, and only then import OpenRLHF's trainer (which needs
flash-attn / vLLM) and call stock's `train(args)`.
"""

import argparse
import ast
import functools
import importlib
import importlib.util
from pathlib import Path

from openrlhf_lsc.cli.common import error_exit, glue_negative_values


@functools.lru_cache(maxsize=None)
def _stock_hierarchize():
    # OpenRLHF's own function, loaded from its file: importing openrlhf.utils would load DeepSpeed & co (~15 s)
    # before a single flag is checked.
    path = Path(importlib.util.find_spec("openrlhf").submodule_search_locations[0]) / "utils" / "config.py"
    spec = importlib.util.spec_from_file_location("openrlhf_lsc._openrlhf_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hierarchize


def hierarchize(args: argparse.Namespace):
    """OpenRLHF's dotted flags -> nested namespace (`openrlhf.utils.config.hierarchize`, `args.data.input_key`)."""
    return _stock_hierarchize()(args)


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
        self.tool = prog.rsplit(".", 1)[-1]
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
        error_exit(self.tool, message)

    def parse(self, argv: list) -> dict:
        """The parsed flags, {dest: value}. `--lsc.weights -.5,1` works: negative values of the plugin's one-value
        flags are glued to them (stock's own flags parse as stock parses them)."""
        parser = self.parser()
        plugin = [a for a in parser._actions if any(s.startswith(self.prefix) for s in a.option_strings)]
        return vars(parser.parse_args(glue_negative_values(argv, plugin)))

    def check(self, flat: dict):
        """OpenRLHF's `hierarchize` of the parsed flags, then stock's own post-parse checks and defaults."""
        scope = {"args": hierarchize(argparse.Namespace(**flat))}
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
