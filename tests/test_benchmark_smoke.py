"""The train-step benchmark keeps running: a tiny configuration end to end in a subprocess (no timing checks)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_train_step.py")


def test_benchmark_tiny_configuration(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true")  # compile time dominates a tiny run
  cmd = [sys.executable, SCRIPT, "--methods", "sa_mdrad", "--configs", "tiny_cnn:4", "--image-size", "8",
         "--steps", "1", "--warmup", "0", "--pgd-steps", "1", "--matmul-size", "128", "--torch", "off",
         "--json", str(out)]
  proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert "PyTorch reference: skipped (--torch off)" in proc.stdout
  assert "command:" in proc.stdout and "versions:" in proc.stdout and "load average" in proc.stdout

  res = json.loads(out.read_text())
  assert res["torch_reference"] is False
  assert res["machine"]["versions"]["jax"]
  (case,) = res["results"]
  assert (case["method"], case["model"], case["batch"]) == ("sa_mdrad", "tiny_cnn", 4)
  s = case["variants"]["jax[default]"]
  assert "error" not in s, s
  assert len(s["step_times_s"]) == 1 and s["step_median_s"] > 0 and s["compile_s"] > 0
  assert s["peak_rss_bytes"] > 0 and s["peak_matmul"]["flops_per_s"] > 0
  assert s["param_counts"]["student"] > 0 and len(s["param_counts"]["teachers"]) == 3
  parts = s["necessary_flops"]["parts"]
  assert any(k.startswith("student_forward+input_grad") for k in parts)
  assert any(k.startswith("projectors_forward+backward") for k in parts)
  # the step does the method's work and (almost) nothing else
  assert 0.9 < s["flops_ratio"] < 1.5, s["flops_ratio"]
