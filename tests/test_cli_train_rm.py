"""The plugin's train_rm CLI: stock's own parser and checks plus the --am.* flags (args.am), bad input refused at
parse time with one line naming the flag (exit 2, nothing loaded or written), --help on the CPU install."""

import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cli_capture import Captured, as_dict, capture
from openrlhf_lsc.cli import train_rm as cli

ROOT = Path(__file__).resolve().parents[1]
CPU_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # a CPU install: no flash-attn stand-in
BASE = ["--model.model_name_or_path", "org/model", "--data.dataset", "org/pairs", "--ckpt.output_dir", "out",
        "--am.task_key", "task"]
AM = ["--model.loss_type", "am"]


@pytest.fixture(scope="module")
def stock_module():
    import openrlhf.cli.train_rm as module  # tests/stubs provides the flash_attn stand-in

    return module


def test_stock_flags_pass_through_and_am_flags_land_on_args_am(monkeypatch, stock_module):
    import openrlhf.utils

    argv = BASE[:6] + ["--ds.zero_stage", "3", "--ds.packing_samples", "--train.batch_size", "64",
                       "--data.input_template", "no placeholder"]
    monkeypatch.setattr(openrlhf.utils, "get_strategy", capture)
    monkeypatch.setattr(sys, "argv", ["train_rm.py", *argv])
    with pytest.raises(Captured) as stock, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is in sys.modules already
        runpy.run_module("openrlhf.cli.train_rm", run_name="__main__")
    monkeypatch.setattr(stock_module, "get_strategy", capture)
    with pytest.raises(Captured) as plugin:
        cli.main(argv + ["--am.task_key", "task", *AM, "--am.margin", "3"])
    a, b = as_dict(stock.value.args[0]), as_dict(plugin.value.args[0])
    am, loss = b.pop("am"), b["model"].pop("loss_type")
    a["model"].pop("loss_type")
    b["logger"]["wandb"]["run_name"] = a["logger"]["wandb"]["run_name"]
    assert a == b and a["data"]["input_template"] is None  # stock's own check ran (no "{}" -> None)
    assert loss == "am" and am == {"task_key": "task", "min_task_pairs": 10, "margin": 3.0, "expected_coef": 1.0,
                                   "bound_coef": 1.0, "task_coef": 1.0, "task_std": 1.0, "task_momentum": 0.1}


BAD = [  # (extra argv, text the error must contain)
    (["--am.margin", "nan", *AM], "--am.margin"),
    (["--am.margin", "abc", *AM], "--am.margin"),
    (["--am.margin", "0", *AM], "--am.margin must be > 0"),
    (["--am.margin", "-1", *AM], "--am.margin must be > 0"),
    (["--am.task_std", "0", *AM], "--am.task_std must be > 0"),
    (["--am.task_momentum", "1.5", *AM], "--am.task_momentum must be in (0, 1]"),
    (["--am.task_momentum", "0", *AM], "--am.task_momentum must be in (0, 1]"),
    (["--am.bound_coef", "-1", *AM], "--am.bound_coef must be >= 0"),
    (["--am.expected_coef", "inf", *AM], "--am.expected_coef"),
    (["--am.task_coef", "-0.5", *AM], "--am.task_coef must be >= 0"),
    (["--am.task_key", "", *AM], "--am.task_key"),
    (["--am.margin", "2"], "--am.margin only applies to --model.loss_type am"),
    (["--am.min_task_pairs", "0"], "--am.min_task_pairs must be >= 1"),
    (["--am.min_task_pairs", "x"], "--am.min_task_pairs"),
    (["--model.model_name_or_path", "/nonexistent/model"], "--model.model_name_or_path /nonexistent/model"),
    (["--data.dataset", "./missing.jsonl"], "--data.dataset ./missing.jsonl"),
    (["--eval.dataset", "/nonexistent/eval.jsonl"], "--eval.dataset /nonexistent/eval.jsonl"),
    (["--am.unknown", "1"], "--am.unknown"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(r[0])[:50] for r in BAD])
def test_bad_input_one_line_exit_2_nothing_written(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = BASE + extra
    if extra[:1] == ["--am.task_key"]:
        argv = BASE[:-2] + extra
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_rm: error: "), out.err
    assert message in lines[0] and "Traceback" not in out.err + out.out
    assert list(tmp_path.iterdir()) == []  # no output folder or file


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [BAD[3], BAD[15]])
def test_bad_input_rows_as_real_subprocesses(extra, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "openrlhf_lsc.cli.train_rm", *BASE, *extra], cwd=tmp_path,
                         env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_run_without_flash_attn_is_one_line_naming_it(tmp_path):
    out = subprocess.run([sys.executable, "-m", "openrlhf_lsc.cli.train_rm", *BASE, *AM], cwd=tmp_path,
                         env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "flash_attn" in out.stderr and "openrlhf_lsc[gpu]" in out.stderr


@pytest.mark.slow
def test_help_on_the_cpu_install_shows_defaults():
    check = ("import sys, runpy; sys.argv = ['x', '--help']\n"
             "try:\n    runpy.run_module('openrlhf_lsc.cli.train_rm', run_name='__main__')\n"
             "except SystemExit as e:\n    assert e.code == 0\n"
             "assert not {'flash_attn', 'deepspeed'} & set(sys.modules), 'imported for --help'\n")
    out = subprocess.run([sys.executable, "-c", check], env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = " ".join(out.stdout.split())
    for flag, default in (("--am.margin", "2.5"), ("--am.task_momentum", "0.1"), ("--model.loss_type", "sigmoid")):
        block = (text[text.index(flag + " "):] + " --").split(" --")[0]  # this flag's usage + help
        assert f"(default: {default})" in block, flag
