"""Bad input to `estimate_reference` and `select_rehearsal`, one table row each: every row must exit 2 with one
`<tool>: error: ...` line naming the flag, file, row or URL, print no traceback, and create or change no file.
Most rows call `main(argv)` in this process; the rows marked `SUB` run the CLI as a real subprocess, on the
CPU install without the test stubs (no flash-attn, no vLLM)."""

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cli_capture import reopen_log_streams

ROOT = Path(__file__).resolve().parents[1]
SUB = "subprocess"


def dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/get_reward"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models, good and bad data files, a server answering strings, and an existing output set."""
    from cpu_harness import tiny_models

    from openrlhf_lsc.cli.common import publish

    root = tmp_path_factory.mktemp("bad_input")
    models = tiny_models.build(root / "models")
    data = root / "data"
    data.mkdir()
    prompts = [{"input": f"question {i}: what is {i} plus two?", "uid": f"u{i}"} for i in range(6)]
    (data / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (data / "dup_ids.jsonl").write_text("".join(json.dumps({**r, "uid": "same"}) + "\n" for r in prompts))
    (data / "ints.jsonl").write_text(json.dumps({"input": "ok", "uid": "a"}) + "\n" + json.dumps({"input": 7, "uid": "b"}) + "\n")
    (data / "empty.jsonl").write_text("")
    (data / "latin1.jsonl").write_bytes('{"input": "café", "output": "thé"}\n'.encode("latin-1"))
    (data / "broken.jsonl").write_text('{"input": "a", "output": "b"}\nnot json at all\n')
    (data / "canned_latin1.txt").write_bytes("Je ne peux pas répondre.\n".encode("latin-1"))
    topics = ["cooking rice", "planets far away", "parsing JSON files"]
    sft = [{"input": f"Question {j} about {t}?", "output": f"Answer {j} about {t}.", "uid": f"{t[:3]}{j}",
            "am": (j * 7 % 5) / 2 - 1} for t in topics for j in range(6)]
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (data / "sft_bad_score.jsonl").write_text("".join(json.dumps({**r, "am": "high"} if i == 4 else r) + "\n"
                                                      for i, r in enumerate(sft)))
    (data / "sft_no_output.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if not (k == "output" and i == 3)})
                                                      + "\n" for i, r in enumerate(sft)))
    (data / "sft_int_input.jsonl").write_text("".join(json.dumps({**r, "input": 12} if i == 5 else r) + "\n"
                                                      for i, r in enumerate(sft)))
    (data / "a_file").write_text("not a folder")

    # select_rehearsal's output folder holds the complete set of an earlier run: no bad row may touch it.
    def old_set(folder):
        for name in ("ppo_prompts.jsonl", "rehearsal.jsonl", "assignments.jsonl", "report.json", "scores.png"):
            (folder / name).write_text(f"old {name}\n")

    publish(root / "sel_out", old_set)

    class Strings(BaseHTTPRequestHandler):
        def do_POST(self):
            n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["query"])
            body = json.dumps({"rewards": ["1.5"] * n}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Strings)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"root": root, "models": models, "data": data, "strings_url": f"http://127.0.0.1:{httpd.server_port}/get_reward",
           "dead_url": dead_url()}
    httpd.shutdown()


def estimator_argv(w):
    m, d = w["models"], w["data"]
    return {
        "--data.prompt_dataset": str(d / "prompts.jsonl"), "--data.id_key": "uid",
        "--actor.model_name_or_path": str(m / "policy"), "--rm.paths": f"{m / 'rm_a'},{m / 'rm_b'}",
        "--rm.names": "A,B", "--ref.k": "2", "--rollout.max_new_tokens": "2", "--data.max_len": "32",
        "--output.dir": str(w["root"] / "est_out"),
    }


def select_argv(w):
    return {
        "--data.dataset": str(w["data"] / "sft.jsonl"), "--data.id_key": "uid", "--select.n_clusters": "3",
        "--select.rehearsal_k": "1", "--select.ppo_fraction": "0.5", "--score.key": "am",
        "--output.dir": str(w["root"] / "sel_out"),
    }


# (tool, changes to the base flags (None drops a flag; "+" appends a switch), what the error line must name, mode)
E, S = "estimate_reference", "select_rehearsal"
ROWS = [
    # ------------------------------------------------------------------ estimate_reference: flag values
    (E, {"--rollout.batch_size": "0"}, ["--rollout.batch_size", "expected an integer >= 1, got 0"], SUB),
    (E, {"--ref.q": "nan"}, ["--ref.q", "finite"], None),
    (E, {"--ref.q": "1.5"}, ["--ref.q", "(0, 1)"], None),
    (E, {"--ref.q": "0.5,0.5,0.5"}, ["--ref.q has 3 values for 2 reward models"], None),
    (E, {"--ref.quantiles": "-0.5,0.5"}, ["--ref.quantiles", "-0.5"], None),
    (E, {"--ref.method": "median"}, ["--ref.method", "median"], None),
    (E, {"--ref.k": "1"}, ["--ref.k", ">= 2"], None),
    (E, {"--rm.retries": "-1"}, ["--rm.retries", "got -1"], None),
    (E, {"--rollout.temperature": "0"}, ["--rollout.temperature"], None),
    (E, {"--rollout.top_p": "0"}, ["--rollout.top_p"], None),
    (E, {"--data.max_samples": "0"}, ["--data.max_samples"], None),
    (E, {"--output.shard_size": "0"}, ["--output.shard_size"], None),
    (E, {"--vllm.gpu_memory_utilization": "1.5"}, ["--vllm.gpu_memory_utilization"], None),
    (E, {"--learned.holdout": "1"}, ["--learned.holdout"], None),
    (E, {"--rm.pathz": "x"}, ["unrecognized arguments: --rm.pathz"], None),
    (E, {"--rm.paths": None}, ["required: --rm.paths"], None),
    # ------------------------------------------------------------------ estimate_reference: flags together
    (E, {"--rm.names": "A"}, ["--rm.names has 1 names for 2 --rm.paths"], None),
    (E, {"--data.max_len": "10", "--rollout.max_new_tokens": "20"}, ["--data.max_len 10", "--rollout.max_new_tokens 20"], None),
    (E, {"--learned.num_prompts": "3"}, ["--learned.num_prompts"], None),
    (E, {"--ref.canned": "{data}/prompts.jsonl"}, ["--ref.canned is only used by --ref.method canned"], None),
    (E, {"--vllm.num_engines": "1"}, ["--vllm.num_engines 1", "--rm.num_actors"], None),
    (E, {"--data.input_template": "User: ", }, ["--data.input_template", "{}"], None),
    (E, {"--data.input_template": "{} and {}"}, ["--data.input_template", "exactly once", "found 2"], None),
    # ------------------------------------------------------------------ estimate_reference: paths, models, URLs
    (E, {"--actor.model_name_or_path": "/no/such/policy"}, ["--actor.model_name_or_path", "/no/such/policy"], SUB),
    (E, {"--rm.paths": "/no/such/rm,{models}/rm_b"}, ["--rm.paths", "/no/such/rm"], None),
    (E, {"--rm.paths": "{models}/policy,{models}/rm_b"}, ["--rm.paths", "policy", "no value head 'score.weight'"], SUB),
    (E, {"--rm.paths": "{models}/rm_a,{dead_url}", "--rm.retries": "0"}, ["--rm.paths", "{dead_url}", "cannot connect"], None),
    (E, {"--rm.paths": "{models}/rm_a,{strings_url}"}, ["--rm.paths", "{strings_url}", "'1.5'"], None),
    (E, {"--rm.paths": "{models}/rm_a,http://host:port/get_reward"}, ["--rm.paths", "http://host:port/get_reward"], None),
    (E, {"--ref.method": "learned", "--learned.encoder": "/no/such/encoder"}, ["--learned.encoder", "/no/such/encoder"], None),
    (E, {"--ref.method": "canned", "--ref.canned": "/no/such/canned.txt"}, ["--ref.canned", "/no/such/canned.txt"], None),
    (E, {"--ref.method": "canned", "--ref.canned": "{data}/canned_latin1.txt"}, ["--ref.canned", "canned_latin1.txt", "UTF-8"], None),
    (E, {"--output.dir": "{data}/a_file"}, ["--output.dir", "a_file", "not a folder"], None),
    (E, {"--output.dir": "{data}/a_file/sub"}, ["--output.dir", "a_file"], None),
    # ------------------------------------------------------------------ estimate_reference: data
    (E, {"--data.prompt_dataset": "{data}/missing.jsonl"}, ["--data.prompt_dataset", "missing.jsonl"], None),
    (E, {"--data.prompt_dataset": "{data}/empty.jsonl"}, ["--data.prompt_dataset", "empty.jsonl", "empty"], None),
    (E, {"--data.prompt_dataset": "{data}/latin1.jsonl"}, ["--data.prompt_dataset", "latin1.jsonl", "UTF-8"], None),
    (E, {"--data.prompt_dataset": "{data}/broken.jsonl"}, ["--data.prompt_dataset", "broken.jsonl"], None),
    (E, {"--data.prompt_dataset": "{data}/ints.jsonl"}, ["row 1 (uid 'b')", "is int", "--data.input_key"], None),
    (E, {"--data.prompt_dataset": "{data}/dup_ids.jsonl"}, ["row 1 (uid 'same')", "duplicate id"], None),
    (E, {"--data.prompt_split": "test"}, ["--data.prompt_dataset", "no split 'test'"], None),
    (E, {"--data.label_key": "uid"}, ["'uid'", "--data.label_key"], None),
    # ------------------------------------------------------------------ select_rehearsal: flag values
    (S, {"--select.ppo_threshold": "nan", "--select.ppo_fraction": None}, ["--select.ppo_threshold", "finite"], SUB),
    (S, {"--select.ppo_fraction": "0"}, ["--select.ppo_fraction", "(0, 1]"], None),
    (S, {"--select.ppo_fraction": "1.5"}, ["--select.ppo_fraction"], None),
    (S, {"--select.n_clusters": "0"}, ["--select.n_clusters"], None),
    (S, {"--select.rehearsal_k": "-1"}, ["--select.rehearsal_k", "got -1"], None),
    (S, {"--encoder.batch_size": "0"}, ["--encoder.batch_size"], None),
    (S, {"--output.cache_chunk": "0"}, ["--output.cache_chunk"], None),
    (S, {"--score.retries": "x"}, ["--score.retries", "'x'"], None),
    # ------------------------------------------------------------------ select_rehearsal: flags together
    (S, {"--select.ppo_threshold": "0.1"}, ["exactly one of --select.ppo_threshold and --select.ppo_fraction"], None),
    (S, {"--select.ppo_fraction": None}, ["exactly one of --select.ppo_threshold and --select.ppo_fraction"], None),
    (S, {"--score.model": "{models}/rm_a"}, ["exactly one of --score.key, --score.model, --score.url"], None),
    (S, {"--score.key": None}, ["exactly one of --score.key, --score.model, --score.url"], None),
    (S, {"--data.apply_chat_template": "+"}, ["--data.apply_chat_template", "--score.model"], None),
    (S, {"--data.input_template": "Q: {} A: "}, ["--data.input_template", "--score.key"], None),
    (S, {"--score.key": None, "--score.model": "{models}/rm_a", "--data.input_template": "Q: "},
     ["--data.input_template", "{}"], None),
    (S, {"--select.n_clusters": "40"}, ["--select.n_clusters 40", "18 rows"], None),
    # ------------------------------------------------------------------ select_rehearsal: paths, models, URLs
    (S, {"--score.key": None, "--score.model": "{models}/policy"}, ["--score.model", "no value head"], SUB),
    (S, {"--score.key": None, "--score.model": "/no/such/am"}, ["--score.model", "/no/such/am"], None),
    (S, {"--score.key": None, "--score.url": "localhost:5000/get_reward"}, ["--score.url", "localhost:5000/get_reward"], None),
    (S, {"--score.key": None, "--score.url": "{dead_url}", "--score.retries": "0"}, ["--score.url", "{dead_url}"], None),
    (S, {"--score.key": None, "--score.url": "{strings_url}"}, ["--score.url", "{strings_url}", "'1.5'"], None),
    (S, {"--encoder.model": "/no/such/encoder"}, ["--encoder.model", "/no/such/encoder"], None),
    (S, {"--output.dir": "{data}/a_file"}, ["--output.dir", "a_file"], None),
    # ------------------------------------------------------------------ select_rehearsal: data
    (S, {"--data.dataset": "{data}/missing.jsonl"}, ["--data.dataset", "missing.jsonl"], None),
    (S, {"--data.dataset": "{data}/empty.jsonl"}, ["--data.dataset", "empty.jsonl"], None),
    (S, {"--data.dataset": "{data}/latin1.jsonl"}, ["--data.dataset", "latin1.jsonl", "UTF-8"], None),
    (S, {"--data.dataset": "{data}/broken.jsonl"}, ["--data.dataset", "broken.jsonl"], None),
    (S, {"--data.dataset": "{data}/sft_bad_score.jsonl"}, ["row 4 (uid 'coo4')", "--score.key 'am'", "'high'"], None),
    (S, {"--data.dataset": "{data}/sft_no_output.jsonl"}, ["row 3 (uid 'coo3')", "--data.output_key"], None),
    (S, {"--data.dataset": "{data}/sft_int_input.jsonl"}, ["row 5 (uid 'coo5')", "is int", "--data.input_key"], None),
]


def snapshot(root: Path) -> dict:
    """Every path under root with its size and modification time (symlinks as themselves)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, os.readlink(p) if p.is_symlink() else None)
    return out


def argv_for(w, tool, changes):
    base = estimator_argv(w) if tool == E else select_argv(w)
    base.update(changes)
    def fill(value):
        for key in ("models", "data", "dead_url", "strings_url"):
            value = value.replace("{" + key + "}", str(w[key]))
        return value

    argv = []
    for flag, value in base.items():
        if value is None:
            continue
        argv += [flag] if value == "+" else [flag, fill(value)]
    return argv, fill


@pytest.mark.parametrize("tool, changes, named, mode", [
    pytest.param(*r, id=f"{r[0][:3]}-{i}", marks=[pytest.mark.slow] if r[3] == SUB else []) for i, r in enumerate(ROWS)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, capsys, tool, changes, named, mode):
    argv, fill = argv_for(world, tool, changes)
    before = snapshot(world["root"])
    if mode == SUB:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the CPU install: no flash-attn / vLLM stand-ins
        proc = subprocess.run([sys.executable, "-m", f"openrlhf_lsc.cli.{tool}", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        code, err = proc.returncode, proc.stderr
    else:
        import importlib

        main = importlib.import_module(f"openrlhf_lsc.cli.{tool}").main
        capsys.readouterr()
        reopen_log_streams()
        with pytest.raises(SystemExit) as e:
            main(argv)
        code, err = e.value.code, capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{tool}: error: ")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for text in named:
        assert fill(text) in lines[0], lines[0]
    assert snapshot(world["root"]) == before


@pytest.mark.slow
def test_help_works_without_flash_attn_or_vllm_and_shows_defaults():
    import importlib

    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the CPU install: no flash-attn / vLLM stand-ins
    for tool in (E, S):
        proc = subprocess.run([sys.executable, "-m", f"openrlhf_lsc.cli.{tool}", "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        text = " ".join(proc.stdout.split("options:")[1].split())  # argparse wraps lines: join them
        parser = importlib.import_module(f"openrlhf_lsc.cli.{tool}").build_parser()
        flags = [a.option_strings[0] for a in parser._actions if a.option_strings[0] != "-h"]
        assert len(flags) > 20
        for flag, following in zip(flags, flags[1:] + [None]):
            entry = text.split(f" {flag} ", 1)[1].split(f" {following} ", 1)[0] if following else text.split(f" {flag} ", 1)[1]
            action = next(a for a in parser._actions if flag in a.option_strings)
            assert entry.strip() and (action.required or "(default: " in entry), (flag, entry)
            assert not entry.rstrip().endswith((";", ",", " on", " or")), (flag, entry)  # no help cut off mid-sentence


def test_negative_numbers_parse_in_flags(world, capsys):
    from openrlhf_lsc.cli.select_rehearsal import build_parser

    argv, _ = argv_for(world, S, {"--select.ppo_threshold": "-1e3", "--select.ppo_fraction": None})
    assert build_parser().parse(argv).select.ppo_threshold == -1000.0
    from openrlhf_lsc.cli.estimate_reference import build_parser as est_parser

    argv, _ = argv_for(world, E, {"--ref.quantiles": "-.5", "--ref.q": "0.2,-0.3"})
    with pytest.raises(SystemExit):  # parsed as numbers, then refused by the range check (not "expected one argument")
        est_parser().parse(argv)
    assert "argument --ref.quantiles: expected a number in (0, 1), got -.5" in capsys.readouterr().err


HEAVY = ("deepspeed", "openrlhf.utils", "ray", "vllm", "datasets")
CHECK_IMPORTS = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print("exit", e.code, "loaded", sorted(m for m in {heavy} if m in sys.modules))
"""


@pytest.mark.parametrize("module, argv", [
    ("openrlhf_lsc.cli.rerank", ["--data.prompt_dataset", "/no/such.jsonl", "--actor.model_name_or_path", "a/b",
                                 "--rm.paths", "c/d", "--output.dir", "/tmp/lsc_unused"]),
    ("openrlhf_lsc.cli.estimate_reference", ["--data.prompt_dataset", "/no/such.jsonl", "--actor.model_name_or_path",
                                             "a/b", "--rm.paths", "c/d", "--output.dir", "/tmp/lsc_unused"]),
    ("openrlhf_lsc.cli.select_rehearsal", ["--data.dataset", "/no/such.jsonl", "--select.n_clusters", "2",
                                           "--select.rehearsal_k", "1", "--select.ppo_fraction", "0.5",
                                           "--score.key", "s", "--output.dir", "/tmp/lsc_unused"]),
    ("openrlhf_lsc.cli.train_ppo_ray", ["--actor.model_name_or_path", "a/b", "--lsc.reward_models", "/no/such/rm",
                                        "--lsc.transform", "lsc", "--lsc.reference", "group",
                                        "--rollout.n_samples_per_prompt", "2"]),
])
@pytest.mark.slow
def test_a_bad_path_is_reported_before_openrlhfs_heavy_modules_load(module, argv):
    """Every CLI checks its flags before importing DeepSpeed, Ray or OpenRLHF's utils (~10 s): the offline tools once
    imported DeepSpeed through OpenRLHF's `hierarchize` first and took 3x as long as train_ppo_ray to say a path is
    wrong. One `hierarchize` (OpenRLHF's own, read from its file) now serves every CLI."""
    code = CHECK_IMPORTS.format(heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code, module, *argv], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=ROOT)
    assert out.stdout.strip() == "exit 2 loaded []", out.stdout + out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "no such" in out.stderr, out.stderr
