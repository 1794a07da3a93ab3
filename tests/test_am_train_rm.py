"""Advantage Model training through the real OpenRLHF train_rm on CPU, and the patches it relies on.

The end-to-end runs use a tiny Llama built from a config, a local word-level tokenizer and synthetic
two-task preference data whose tasks differ the way the paper's code and QA do:
- code: the chosen program passes its tests ("ok" in the response), labels 90 % clean;
- qa: every answer carries that same "ok" pattern and the better one is right ("yes" vs "no"),
  labels 70 % clean, i.e. a smaller true score scale.
A BT reward model pays for "ok" (learnt on code) on every QA answer too, so QA scores sit higher, and
QA's score spread is much smaller than code's. The AM must remove both.
"""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from openrlhf_lsc.am_loss import pairwise_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOPICS = {"code": ["write", "fn", "var", "list", "sort"], "qa": ["what", "why", "who", "the", "answer"]}
WORDS = ["task", "code", "qa", ":", "ok", "yes", "no"] + TOPICS["code"] + TOPICS["qa"]
NOISE = {"code": 0.1, "qa": 0.3}  # share of flipped labels per task
ACCURACY_TOLERANCE = 0.05  # AM may lose at most this much pairwise accuracy against BT


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def make_pairs(n: int, seed: int) -> list:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        task = rng.choice(sorted(TOPICS))
        topics = TOPICS[task]

        def response(*marks):
            words = [rng.choice(topics) for _ in range(3)]
            for mark in marks:
                words.insert(rng.randint(0, len(words)), mark)
            return " " + " ".join(words)

        if task == "code":
            chosen, rejected = response("ok"), response()
        else:
            chosen, rejected = response("ok", "ok", "yes"), response("ok", "ok", "no")
        if rng.random() < NOISE[task]:
            chosen, rejected = rejected, chosen
        prompt = f"task {task} : " + " ".join(rng.choice(topics) for _ in range(3))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "task": task})
    return rows


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(work: Path, out: str, *flags: str) -> subprocess.Popen:
    """Start `python -m openrlhf_lsc.cli.train_rm` on CPU (through the test-only shim launcher)."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="-1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "rm_cpu_shims", "openrlhf_lsc.cli.train_rm",
        "--model.model_name_or_path", str(work / "model"), "--ckpt.output_dir", str(work / out),
        "--data.dataset", str(work / "train.jsonl"), "--eval.dataset", str(work / "eval.jsonl"),
        "--data.prompt_key", "prompt", "--data.max_len", "32", "--ds.attn_implementation", "eager",
        "--ds.zero_stage", "0", "--train.micro_batch_size", "8", "--train.batch_size", "16",
        "--train.max_epochs", "2", "--adam.lr", "1e-3", "--am.task_key", "task", *flags,
    ]
    log = open(work / f"{out}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train a BT (sigmoid) and an AM reward model side by side on the same data; return their outputs."""
    work = tmp_path_factory.mktemp("am_rm")
    make_model(work / "model")
    write_jsonl(work / "train.jsonl", make_pairs(400, seed=1))
    write_jsonl(work / "eval.jsonl", make_pairs(200, seed=2))
    procs = {name: launch(work, name, "--model.loss_type", loss) for name, loss in (("bt", "sigmoid"), ("am", "am"))}
    for name, proc in procs.items():
        code = proc.wait(timeout=900)
        assert code == 0, f"{name} run failed:\n" + (work / f"{name}.log").read_text()[-4000:]
    return work


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "rm_eval_metrics.json").read_text())


@pytest.mark.e2e
def test_am_balances_tasks_without_losing_accuracy(runs):
    bt, am = _metrics(runs / "bt")["evals"][-1], _metrics(runs / "am")["evals"][-1]

    def std_spread(m):
        stds = [s["std"] for s in m["per_task"].values()]
        return max(stds) - min(stds)

    summary = {k: {"acc": m["accuracy"], "ece": m["ece"], "mean_spread": m["task_mean_spread"],
                   "std_spread": std_spread(m), "per_task": m["per_task"]} for k, m in (("bt", bt), ("am", am))}
    print(json.dumps(summary, indent=1))
    assert bt["task_mean_spread"] > 0.1  # the data does what it is built for
    assert am["task_mean_spread"] < 0.5 * bt["task_mean_spread"]
    assert std_spread(am) < 0.5 * std_spread(bt)
    assert am["accuracy"] >= bt["accuracy"] - ACCURACY_TOLERANCE


@pytest.mark.e2e
def test_metrics_file_and_config(runs):
    for name, loss in (("bt", "sigmoid"), ("am", "am")):
        record = _metrics(runs / name)
        assert record["loss_type"] == loss
        assert [e["global_step"] for e in record["evals"]] == [25, 50]  # one eval per epoch
        config = json.loads((runs / name / "config.json").read_text())
        assert config["lsc_am_task_stats"] == record["evals"][-1]["per_task"]
        assert set(config["lsc_am_task_stats"]) == {"code", "qa"}


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["am", "bt"])
def test_saved_model_loads_as_a_stock_reward_model(runs, name):
    """OpenRLHF's reward-model loader scores the eval pairs as the training run's evaluation did."""
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    path = runs / name
    model = get_llm_for_sequence_regression(str(path), "reward", attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (runs / "eval.jsonl").read_text().splitlines()]

    def score(text):  # RewardDataset's format: prompt + response + " " + eos
        ids = tok(text + " " + tok.eos_token, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            return model(ids["input_ids"], attention_mask=ids["attention_mask"]).item()

    chosen = torch.tensor([score(r["prompt"] + r["chosen"]) for r in rows])
    rejected = torch.tensor([score(r["prompt"] + r["rejected"]) for r in rows])
    ours = pairwise_metrics(chosen, rejected, [r["task"] for r in rows])
    logged = _metrics(path)["evals"][-1]
    assert ours["accuracy"] == pytest.approx(logged["accuracy"], abs=0.011)
    for task, stats in logged["per_task"].items():
        assert ours["per_task"][task]["mean"] == pytest.approx(stats["mean"], abs=0.03)
        assert ours["per_task"][task]["std"] == pytest.approx(stats["std"], abs=0.03)


# ---- the patches, in process (fast) ----


@pytest.fixture(scope="module")
def patched():
    from openrlhf_lsc.integration import reward_model

    reward_model.apply()
    reward_model.apply()  # idempotent
    return reward_model


def _strategy(am=None, **data):
    args = SimpleNamespace(
        data=SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                             apply_chat_template=False, **data),
        model=SimpleNamespace(aux_loss_coef=0, margin_loss_enable=False, compute_fp32_loss_enable=False),
        ds=SimpleNamespace(packing_samples=False),
        logger=SimpleNamespace(wandb=SimpleNamespace(key=None), tensorboard_dir=None),
    )
    if am is not None:
        args.am = am
    return SimpleNamespace(args=args, print=lambda *a: None, is_rank_0=lambda: True)


def _am_args(**overrides):
    am = dict(task_key="task", min_task_pairs=2, margin=2.5, expected_coef=1.0, bound_coef=1.0, task_coef=1.0,
              task_std=1.0, task_momentum=0.1)
    return SimpleNamespace(**{**am, **overrides})


def _dataset(rows, strategy):
    from datasets import Dataset
    from openrlhf.datasets import RewardDataset

    return RewardDataset(Dataset.from_list(rows), make_tokenizer(), 32, strategy, num_processors=1)


def test_dataset_carries_tasks_and_stays_stock_without_am(patched):
    rows = make_pairs(6, seed=3)
    ours = _dataset(rows, _strategy(_am_args()))
    stock = _dataset(rows, _strategy(None))
    assert ours.lsc_tasks == [r["task"] for r in rows]
    assert not hasattr(stock, "lsc_tasks")
    batch = ours.collate_fn([ours[i] for i in range(6)])
    stock_batch = stock.collate_fn([stock[i] for i in range(6)])
    assert isinstance(batch[-1], patched.TaskList) and batch[-1].tasks == ours.lsc_tasks
    assert list(batch[-1]) == stock_batch[-1] == [0] * 6  # stock margins untouched
    for ours_t, stock_t in zip(batch[:-1], stock_batch[:-1]):
        assert torch.equal(ours_t, stock_t)


@pytest.mark.parametrize("broken, message", [("drop", "no such field"), ("null", "row 2")])
def test_dataset_rejects_missing_tasks(patched, broken, message):
    rows = make_pairs(4, seed=4)
    if broken == "drop":
        for r in rows:
            del r["task"]
    else:
        rows[2]["task"] = None
    with pytest.raises(ValueError, match=f"--am.task_key 'task'.*{message}"):
        _dataset(rows, _strategy(_am_args()))


class _Loader(list):
    def __init__(self, batches, tasks):
        super().__init__(batches)
        self.dataset = SimpleNamespace(lsc_tasks=tasks)
        self.sampler = range(sum(len(b[-1]) for b in batches))


def _trainer(loss, am, train_tasks=("a", "a", "b", "b"), eval_tasks=("a", "a", "b", "b")):
    from openrlhf.trainer.rm_trainer import RewardModelTrainer

    batch = (None, None, None, None, _TaskListOf(train_tasks))
    return RewardModelTrainer(
        model=None, strategy=_strategy(am), optim=None, train_dataloader=_Loader([batch, batch], list(train_tasks)),
        eval_dataloader=_Loader([batch], list(eval_tasks)), scheduler=None, tokenizer=None, loss=loss,
    )


def _TaskListOf(tasks):
    from openrlhf_lsc.integration.reward_model import TaskList

    return TaskList([0] * len(tasks), tasks)


def test_trainer_uses_am_loss_with_batch_tasks(patched):
    from openrlhf.models.loss import PairWiseLoss

    from openrlhf_lsc.am_loss import AdvantageModelLoss

    c, r = torch.tensor([1.0, 0.5, -0.2, 2.0]), torch.tensor([0.0, 0.7, -1.0, 1.0])
    am_trainer = _trainer("am", _am_args(task_momentum=1.0))
    for _ in am_trainer.train_dataloader:  # the feed hands the batch's tasks to the trainer
        pass
    reference = AdvantageModelLoss(task_momentum=1.0)
    assert am_trainer.loss_fn(c, r, None).item() == pytest.approx(reference(c, r, ["a", "a", "b", "b"]).item())
    bt_trainer = _trainer("sigmoid", _am_args())
    assert bt_trainer.loss_fn(c, r, None).item() == pytest.approx(PairWiseLoss()(c, r).item())
    stock = _trainer("sigmoid", None)
    assert isinstance(stock.loss_fn, PairWiseLoss) and isinstance(stock.train_dataloader, _Loader)
    with pytest.raises(ValueError, match="--model.loss_type am needs the plugin CLI"):
        _trainer("am", None)


def test_trainer_names_the_batch_of_a_nan_loss(patched):
    trainer = _trainer("am", _am_args())
    feed = iter(trainer.train_dataloader)
    next(feed)
    next(feed)
    with pytest.raises(FloatingPointError, match="training epoch pass 1, micro-batch 1.*not finite"):
        trainer.loss_fn(torch.tensor([float("nan"), 0, 0, 0]), torch.zeros(4), None)
    bt = _trainer("sigmoid", _am_args())
    next(iter(bt.train_dataloader))
    with pytest.raises(FloatingPointError, match="sigmoid .* at training epoch pass 1, micro-batch 0: loss is nan"):
        bt.loss_fn(torch.full((4,), float("inf")), torch.full((4,), float("inf")), None)


def test_trainer_rejects_tasks_with_too_few_pairs(patched):
    with pytest.raises(ValueError, match=r"training set: tasks \{'b': 1\}.*--am.min_task_pairs 2"):
        _trainer("am", _am_args(), train_tasks=("a", "a", "b"))
    with pytest.raises(ValueError, match=r"evaluation set: tasks \{'b': 1\}"):
        _trainer("sigmoid", _am_args(), eval_tasks=("a", "a", "b"))
    _trainer("am", _am_args(task_coef=0.0), train_tasks=("a", "a", "b"))  # no per-task term: no minimum


# The CLI's own flags (parse-time checks, one-line errors): tests/test_cli_train_rm.py.


def test_metrics_file_keeps_finished_evals_on_resume(patched, tmp_path):
    def trainer(load_enable):
        args = SimpleNamespace(ckpt=SimpleNamespace(output_dir=str(tmp_path), load_enable=load_enable),
                               model=SimpleNamespace(loss_type="am"), am=_am_args())
        strategy = SimpleNamespace(args=args, print=lambda *a: None)
        return SimpleNamespace(strategy=strategy, _wandb=None, _tensorboard=None, lsc_history=None)

    def metrics(step):
        return {"global_step": step, **pairwise_metrics(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))}

    first = trainer(False)
    for step in (10, 20, 30):
        patched._publish(first, metrics(step), step)
    resumed = trainer(True)  # restarted from the step-20 checkpoint: step 30 is evaluated again
    patched._publish(resumed, metrics(30), 30)
    record = json.loads((tmp_path / patched.METRICS_FILE).read_text())
    assert [e["global_step"] for e in record["evals"]] == [10, 20, 30]
    fresh = trainer(False)  # a new run into the same folder starts a new history
    patched._publish(fresh, metrics(5), 5)
    assert [e["global_step"] for e in json.loads((tmp_path / patched.METRICS_FILE).read_text())["evals"]] == [5]
