"""benchmarks/gpu_report.py, the GPU check's report, on the files a cut-short GPU run leaves (no GPU needed)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_numerics_cuda" name="test_transforms[lsc-dtype0]" time="0.5"/>
<testcase classname="tests.gpu.test_openrlhf_cuda" name="test_k_reward_models" time="12.0">
  <failure message="AssertionError: step rm_scoring failed">trace</failure></testcase>
<testcase classname="tests.gpu.test_openrlhf_cuda" name="test_rehearsal_peak_memory" time="0.1">
  <skipped message="peak GPU memory needs CUDA"/></testcase>
</testsuite></testsuites>"""


def test_report_of_a_cut_short_run(tmp_path):
    dest, steps = tmp_path / "out", tmp_path / "steps"
    dest.mkdir(), steps.mkdir()
    (dest / "junit.xml").write_text(JUNIT)
    (dest / "pytest.log").write_text("E   AssertionError: step rm_scoring failed\n")
    row = {"prompts": 256, "estimator": "gae", "stock_s": 0.5, "plugin_s": 0.51, "ratio": 1.02, "hook_s": 0.01,
           "hook_share": 0.02, "ship_ratio": 1.0, "ship_bytes_ratio": 1.01}
    config = {"device": "cpu", "repeats": 3, "labels": "object", "target": 1.03, "samples": 8,
              "prompts": "256,1024,4096", "estimators": "gae,group_norm"}
    (dest / "overhead.json").write_text(json.dumps({"config": config, "device_name": "cpu", "rows": [row],
                                                    "worst_ratio": 1.02}))
    (steps / "setup_hook.json").write_text(json.dumps({"cuda_initialized": False, "ray": "test-only stand-in"}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), str(dest), str(steps), "0", "1",
                           "99"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = (dest / "report.md").read_text()
    assert report.startswith("**no CUDA on this machine")
    assert "| test_numerics_cuda::test_transforms[lsc-dtype0] | passed | 0.5 |" in report
    assert "| test_openrlhf_cuda::test_k_reward_models | FAILED: AssertionError: step rm_scoring failed | 12.0 |" in report
    assert "skipped: peak GPU memory needs CUDA" in report and "pytest exit code 1; 1 FAILED, 1 passed, 1 skipped" in report
    assert "| 256 | gae | 0.5000 | 0.5100 | 1.020x |" in report and "Only 1 of 6 rows finished" in report
    assert "Ray setup hook: CUDA initialised after it: False" in report
    assert "No results; the log:" not in report  # no estimator.json and no CUDA: that part is left out
    assert json.loads((dest / "steps.json").read_text()) == {"setup_hook": {"cuda_initialized": False,
                                                                           "ray": "test-only stand-in"}}
