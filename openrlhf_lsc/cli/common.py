"""What every CLI shares: one-line errors, negative numbers as flag values, flag types that check values where they
are parsed, the `--lsc.*` flags of a `RewardSpec` (train_ppo_ray and rerank), and, for the offline tools
(`estimate_reference`, `rerank`, `select_rehearsal`), their parser, checks of paths before anything loads and atomic
output sets. Imports nothing heavy at parse time (torch only through the reward constants).

User errors print `<tool>: error: <what>` and exit 2, as argparse does; `--debug` shows the traceback.
"""

import argparse
import codecs
import json
import math
import os
import re
import shutil
import string
import sys
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from openrlhf_lsc.rewards import AGGREGATES, REFERENCES, TRANSFORMS, RewardSpec
from openrlhf_lsc.serve_rm import RewardServerError

USER_ERRORS = (ValueError, RewardServerError)
# argparse reads "-1,2", "-.5" in a list or "-1e3" as an unknown option: a dash then a digit, a dot and a digit, or
# inf/nan is a value (no flag of these CLIs starts that way)
NEGATIVE = re.compile(r"^-(\d|\.\d|inf|nan)", re.I)
DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".py")
NEWLINE = b"\n"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows every optional flag's default (lists comma-separated)."""

    def _get_help_string(self, action):
        if action.required or action.default is argparse.SUPPRESS:
            return action.help
        if isinstance(action.default, list):
            return f"{action.help} (default: {','.join(map(str, action.default)) or 'none'})"
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`<tool>: error: ...`, exit 2), negative numbers as flag values, a
    `--debug` flag, and OpenRLHF's dotted flags turned into nested namespaces (`args.data.input_key`)."""

    def __init__(self, tool: str, description: str):
        super().__init__(prog=f"python -m openrlhf_lsc.cli.{tool}", description=description, formatter_class=Formatter,
                         allow_abbrev=False)
        self.tool = tool
        self.add_argument("--debug", action="store_true", help="on an error, also print the Python traceback")

    def error(self, message: str):
        error_exit(self.tool, message)

    def parse(self, argv: Optional[Sequence[str]] = None):
        """Parse `argv` (default sys.argv[1:]) and hierarchize it as OpenRLHF's CLIs do."""
        from openrlhf_lsc.integration.stock_cli import hierarchize

        argv = list(sys.argv[1:] if argv is None else argv)
        return hierarchize(self.parse_args(glue_negative_values(argv, self._actions)))


def error_exit(tool: str, message: str):
    """A user error: one line `<tool>: error: <message>` on stderr, exit 2 (argparse's convention, no usage)."""
    sys.stderr.write(f"{tool}: error: {message}\n")
    sys.exit(2)


def glue_negative_values(argv: Sequence[str], actions: Sequence[argparse.Action]) -> List[str]:
    """`--flag -1,2` -> `--flag=-1,2` for the one-value flags among `actions`, so argparse reads the value as one."""
    one_value = {s for a in actions if a.nargs is None for s in a.option_strings}
    out: List[str] = []
    for token in argv:
        if out and out[-1] in one_value and NEGATIVE.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def guard(tool: str, debug: bool, run: Callable):
    """Run `run()`; a user error (ValueError, RewardServerError) becomes one line on stderr and exit 2."""
    try:
        return run()
    except USER_ERRORS as e:
        if debug:
            raise
        sys.stderr.write(f"{tool}: error: {e}\n")
        sys.exit(2)


# ------------------------------------------------------------------------------------------- flag types


def number(low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float within [low, high] (open ends with low_open / high_open)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (low is not None and (v <= low if low_open else v < low)) or (
            high is not None and (v >= high if high_open else v > high)
        ):
            raise argparse.ArgumentTypeError(f"expected a number in {_interval(low, high, low_open, high_open)}, got {text}")
        return v

    return parse


def integer(low: int = 0) -> Callable[[str], int]:
    """argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v

    return parse


def listed(kind: Callable[[str], object], what: str = "values") -> Callable[[str], list]:
    """argparse type: comma-separated values, each parsed by `kind` (a flag type or str)."""

    def parse(text: str) -> list:
        items = [v.strip() for v in text.split(",")]
        if not text.strip() or any(not v for v in items):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} with none empty, got {text!r}")
        out = []
        for v in items:
            try:
                out.append(kind(v))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"item {v!r} of {text!r}: {e}" if len(items) > 1 else str(e)) from None
        return out

    return parse


def add_reward_flags(a: Callable, transform: str, reference: str, group: str) -> None:
    """The `--lsc.*` flags of a `RewardSpec` (`a`: a parser's add_argument), one definition for train_ppo_ray and
    rerank; `transform`, `reference`: their defaults; `group`: what a group reference takes its quantile over."""
    a("--lsc.transform", choices=TRANSFORMS, default=transform,
      help="per reward: raw r; lsc log sigmoid(r - r_ref(x)); center r - r_ref(x); logsigmoid log sigmoid(r); "
      "sigmoid sigmoid(r - r_ref(x)); par: mean of sigmoid(r - r_ref,m) over --lsc.par_m SFT reference scores (PAR)")
    a("--lsc.aggregate", choices=AGGREGATES, default="and",
      help="and: sum of the K utilities (logical AND with lsc); weighted: sum_k w_k u_k; gdpo: each utility "
      "z-scored within its prompt's samples, then summed (--lsc.weights optional)")
    a("--lsc.weights", type=listed(number(), "weights"), default=None,
      help="K comma-separated weights for --lsc.aggregate weighted (or gdpo)")
    a("--lsc.reference", choices=REFERENCES, default=reference,
      help="r_ref(x): label = per prompt from the --data.label_key field (schema: openrlhf_lsc.references, written by "
      f"estimate_reference); group = the --lsc.quantile of {group} (moving, not the paper's SFT reference); "
      "constant = --lsc.reference_value")
    a("--lsc.quantile", type=number(), default=None,
      help="quantile in (0, 1) for --lsc.reference group; unset there: 0.5, the median")
    a("--lsc.reference_value", type=listed(number(), "values"), default=None,
      help="K comma-separated constants for --lsc.reference constant")
    a("--lsc.par_m", type=integer(1), default=None,
      help="M, the SFT reference scores per prompt of --lsc.transform par with --lsc.reference label (read from each "
      "label's par_scores, written by estimate_reference --ref.par_m); unset there: 10")


def reward_spec(names: Sequence[str], lsc, label_key: str) -> RewardSpec:
    """The `RewardSpec` of the `add_reward_flags` values in `lsc` (a namespace or dict); raises ValueError naming
    the flag."""
    v = lsc if isinstance(lsc, dict) else vars(lsc)
    return RewardSpec(names=tuple(names), transform=v["transform"], aggregate=v["aggregate"], weights=v["weights"],
                      reference=v["reference"], quantile=v["quantile"], reference_value=v["reference_value"],
                      label_key=label_key, par_m=v["par_m"])


def _interval(low, high, low_open, high_open) -> str:
    left = "-inf" if low is None else f"{low:g}"
    right = "inf" if high is None else f"{high:g}"
    return f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"


# ------------------------------------------------------------------------------------------- path checks


def check_template(flag: str, template: Optional[str]) -> None:
    """An input template must contain `{}` once, where the prompt goes (as OpenRLHF's `template.format`)."""
    if template is None:
        return
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"{flag} {template!r} is not a format string ({e}); write literal braces as {{{{ and }}}}") from None
    if fields != [""]:
        raise ValueError(f"{flag} {template!r} must contain {{}} exactly once, where the prompt goes "
                         f"(found {len(fields)} fields), e.g. 'User: {{}}\\nAssistant: '")


def check_dataset(flag: str, value: str) -> None:
    """Each comma-separated dataset OpenRLHF would load (`path[@data_dir]`) exists locally or is a hub id."""
    for part in value.split(","):
        path = part.split("@")[0].strip()
        if not path:
            raise ValueError(f"{flag} {value!r} names an empty dataset")
        if os.path.splitext(path)[1].lower() in DATA_EXTENSIONS:
            if not os.path.isfile(path):
                raise ValueError(f"{flag}: no such file {path}")
            if os.path.getsize(path) == 0:
                raise ValueError(f"{flag}: {path} is empty")
            if not os.access(path, os.R_OK):
                raise ValueError(f"{flag}: {path} is not readable")
            if path.lower().endswith((".json", ".jsonl", ".csv")):
                check_utf8(flag, path)
        elif not os.path.exists(path) and not HUB_ID.match(path):
            raise ValueError(f"{flag}: no such file or folder {path} (and not a Hugging Face dataset id owner/name)")


def check_utf8(flag: str, path: str) -> None:
    """A text file must be UTF-8 (`datasets` would load other bytes and fail later, far from the file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                where = f"line {line + e.object[: e.start].count(NEWLINE)}"
                raise ValueError(f"{flag}: {path} is not UTF-8 text ({e.reason} on {where}); save it as UTF-8") from None
            if not chunk:
                return
            line += chunk.count(NEWLINE)


def check_model(flag: str, path: str) -> None:
    """A model is a local folder with a config.json, or a Hugging Face hub id (owner/name) to download."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{flag}: {path} has no config.json: not a Hugging Face model folder")
    elif os.path.exists(path):
        raise ValueError(f"{flag}: {path} is a file; expected a model folder or a Hugging Face id owner/name")
    elif not HUB_ID.match(path):
        raise ValueError(f"{flag}: no such model folder {path} (and not a Hugging Face model id owner/name)")


def check_reward_model(flag: str, path: str, value_head_prefix: str = "score", prefix_flag: str = "--ds.value_head_prefix") -> None:
    """A local reward-model checkpoint must hold the value head `<prefix>.weight`: a causal LM given instead
    would load with a randomly initialised head and score noise."""
    check_model(flag, path)
    if not os.path.isdir(path):
        return  # a hub id: checked when it loads
    names = _tensor_names(path)
    if names is None:
        raise ValueError(f"{flag}: {path} holds no model weights (*.safetensors or pytorch_model*.bin)")
    if not any(n == f"{value_head_prefix}.weight" or n.endswith(f".{value_head_prefix}.weight") for n in names):
        heads = sorted({n.rsplit(".", 2)[0] for n in names if n.endswith(".weight") and "." not in n[: -len(".weight")]})
        raise ValueError(
            f"{flag}: {path} has no value head '{value_head_prefix}.weight' (top-level weights: {heads[:6]}): "
            "it is not a reward model (a causal LM would get a random head); give a reward-model checkpoint "
            f"or set {prefix_flag} to its head's name"
        )


def _tensor_names(path: str) -> Optional[List[str]]:
    folder = Path(path)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return list(json.loads((folder / index).read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        names = []
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                names += list(st.keys())
        return names
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        import torch

        return [n for b in bins for n in torch.load(b, map_location="meta", weights_only=True, mmap=True)]
    return None


def check_output_dir(flag: str, path: str) -> None:
    """The output folder exists and is writable, or can be created (its nearest existing parent is writable)."""
    p = Path(path).absolute()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{flag}: {path} exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"{flag}: {path} is not writable")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag}: cannot create {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot create {path}: {parent} is not writable")


# ---------------------------------------------------------------------------------------- output sets


def publish(out: Path, write: Callable[[Path], None]) -> List[str]:
    """Replace the set of output files in `out` all at once.

    `write(folder)` writes the new files into a fresh hidden folder in `out`. Each output `out/NAME` is a
    symlink to `current/NAME`, and `out/current` is a symlink to the newest complete folder, replaced by one
    atomic rename. A crash (even kill -9) at any moment leaves readers either the old complete set or the
    new complete set; leftovers of an interrupted run are removed by the next one.

    Returns:
        the names written.
    """
    out.mkdir(parents=True, exist_ok=True)
    current = out / "current"
    kept = os.readlink(current) if current.is_symlink() else None
    for stale in out.glob(".*"):  # folders and links of runs killed before they were published
        if stale.name.startswith(".set-") and stale.name != kept and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        elif ".link-" in stale.name and stale.is_symlink():
            stale.unlink()
    folder = out / f".set-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    write(folder)
    names = sorted(p.name for p in folder.iterdir())
    for name in names:
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)
    for name in names:  # out/NAME -> current/NAME, made once; dangling (absent) until current holds NAME
        link = out / name
        if not (link.is_symlink() and os.readlink(link) == f"current/{name}"):
            if link.is_dir() and not link.is_symlink():
                raise ValueError(f"cannot write {link}: a folder of that name is in the way")
            _symlink(f"current/{name}", link)
    _symlink(folder.name, current)  # the switch
    _fsync_dir(out)
    if kept:
        shutil.rmtree(out / kept, ignore_errors=True)
    for link in out.iterdir():  # outputs of the old set the new one does not have
        if link.is_symlink() and os.readlink(link).startswith("current/") and not link.exists():
            link.unlink()
    return names


def unpublish(out: Path) -> None:
    """Remove an output set made by `publish` (links, `current`, its folders)."""
    for p in list(out.iterdir()) if out.is_dir() else []:
        if p.is_symlink() and (p.name == "current" or os.readlink(p).startswith("current/")):
            p.unlink()
        elif p.name.startswith(".set-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.link-{uuid.uuid4().hex[:8]}")
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic, and replaces a regular file left by an older version too


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
