"""Process-level set-up: the persistent compilation cache, and the machine description recorded with results."""

import json
import os
import subprocess
import sys

import pytest

from mdrad_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value,expected", [("0", ""), ("off", ""), ("/x/y", "/x/y")])
def test_cache_dir_from_environment(monkeypatch, value, expected):
  monkeypatch.setenv(runtime.CACHE_ENV, value)
  assert runtime.compilation_cache_dir() == expected


def test_cache_dir_default(monkeypatch):
  monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
  assert runtime.compilation_cache_dir() == os.path.expanduser("~/.cache/mdrad_jax/xla")


def test_second_process_reads_compiled_programs_from_the_cache(tmp_path):
  """A program compiled in one process is written to the cache directory and found there by the next."""
  code = (
    "import jax, jax.numpy as jnp\n"
    "from mdrad_jax import runtime\n"
    "runtime.configure_compilation_cache()\n"
    "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
    "f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)\n"
    "print(float(f(jnp.ones((64, 64))).sum()))\n"
  )
  env = dict(os.environ, **{runtime.CACHE_ENV: str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"})
  env["PYTHONPATH"] = ROOT
  first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert first.returncode == 0, first.stderr
  entries = sorted(os.listdir(tmp_path / "cache"))
  assert entries, "nothing was written to the compilation cache"
  mtimes = {e: os.stat(tmp_path / "cache" / e).st_mtime_ns for e in entries}
  second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert second.returncode == 0, second.stderr
  assert second.stdout == first.stdout
  # the second run added no new entry: it read the one the first run wrote
  assert sorted(os.listdir(tmp_path / "cache")) == entries
  assert {e: os.stat(tmp_path / "cache" / e).st_mtime_ns for e in entries} == mtimes


def test_cpu_model_reads_the_model_name_line(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU @ 2.0GHz\nflags\t\t: fpu\n")
  assert runtime.cpu_model(str(info)) == "Example CPU @ 2.0GHz"
  assert runtime.cpu_model(str(tmp_path / "missing"))  # falls back to the platform's name, never empty


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_host_description_counts_the_cores_the_process_may_use():
  """A process pinned to one core (``taskset -c 0``) is recorded as using one core, whatever the machine has."""
  code = (
    "import os, json\n"
    "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
    "from mdrad_jax import runtime\n"
    "print(json.dumps(runtime.host_description()))\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
  host = json.loads(out.stdout.strip().splitlines()[-1])
  assert host["cores"] == 1 and host["platform"] == "cpu" and host["cpu"] == runtime.cpu_model()
