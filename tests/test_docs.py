"""The documentation cannot rot: README.md and docs/*.md are checked against the code.

- Every ```python block runs (a block that needs a GPU, a network or another framework's training run is ```text).
- Every documented command line of the plugin (`python -m openrlhf_lsc.…`, `deepspeed --module openrlhf_lsc.…`, in
  bash blocks and in inline code) goes through that CLI's own parser and its own checks, nothing started: the plugin
  PPO / RM CLIs through `StockCLI` (stock OpenRLHF's parser and checks plus the plugin's), the offline tools through
  `build_parser()` and `check_args`, the lab and the autoloader through their argparse. Placeholders: `$NAME` is a file
  or model folder that exists (tests/test_examples.py's `user_files`, plus a few here), `--flag <...>` a model folder,
  and `...` or any other `<...>` stands for "your other flags", filled with what that CLI requires.
  A bash block followed by a text block `<tool>: error: …` must fail with exactly that line. The offline tools'
  example scripts pass their CLIs' checks the same way (tests/test_examples.py covers the PPO and RM ones).
- Every dotted flag a page names (`--lsc.quantile`, `--reward.clip_range`, `--lsc.monitor.*`) is a flag of one of the
  plugin's CLIs (stock OpenRLHF's flags included).
- Every relative link reaches a file and its `#anchor` a heading; every repository path in code exists.
- README's "Where things live" covers every `--lsc.*` / `--am.*` flag; every extra a page installs is in setup.py;
  setup.py's version is the package's and CHANGELOG.md's newest, its OpenRLHF range the one the patches check.
"""

import argparse
import importlib
import importlib.util
import re
import runpy
import shlex
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
from test_examples import Parsed, module_argv, parse_ppo, parse_rm, record, user_files

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SPAN = re.compile(r"`((?:[^`\n]|\n(?!\n))+)`")  # inline code, within a paragraph
MODULE = re.compile(r"(?:^|\s)(?:-m|--module)\s+(openrlhf_lsc[\w.]*)")
ERROR_LINE = re.compile(r"^\S+: error: ")
VAR = re.compile(r"\$\{?([A-Za-z_]\w*)\}?")
FLAG = re.compile(r"(?<![\w.-])--[a-z]\w*(?:\.(?:\w+|\*|\{[\w,]+\}))+")
REPO_PATH = re.compile(r"^(?:\.ci|benchmarks|docs|examples|openrlhf_lsc|patches|tests)/[\w./-]*$")
GENERATED = {"benchmarks/gpu_wheels"}  # written by benchmarks/build_gpu_wheels.sh, git-ignored
OFFLINE = {"openrlhf_lsc.cli.estimate_reference", "openrlhf_lsc.cli.rerank", "openrlhf_lsc.cli.select_rehearsal"}
# What a command with "..." gets when it lacks it: (any of these flags / arguments, what to add).
REQUIRED = {
    "openrlhf_lsc.cli.train_ppo_ray": [
        (("--actor.model_name_or_path",), "--actor.model_name_or_path $SFT"),
        (("--reward.model_name_or_path", "--lsc.reward_models", "--reward.remote_url", "--train.agent_func_path"),
         "--reward.model_name_or_path $RM"),
    ],
    "openrlhf_lsc.cli.train_rm": [(("--model.model_name_or_path",), "--model.model_name_or_path $SFT"),
                                  (("--data.dataset",), "--data.dataset $DATASET")],
    "openrlhf_lsc.cli.select_rehearsal": [
        (("--data.dataset",), "--data.dataset $DATASET"), (("--select.n_clusters",), "--select.n_clusters 2"),
        (("--select.rehearsal_k",), "--select.rehearsal_k 1"), (("--output.dir",), "--output.dir $OUT"),
        (("--score.key", "--score.model", "--score.url"), "--score.model $AM"),
        (("--select.ppo_threshold", "--select.ppo_fraction"), "--select.ppo_fraction 0.5"),
    ],
    "openrlhf_lsc.lab": [(("--quick", "--full", "--smoke", "--evaluate"), "--smoke"), (("--out",), "--out $OUT")],
    "openrlhf_lsc.lab.am_vs_bt": [(("--out",), "--out $OUT")],
    "openrlhf_lsc.lab.forgetting": [(("--out",), "--out $OUT")],
    "openrlhf_lsc.integration.autoload": [(("install", "uninstall"), "install")],
}
for _tool in ("estimate_reference", "rerank"):
    REQUIRED[f"openrlhf_lsc.cli.{_tool}"] = [
        (("--data.prompt_dataset",), "--data.prompt_dataset $PROMPTS"),
        (("--actor.model_name_or_path",), "--actor.model_name_or_path $SFT"),
        (("--rm.paths",), "--rm.paths $RM"), (("--output.dir",), "--output.dir $OUT"),
    ]


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _blocks(page: Path) -> list:
    text = page.read_text()
    return [(m.group(1), m.group(2), _line(text, m.start())) for m in FENCE.finditer(text)]


def _prose(page: Path) -> str:
    """The page without its fenced blocks (line numbers kept)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text())


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _collect():
    """(python blocks, command lines, expected errors): each entry starts with its `page:line` id."""
    python, commands, errors = [], [], []
    for page in PAGES:
        blocks = _blocks(page)
        for i, (lang, body, line) in enumerate(blocks):
            where = f"{_name(page)}:{line}"
            if lang == "python":
                python.append((where, body))
            if lang not in ("bash", "sh", "shell"):
                continue
            lines = [c for c in body.replace("\\\n", " ").splitlines() if MODULE.search(c)]
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            if nxt and nxt[0] == "text" and ERROR_LINE.match(nxt[1]):
                assert len(lines) == 1, f"{where}: a bash block followed by an error holds one command"
                errors.append((where, lines[0], nxt[1].strip()))
            else:
                commands += [(where, c) for c in lines]
        prose = _prose(page)
        for m in SPAN.finditer(prose):
            if MODULE.search(m.group(1)):
                commands.append((f"{_name(page)}:{_line(prose, m.start())}", m.group(1)))
    return python, commands, errors


PYTHON, COMMANDS, ERRORS = _collect()


def _ids(entries):
    seen = {}
    out = []
    for entry in entries:
        seen[entry[0]] = seen.get(entry[0], 0) + 1
        out.append(entry[0] if seen[entry[0]] == 1 else f"{entry[0]}#{seen[entry[0]]}")
    return out


# --------------------------------------------------------------------------------------------- (a) python


def test_pages_have_examples():
    assert len(PAGES) > 10 and PYTHON and COMMANDS and ERRORS


@pytest.mark.parametrize("where, code", PYTHON, ids=_ids(PYTHON))
def test_python_block_runs(where, code):
    exec(compile(code, where, "exec"), {"__name__": "docs"})


# ----------------------------------------------------------------------------------------- (b) commands


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's folder (the working directory of every command): each placeholder is a file or folder that exists."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("docs") / "user"
    values = user_files(root)
    for var in ("AM", "JUDGE", "CKPT"):
        values[var] = str(root / "models" / var.lower())
        Path(values[var]).mkdir(parents=True)
        (Path(values[var]) / "config.json").write_text("{}")
    for folder in (root / "models").iterdir():  # policies have an LM head, reward models a value head
        head = "lm_head.weight" if folder.name in ("sft", "model", "ckpt") else "score.weight"
        save_file({head: torch.zeros(1, 2)}, str(folder / "model.safetensors"))
    values["DATA"] = values["DATASET"]
    values["AGENT"] = str(root / "agent.py")
    Path(values["AGENT"]).write_text("async def step(*args, **kwargs):\n    return {}\n")
    values["ANY"] = values["MODEL"]
    (root / "examples").symlink_to(ROOT / "examples")  # commands may name the repository's examples
    return root, values


def _argv(command: str, values: dict, where: str):
    """(module, argv) of a documented command line, its placeholders filled in."""
    command = re.sub(r"(--[\w.-]+)\s+<[^<>]*>", r"\1 $ANY", command)
    command = re.sub(r"<[^<>]*>", " ... ", command)
    tokens = shlex.split(command, comments=True)
    start = next(i for i, t in enumerate(tokens[:-1])
                 if t in ("-m", "--module") and tokens[i + 1].startswith("openrlhf_lsc"))
    module, rest = tokens[start + 1], tokens[start + 2 :]
    for i, t in enumerate(rest):
        if t in ("&&", "||", ";", "|"):
            rest = rest[:i]
            break
    partial = not rest or "..." in rest
    argv = [t for t in rest if t != "..."]
    if partial:
        for names, add in REQUIRED.get(module, []):
            if not any(t in names or t.split("=")[0] in names for t in argv):
                argv += add.split()

    def fill(m):
        if m.group(1) not in values:
            pytest.fail(f"{where}: unknown placeholder ${m.group(1)} (known: {', '.join(sorted(values))})")
        return values[m.group(1)]

    return module, [VAR.sub(fill, t) for t in argv]


def _run(module: str, argv: list, monkeypatch) -> None:
    """Parse `argv` as `python -m module` would and run the CLI's checks; stop before anything starts."""
    if module == "openrlhf_lsc.cli.train_ppo_ray":
        parse_ppo(argv, monkeypatch)
    elif module == "openrlhf_lsc.cli.train_rm":
        parse_rm(argv, monkeypatch)
    elif module in OFFLINE:
        from openrlhf_lsc.cli.common import guard

        cli = importlib.import_module(module)
        args = cli.build_parser().parse(argv)
        guard(cli.TOOL, False, lambda: cli.check_args(args))
    else:  # argparse in main(argv): the lab, the autoloader
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"no module {module}"
        cli = importlib.import_module(f"{module}.__main__" if spec.submodule_search_locations else module)
        parse_args = argparse.ArgumentParser.parse_args

        def parse_only(self, args=None, namespace=None):
            raise Parsed(parse_args(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        with pytest.raises(Parsed):
            cli.main(argv)


@pytest.mark.parametrize("where, command", COMMANDS, ids=_ids(COMMANDS))
def test_documented_command_parses(where, command, user, monkeypatch, capsys):
    root, values = user
    monkeypatch.chdir(root)
    module, argv = _argv(command, values, where)
    try:
        _run(module, argv, monkeypatch)
        return
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    pytest.fail(f"{where}: {' '.join(command.split())!r} exits {code}: {err[-1] if err else ''}", pytrace=False)


@pytest.mark.parametrize("where, command, expected", ERRORS, ids=_ids(ERRORS))
def test_documented_error_is_the_cli_error(where, command, expected, user, monkeypatch, capsys):
    root, values = user
    monkeypatch.chdir(root)
    module, argv = _argv(command, values, where)
    with pytest.raises(SystemExit) as e:
        _run(module, argv, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1] if err else ""
    for var, value in sorted(values.items(), key=lambda kv: -len(kv[1])):
        line = line.replace(value, f"${var}")
    assert (e.value.code, line) == (2, expected), where


@pytest.mark.parametrize("script, module", [("estimate_reference_gpu.sh", "openrlhf_lsc.cli.estimate_reference"),
                                            ("select_rehearsal.sh", "openrlhf_lsc.cli.select_rehearsal")])
def test_offline_example_passes_its_cli_checks(script, module, tmp_path, monkeypatch, capsys):
    """The offline tools' example scripts (tests/test_examples.py covers the PPO and RM ones), nothing loaded."""
    import torch
    from safetensors.torch import save_file

    files = user_files(tmp_path / "user")  # the paths record() gives the script
    monkeypatch.setenv("DATA", files["DATASET"])
    monkeypatch.setenv("AM", files["RM"])
    (argv,) = record(script, tmp_path)
    for folder in (tmp_path / "user" / "models").iterdir():
        save_file({"score.weight": torch.zeros(1, 2)}, str(folder / "model.safetensors"))
    try:
        _run(module, module_argv(argv, module), monkeypatch)
        return
    except SystemExit as e:
        code = e.code
    pytest.fail(f"examples/{script} exits {code}: {capsys.readouterr().err.strip()}", pytrace=False)


# ------------------------------------------------------------------------------------------ flag names


def _known_flags() -> set:
    from openrlhf_lsc.cli import estimate_reference, rerank, select_rehearsal, train_ppo_ray, train_rm
    from openrlhf_lsc.integration.stock_cli import StockCLI

    parsers = [
        train_ppo_ray.stock_cli().parser(),
        StockCLI("openrlhf.cli.train_rm", train_rm.PROG, "--am.", train_rm.add_flags).parser(),
        estimate_reference.build_parser(), rerank.build_parser(), select_rehearsal.build_parser(),
    ]
    return {s for p in parsers for a in p._actions for s in a.option_strings}


def _expand(pattern: str) -> list:
    """`--a.{b,c}` -> [`--a.b`, `--a.c`]."""
    m = re.search(r"\{([\w,]+)\}", pattern)
    if not m:
        return [pattern]
    return [x for part in m.group(1).split(",") for x in _expand(pattern[: m.start()] + part + pattern[m.end() :])]


def _matches(pattern: str, flag: str) -> bool:
    return flag.startswith(pattern[:-1]) if pattern.endswith(".*") else flag == pattern


@pytest.fixture(scope="module")
def known_flags():
    return _known_flags()


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_named_flags_exist(page, known_flags):
    text = "\n".join(body for lang, body, _ in _blocks(page) if lang != "python") + _prose(page)
    unknown = set()
    for m in FLAG.finditer(text):
        family = text[m.end() : m.end() + 2] == ".<"  # `--lsc.monitor.<name>`: a family
        for flag in _expand(m.group(0)):
            pattern = flag + ".*" if family else flag
            if not any(_matches(pattern, known) for known in known_flags):
                unknown.add(m.group(0))
    assert not unknown, f"{_name(page)} names flags no CLI of the plugin has: {sorted(unknown)}"


def test_where_things_live_covers_every_plugin_flag(known_flags):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    patterns = [p for row in rows for span in SPAN.findall(row) for p in _expand(span) if p.startswith("--")]
    plugin = sorted(f for f in known_flags if f.startswith(("--lsc.", "--am.")))
    assert plugin and not [f for f in plugin if not any(_matches(p, f) for p in patterns)]


# ----------------------------------------------------------------------------------------- links, paths


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set:
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _prose(page), re.M):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_links_reach_their_target(page):
    prose = SPAN.sub("``", _prose(page))
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{_name(page)}: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_repository_paths_exist(page):
    words = SPAN.findall(_prose(page)) + [
        w.strip("'\"") for lang, body, _ in _blocks(page) if lang in ("bash", "sh") for w in body.split()
    ]
    paths = {w for w in words if REPO_PATH.match(w)}
    missing = sorted(p for p in paths if p.rstrip("/") not in GENERATED and not (ROOT / p).exists())
    assert paths or page.name != "README.md"
    assert not missing, f"{_name(page)} names paths that do not exist: {missing}"


# --------------------------------------------------------------------------------------------- release


def _setup_kwargs() -> dict:
    """setup.py's arguments to `setup()`, read by running it with a recorder in place of setuptools."""
    recorded = {}
    fake = types.ModuleType("setuptools")
    fake.setup, fake.find_packages = lambda **kw: recorded.update(kw), lambda **kw: []
    with mock.patch.dict(sys.modules, {"setuptools": fake}):
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return recorded


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_installed_extras_exist(page):
    extras = set(_setup_kwargs()["extras_require"])
    text = page.read_text()
    named = {e for group in re.findall(r"(?:openrlhf_lsc|\.)\[([\w,-]+)\]", text) for e in group.split(",")}
    assert named <= extras, f"{_name(page)} installs extras setup.py lacks: {sorted(named - extras)}"


def test_release_metadata():
    """One version (the package's, CHANGELOG's newest) and the OpenRLHF range the patches check, in setup.py."""
    import openrlhf_lsc
    from openrlhf_lsc.integration import SUPPORTED

    kw = _setup_kwargs()
    newest = re.search(r"^## \[?(\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert kw["version"] == openrlhf_lsc.__version__ == newest.group(1)
    supported = f">={SUPPORTED[0]},<{SUPPORTED[1]}"
    assert supported in kw["description"] and kw["extras_require"]["gpu"] == [f"openrlhf[vllm]{supported}"]
    assert kw["long_description"] == (ROOT / "README.md").read_text()
