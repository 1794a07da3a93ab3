"""The plugin's train_ppo_ray CLI: flag parsing and checks (errors name the flag), --help."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from openrlhf_lsc.cli.train_ppo_ray import _namespace, build_parser, resolve


def stock_args(**over):
    args = SimpleNamespace(
        reward=SimpleNamespace(model_name_or_path=None, remote_url=None, clip_range=(-10, 10),
                               stop_properly_penalty_coef=None),
        data=SimpleNamespace(label_key=None),
        rollout=SimpleNamespace(n_samples_per_prompt=4),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator="gae")),
    )
    for key, value in over.items():
        node, leaf = args, key.split(".")
        for part in leaf[:-1]:
            node = getattr(node, part)
        setattr(node, leaf[-1], value)
    return args


def parse(argv):
    flat, rest = build_parser().parse_known_args(argv)
    return _namespace(flat), rest


def test_flags_reach_args_and_stock_flags_pass_through():
    lsc, rest = parse(["--lsc.transform", "lsc", "--lsc.reward_models", "/m/helpful,/m/harmless", "--lsc.reference",
                       "label", "--data.label_key", "ref", "--lsc.rehearsal.coef", "0.5", "--actor.adam.lr", "1e-3"])
    assert rest == ["--data.label_key", "ref", "--actor.adam.lr", "1e-3"]
    args = stock_args(**{"data.label_key": "ref"})
    lsc = resolve(lsc, args)
    assert args.reward.model_name_or_path == "/m/helpful,/m/harmless"
    assert lsc.reward_names == ["helpful", "harmless"] and lsc.rehearsal.coef == 0.5 and lsc.transform == "lsc"


@pytest.mark.parametrize(
    "argv, over, message",
    [
        (["--lsc.aggregate", "weighted", "--lsc.weights", "0.5", "--lsc.reward_models", "a,b"], {}, "--lsc.weights with 2 values"),
        (["--lsc.weights", "0.5,0.5", "--lsc.reward_models", "a,b"], {}, "--lsc.weights is only used with"),
        (["--lsc.transform", "lsc", "--lsc.reward_models", "a"], {}, "needs a reference: set --lsc.reference"),
        (["--lsc.transform", "lsc", "--lsc.reward_models", "a", "--lsc.reference", "label"], {}, "--data.label_key"),
        (["--lsc.transform", "lsc", "--lsc.reward_models", "a", "--lsc.reference", "group", "--lsc.quantile", "1.5"], {},
         r"--lsc.quantile in \(0, 1\)"),
        (["--lsc.transform", "lsc", "--lsc.reward_models", "a", "--lsc.reference", "group", "--lsc.quantile", "0.5"],
         {"rollout.n_samples_per_prompt": 1}, "n_samples_per_prompt >= 2"),
        (["--lsc.transform", "lsc", "--lsc.reward_models", "a,b", "--lsc.reference", "constant", "--lsc.reference_value", "1"],
         {}, "--lsc.reference_value with 2 values"),
        (["--lsc.reward_models", "a,b", "--lsc.reward_names", "x"], {}, "--lsc.reward_names lists 1 names for 2"),
        (["--lsc.reward_models", "x/rm,y/rm"], {}, "not unique: set --lsc.reward_names"),
        (["--lsc.reward_models", "a"], {"reward.model_name_or_path": "b"}, "conflicts with --reward.model_name_or_path"),
        ([], {}, "no reward"),
        (["--lsc.transform", "lsc", "--lsc.reward_models", "a", "--lsc.reference", "constant", "--lsc.reference_value", "0"],
         {"reward.stop_properly_penalty_coef": 0.5}, "stop_properly_penalty_coef"),
        (["--lsc.reward_models", "a", "--lsc.rehearsal.dataset", "d.jsonl", "--lsc.rehearsal.coef", "-1"], {},
         "--lsc.rehearsal.coef must be a finite number >= 0"),
    ],
)
def test_bad_flag_combinations_name_the_flag(argv, over, message):
    lsc, _ = parse(argv)
    with pytest.raises(ValueError, match=message):
        resolve(lsc, stock_args(**over))


def test_unknown_transform_and_bad_numbers_are_rejected_by_the_parser(capsys):
    for argv, message in [(["--lsc.transform", "sigmoid"], "invalid choice: 'sigmoid'"),
                          (["--lsc.weights", "a,b"], "--lsc.weights takes comma-separated numbers")]:
        with pytest.raises(SystemExit):
            build_parser().parse_known_args(argv)
        assert message in capsys.readouterr().err


def test_help_lists_plugin_and_stock_flags():
    out = subprocess.run([sys.executable, "-m", "openrlhf_lsc.cli.train_ppo_ray", "--help"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--lsc.transform", "--lsc.reward_models", "--lsc.reference", "--lsc.rehearsal.coef",
                 "--algo.advantage.estimator", "--reward.clip_range"):
        assert flag in out.stdout
