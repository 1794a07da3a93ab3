"""The plugin's train_ppo_ray CLI: stock launches pass through unchanged, --lsc flags are checked at parse time
(one line naming the flag, exit 2, nothing started), --help works on the CPU install."""

import json
import os
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cli_capture import Captured, as_dict, capture
from openrlhf_lsc.cli import train_ppo_ray as cli

ROOT = Path(__file__).resolve().parents[1]
# OpenRLHF's own example launches (examples/scripts/*.sh calling train_ppo_ray), captured with a recorder in
# place of python3/ray; the OpenRLHF commit is inside.
SCRIPTS = json.loads((ROOT / "tests" / "data" / "openrlhf_stock_ppo_scripts.json").read_text())["scripts"]
CPU_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # a CPU install: no flash-attn / vLLM stand-ins


def known_flags_only(argv: list) -> list:
    """The script's argv without flags OpenRLHF 0.11.2 does not know (and their values)."""
    known = {s for a in cli.stock_cli().parser()._actions for s in a.option_strings}
    out, keep = [], True
    for token in argv:
        if token.startswith("--"):
            keep = token in known
        if keep:
            out.append(token)
    return out


@pytest.fixture(scope="module")
def stock_module():
    import openrlhf.cli.train_ppo_ray as module  # the stand-ins in tests/stubs provide vllm / flash_attn

    return module


def run_stock(argv, monkeypatch, stock_module):
    """Stock's own `python -m openrlhf.cli.train_ppo_ray argv`, up to the first thing `train(args)` does."""
    import openrlhf.utils
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(openrlhf.utils, "get_strategy", capture)
    monkeypatch.setattr(sys, "argv", ["train_ppo_ray.py", *argv])
    with pytest.raises(Captured) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is in sys.modules already
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    return caught.value.args[0]


def run_plugin(argv, monkeypatch, stock_module):
    """The plugin CLI on the same argv, up to stock's `get_strategy` (stock path) or the plugin's `train`."""
    import ray

    from openrlhf_lsc.integration import launch

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(stock_module, "get_strategy", capture)
    monkeypatch.setattr(launch, "train", lambda stock, args: capture(args))
    with pytest.raises(Captured) as caught:
        cli.main(argv)
    return caught.value.args[0]


def same_args(stock_args, plugin_args) -> dict:
    """Compare the namespaces (the wandb run name carries the minute); return the plugin's extra `lsc`."""
    a, b = as_dict(stock_args), as_dict(plugin_args)
    b.pop("lsc")
    b["logger"]["wandb"]["run_name"] = a["logger"]["wandb"]["run_name"]
    assert a == b
    return plugin_args.lsc


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_stock_launch_script_passes_through_unchanged(script, monkeypatch, stock_module, capsys):
    argv = known_flags_only(SCRIPTS[script])
    stock_args = run_stock(argv, monkeypatch, stock_module)
    plugin_args = run_plugin(argv, monkeypatch, stock_module)
    assert same_args(stock_args, plugin_args) is None  # no --lsc flag: args.lsc is None, nothing else added


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_stock_launch_script_with_lsc_is_accepted_or_refused_naming_a_flag(
    script, monkeypatch, stock_module, capsys, tmp_path
):
    argv = known_flags_only(SCRIPTS[script])
    for flag in ("--reward.remote_url", "--train.agent_func_path"):  # the scripts' .py files, present here
        if flag in argv and argv[argv.index(flag) + 1].endswith(".py"):
            path = tmp_path / Path(argv[argv.index(flag) + 1]).name
            path.write_text("def reward_func(queries, prompts, labels):\n    return {}\n")
            argv[argv.index(flag) + 1] = str(path)
    lsc_flags = ["--lsc.transform", "lsc", "--lsc.reference", "constant", "--lsc.reference_value", "0"]
    stock_args = run_stock(argv, monkeypatch, stock_module)
    capsys.readouterr()
    try:
        plugin_args = run_plugin(argv + lsc_flags, monkeypatch, stock_module)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        named = [t for t in argv if t.startswith("--") and t in err]
        assert named, f"the refusal names no flag of the launch: {err}"
        # The one stock script refused: a multiplicative stop-properly penalty would reward truncation.
        assert script.endswith("train_prorlv2_math_hybrid_engine.sh") and "--reward.stop_properly_penalty_coef" in err
        return
    lsc = same_args(stock_args, plugin_args)
    assert lsc.spec.transform == "lsc" and lsc.spec.reference_value == (0.0,) and not lsc.extra_logs
    name = "agent" if stock_args.train.agent_func_path else \
        Path(stock_args.reward.remote_url[0]).stem if stock_args.reward.remote_url else "Llama-3-8b-rm-700k"
    assert lsc.spec.names == (name,)


# ---- bad input: one line naming the flag, exit 2, no Ray, no output ----

BASE = ["--actor.model_name_or_path", "org/policy", "--reward.model_name_or_path", "org/rm_a,org/rm_b",
        "--ckpt.output_dir", "out", "--ckpt.path", "ckpt", "--vllm.num_engines", "1"]
LSC = ["--lsc.transform", "lsc", "--lsc.reference", "constant", "--lsc.reference_value", "0,0"]
BAD = [  # (extra argv, replaces BASE's reward source?, text the error must contain)
    (LSC + ["--lsc.scale", "0"], None, "--lsc.scale: expected `match` or a finite number > 0, got '0'"),
    (LSC + ["--lsc.scale", "double"], None, "--lsc.scale"),
    (["--lsc.transform", "par", "--lsc.reference", "group"], None, "par compares each response with M SFT reference"),
    (["--lsc.transform", "par", "--lsc.reference", "label", "--data.label_key", "ref", "--lsc.par_m", "0"], None,
     "--lsc.par_m"),
    (LSC + ["--lsc.par_m", "5"], None, "--lsc.par_m is only used with --lsc.transform par"),
    (LSC + ["--lsc.aggregate", "gdpo"], None, "--lsc.aggregate gdpo normalises each reward within its prompt's samples"),
    (["--lsc.transform", "sigmoid2"], None, "--lsc.transform"),
    (["--lsc.aggregate", "or"], None, "--lsc.aggregate"),
    (["--lsc.reference", "median"], None, "--lsc.reference"),
    (["--lsc.aggregate", "weighted", "--lsc.weights", "a,b"], None, "--lsc.weights"),
    (["--lsc.aggregate", "weighted", "--lsc.weights", "nan,1"], None, "--lsc.weights"),
    (["--lsc.aggregate", "weighted", "--lsc.weights", "1,inf"], None, "--lsc.weights"),
    (["--lsc.aggregate", "weighted", "--lsc.weights", "-1"], None, "--lsc.weights needs 2 values"),
    (["--lsc.weights", "-1,1"], None, "--lsc.weights is only used with --lsc.aggregate weighted"),
    (["--lsc.aggregate", "weighted"], None, "--lsc.weights"),
    (["--lsc.transform", "lsc"], None, "--lsc.reference"),
    (["--lsc.transform", "lsc", "--lsc.reference", "label"], None, "--data.label_key"),
    (["--lsc.transform", "lsc", "--lsc.reference", "group", "--lsc.quantile", "1.5",
      "--rollout.n_samples_per_prompt", "4"], None, "--lsc.quantile"),
    (["--lsc.transform", "lsc", "--lsc.reference", "group", "--lsc.quantile", "nan",
      "--rollout.n_samples_per_prompt", "4"], None, "--lsc.quantile"),
    (["--lsc.transform", "lsc", "--lsc.reference", "group", "--lsc.quantile", "half"], None, "--lsc.quantile"),
    (["--lsc.transform", "lsc", "--lsc.reference", "group", "--lsc.quantile", "0.5"], None,
     "--rollout.n_samples_per_prompt"),
    (["--lsc.quantile", "0.5"], None, "--lsc.quantile is only used with --lsc.reference group"),
    (["--lsc.transform", "lsc", "--lsc.reference", "constant", "--lsc.reference_value", "1"], None,
     "--lsc.reference_value needs 2 values"),
    (["--lsc.transform", "lsc", "--lsc.reference", "constant", "--lsc.reference_value", "nan,1"], None,
     "--lsc.reference_value"),
    (["--lsc.transform", "lsc", "--lsc.reference", "constant"], None, "--lsc.reference_value"),
    (["--lsc.reference_value", "1,1"], None, "--lsc.reference_value is only used with --lsc.reference constant"),
    (["--lsc.reward_names", "x"], None, "--lsc.reward_names lists 1 names for 2 reward models"),
    (["--lsc.reward_names", "x,"], None, "--lsc.reward_names"),
    (["--lsc.transform", "raw"], ["--reward.model_name_or_path", "a/rm,b/rm"], "--lsc.reward_names"),
    (["--lsc.reward_models", "org/c"], None, "--lsc.reward_models org/c conflicts with --reward.model_name_or_path"),
    (["--lsc.transform", "raw"], [], "--reward.model_name_or_path"),
    (["--lsc.transform", "raw"], ["--reward.model_name_or_path", "/nonexistent/rm"], "--reward.model_name_or_path"),
    ([*LSC, "--reward.stop_properly_penalty_coef", "0.5"], None, "--reward.stop_properly_penalty_coef"),
    (["--lsc.transform", "raw"], ["--train.agent_func_path", "AGENT", "--reward.model_name_or_path", "org/rm"],
     "--train.agent_func_path"),
    (["--lsc.reward_models", "org/rm"], ["--reward.remote_url", "REWARD_PY"], "--reward.remote_url"),
    (["--lsc.transform", "raw"], ["--reward.remote_url", "/nonexistent/reward.py"], "--reward.remote_url"),
    (["--lsc.transform", "raw"], ["--train.agent_func_path", "/nonexistent/agent.py"], "--train.agent_func_path"),
    (["--lsc.dump_rewards", "dump.jsonl"], None, "--lsc.dump_rewards"),
    (["--lsc.dump_rewards", "D_R/dump.jsonl"], None, "--lsc.dump_rewards"),
    (["--lsc.dump_rewards", "TMP"], None, "--lsc.dump_rewards"),
    (["--lsc.rehearsal.dataset", "/nonexistent/d_r.jsonl"], None, "--lsc.rehearsal.dataset"),
    (["--lsc.rehearsal.dataset", "D_R", "--lsc.rehearsal.coef", "-1"], None, "--lsc.rehearsal.coef"),
    (["--lsc.rehearsal.dataset", "D_R", "--lsc.rehearsal.coef", "nan"], None, "--lsc.rehearsal.coef"),
    (["--lsc.rehearsal.dataset", "D_R", "--lsc.rehearsal.micro_batch_size", "0"], None,
     "--lsc.rehearsal.micro_batch_size"),
    (["--lsc.rehearsal.dataset", "D_R", "--lsc.rehearsal.max_len", "2"], None, "--lsc.rehearsal.max_len"),
    (["--lsc.rehearsal.dataset", "D_R", "--lsc.rehearsal.input_key", ""], None, "--lsc.rehearsal.input_key"),
    (["--lsc.rehearsal.coef", "0.5"], None, "--lsc.rehearsal.coef only applies with --lsc.rehearsal.dataset"),
    (["--lsc.rehearsal.dataset", "D_R", "--ds.ring_attn_size", "2"], None, "--ds.ring_attn_size"),
    (["--lsc.unknown", "1"], None, "--lsc.unknown"),
    (["--lsc.monitor.reward_models", "org/rm_b/"], None,
     "--lsc.monitor.reward_models: 'org/rm_b/' is also a training reward model"),
    (["--lsc.monitor.reward_models", "/nonexistent/judge"], None, "--lsc.monitor.reward_models /nonexistent/judge"),
    (["--lsc.monitor.reward_models", "org/judge", "--lsc.monitor.patterns", "list=^- ", "open=(["], None,
     "--lsc.monitor.patterns: '([' is not a valid regular expression"),
    (["--lsc.monitor.reward_models", "org/judge", "--lsc.monitor.window", "0"], None, "--lsc.monitor.window"),
    (["--lsc.monitor.reward_models", "org/judge", "--lsc.monitor.patience", "-1"], None, "--lsc.monitor.patience"),
    (["--lsc.monitor.reward_models", "org/judge", "--lsc.monitor.patience", "x"], None, "--lsc.monitor.patience"),
    (["--lsc.monitor.patterns", "list=^- "], None,
     "--lsc.monitor.patterns only applies with --lsc.monitor.reward_models"),
    (["--lsc.monitor.stop"], None, "--lsc.monitor.stop only applies with --lsc.monitor.reward_models"),
    (["--lsc.monitor.reward_models", "org/judge", "--lsc.monitor.names", "a,b"], None,
     "--lsc.monitor.names 'a,b': give 1 non-empty names"),
    (["--lsc.monitor.reward_models", "org/judge,org/gold", "--lsc.monitor.names", "a,"], None,
     "--lsc.monitor.names 'a,': give 2 non-empty names"),
    (["--lsc.monitor.reward_models", "other/rm_a"], None, "--lsc.monitor.names: 'rm_a' names two models"),
    (["--lsc.monitor.reward_models", "org/judge"], ["--reward.remote_url", "REWARD_PY"],
     "--lsc.monitor.reward_models are scored in OpenRLHF's reward actors"),
    (["--lsc.monitor.reward_models", "org/judge", "--lsc.monitor.stop", "--train.async_enable"], None,
     "--lsc.monitor.stop cannot end a --train.async_enable run"),
]


def _materialise(argv, tmp_path):
    """Placeholders -> files that exist (so the row fails for its own reason only)."""
    (tmp_path / "d_r.jsonl").write_text('{"input": "q", "output": "a"}\n')
    for name in ("reward.py", "agent.py"):
        (tmp_path / name).write_text("def reward_func(queries, prompts, labels):\n    return {}\n")
    names = {"D_R": tmp_path / "d_r.jsonl", "REWARD_PY": tmp_path / "reward.py", "AGENT": tmp_path / "agent.py",
             "TMP": tmp_path}
    return [str(names[t.split("/")[0]]) + t[len(t.split("/")[0]):] if t.split("/")[0] in names else t for t in argv]


def _row_argv(extra, source, tmp_path):
    base = BASE if source is None else [t for t in BASE[:2] + BASE[4:]] + source
    return _materialise(base + extra, tmp_path)


@pytest.mark.parametrize("extra, source, message", BAD, ids=[" ".join(r[0])[:60] for r in BAD])
def test_bad_input_one_line_exit_2_nothing_started(extra, source, message, tmp_path, monkeypatch, capsys):
    import ray

    argv = _row_argv(extra, source, tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_ppo_ray: error: "), out.err
    assert message in lines[0] and "Traceback" not in out.err + out.out
    assert not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output file created


SUBPROCESS_ROWS = [r for r in BAD if r[2] in ("--lsc.weights needs 2 values", "--lsc.dump_rewards",
                                               "--lsc.rehearsal.coef", "--reward.remote_url")][:4]


@pytest.mark.parametrize("extra, source, message", SUBPROCESS_ROWS)
def test_bad_input_rows_as_real_subprocesses(extra, source, message, tmp_path):
    """A few rows as a user runs them: a fresh `python -m` process on the CPU install (no stand-ins)."""
    argv = _row_argv(extra, source, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = subprocess.run([sys.executable, "-m", "openrlhf_lsc.cli.train_ppo_ray", *argv], cwd=tmp_path,
                         env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_real_run_without_flash_attn_and_vllm_is_one_line_naming_them(tmp_path):
    out = subprocess.run([sys.executable, "-m", "openrlhf_lsc.cli.train_ppo_ray", *BASE, *LSC], cwd=tmp_path,
                         env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "flash_attn and vllm" in out.stderr and "openrlhf_lsc[gpu]" in out.stderr


def test_help_on_the_cpu_install_lists_every_flag_with_its_default():
    check = ("import sys, runpy; sys.argv = ['x', '--help']\n"
             "try:\n    runpy.run_module('openrlhf_lsc.cli.train_ppo_ray', run_name='__main__')\n"
             "except SystemExit as e:\n    assert e.code == 0\n"
             "assert not {'vllm', 'flash_attn', 'ray'} & set(sys.modules), 'imported for --help'\n")
    out = subprocess.run([sys.executable, "-c", check], env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    blocks = {b.split()[0]: " ".join(b.split()) for b in re.split(r"\n(?=  --)", out.stdout) if b.startswith("  --")}
    for flag, default in (("--lsc.transform", "raw"), ("--lsc.rehearsal.coef", "0.01"), ("--lsc.par_m", "None"),
                          ("--algo.advantage.estimator", "gae"), ("--ds.packing_samples", "False")):
        assert f"(default: {default})" in blocks[flag], blocks[flag]
    assert "--reward.clip_range" in out.stdout


@pytest.mark.parametrize("weights, expected", [("-1,0.5", (-1.0, 0.5)), ("-.5,1", (-0.5, 1.0)), ("-1e-1,2", (-0.1, 2.0))])
def test_negative_numbers_parse_and_reach_the_spec(monkeypatch, tmp_path, stock_module, weights, expected):
    """Negative values of the plugin's comma lists parse as the offline tools' do (one rule for every CLI); stock's
    own two-value --reward.clip_range keeps its negative number."""
    argv = _row_argv(["--lsc.aggregate", "weighted", "--lsc.weights", weights, "--lsc.transform", "center",
                      "--lsc.reference", "constant", "--lsc.reference_value", "-2.5,1e-3",
                      "--reward.clip_range", "-5", "5"], None, tmp_path)
    args = run_plugin(argv, monkeypatch, stock_module)
    assert args.lsc.spec.weights == expected and args.lsc.spec.reference_value == (-2.5, 0.001)
    assert args.lsc.spec.names == ("rm_a", "rm_b") and args.reward.model_name_or_path == "org/rm_a,org/rm_b"
    assert list(args.reward.clip_range) == [-5.0, 5.0]


def test_par_gdpo_and_scale_reach_the_spec(monkeypatch, tmp_path, stock_module):
    argv = _row_argv(["--lsc.transform", "par", "--lsc.reference", "label", "--data.label_key", "lsc_ref",
                      "--lsc.aggregate", "gdpo", "--lsc.scale", "match", "--rollout.n_samples_per_prompt", "4"],
                     None, tmp_path)
    args = run_plugin(argv, monkeypatch, stock_module)
    spec = args.lsc.spec
    assert (spec.transform, spec.par_m, spec.aggregate, spec.weights, args.lsc.scale) == ("par", 10, "gdpo", None, "match")
    args = run_plugin(_row_argv(LSC + ["--lsc.scale", "2.5"], None, tmp_path), monkeypatch, stock_module)
    assert args.lsc.scale == 2.5


def test_named_rewards_of_a_reward_function_and_an_absolute_dump(monkeypatch, tmp_path, stock_module):
    argv = _row_argv(["--lsc.reward_names", "verifier,helpful", "--lsc.dump_rewards", str(tmp_path / "d/dump.jsonl"),
                      "--lsc.rehearsal.dataset", "D_R"], ["--reward.remote_url", "REWARD_PY"], tmp_path)
    args = run_plugin(argv, monkeypatch, stock_module)
    assert args.lsc.extra_logs and args.lsc.spec.names == ("verifier", "helpful")
    assert args.lsc.dump_rewards == str(tmp_path / "d/dump.jsonl") and args.lsc.rehearsal.coef == 0.01
    assert args.reward.remote_url == [str(tmp_path / "reward.py")]  # stock's own post-processing ran


def test_monitor_flags_reach_args_and_the_evaluators_join_the_reward_actors(monkeypatch, tmp_path, stock_module):
    judge = tmp_path / "judge"
    judge.mkdir()
    argv = _row_argv(["--lsc.monitor.reward_models", f"{judge},org/other", "--lsc.monitor.names", "gold,noisy",
                      "--lsc.monitor.patterns", "list=^- ", r"(?i)sorry", "--lsc.monitor.window", "2",
                      "--lsc.monitor.stop"], None, tmp_path)
    args = run_plugin(argv, monkeypatch, stock_module)
    mon = args.lsc.monitor
    assert (mon.reward_models, mon.names, mon.patterns) == ([str(judge), "org/other"], ["gold", "noisy"],
                                                            ["list=^- ", "(?i)sorry"])
    assert (mon.window, mon.patience, mon.stop) == (2, 3, True)
    assert args.lsc.spec.names == ("rm_a", "rm_b") and args.lsc.spec.transform == "raw"
    assert args.reward.model_name_or_path == f"org/rm_a,org/rm_b,{judge},org/other"  # proxies first, then evaluators
    assert args.critic.model_name_or_path == "org/rm_a"  # stock's default critic: still the first proxy
    plain = run_plugin(_row_argv(["--lsc.transform", "raw"], None, tmp_path), monkeypatch, stock_module)
    assert plain.lsc.monitor is None and plain.reward.model_name_or_path == "org/rm_a,org/rm_b"


def test_rehearsal_alone_leaves_the_rewards_alone(monkeypatch, tmp_path, stock_module):
    args = run_plugin(_row_argv(["--lsc.rehearsal.dataset", "D_R"], None, tmp_path), monkeypatch, stock_module)
    assert args.lsc.spec is None and args.lsc.rehearsal.dataset == str(tmp_path / "d_r.jsonl")


def test_a_changed_stock_main_block_fails_loudly(tmp_path, monkeypatch):
    """The CLI runs stock's own parser statements and checks, read from its __main__ block: if OpenRLHF changes
    that block's shape, the plugin refuses to guess."""
    from openrlhf_lsc.integration.stock_cli import StockCLI

    (tmp_path / "fake_stock_cli.py").write_text(
        "import argparse\n\ndef train(args):\n    pass\n\nif __name__ == '__main__':\n"
        "    parser = argparse.ArgumentParser()\n    args = parser.parse_args()\n    train(args)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"cannot read the __main__ block of .*fake_stock_cli.py.*OpenRLHF changed"):
        StockCLI("fake_stock_cli", "x", "--x.", lambda parser: None)
