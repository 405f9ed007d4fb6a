"""The prepared accelerator check runs unchanged on CPU for a few steps."""

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_device_check_quick_mode_writes_one_results_file(tmp_path):
  env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  text = (tmp_path / "device_check.txt").read_text()
  for section in ("environment", "tests", "bench_update", "bench_estimators", "meta-training",
                  "done"):
    assert f"== {section} ==" in text
  assert "backend cpu" in text
  assert "passed" in text
  assert "step ratio" in text and "steps/s" in text
  assert "meta-steps: 3 in" in text
