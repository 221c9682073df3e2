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


RELEASE_SCRIPT = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from mdrad_jax import runtime

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def rss_mib():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

blocks = []
for _ in range(4000):  # 400 MiB in 100 KiB blocks: below glibc's mmap threshold, so they live on the heap
  p = libc.malloc(100 * 1024)
  ctypes.memset(p, 1, 100 * 1024)
  blocks.append(p)
for p in blocks[::2]:  # holes between live blocks: free memory that the heap cannot give back by shrinking
  libc.free(p)
before = rss_mib()
released = runtime.release_free_heap()
print(before, rss_mib(), released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_heap_gives_freed_heap_memory_back():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT, root], capture_output=True, text=True, check=True)
  before, after, released = out.stdout.split()
  assert released == "True"
  assert float(before) > 350  # the freed half is still resident: nothing gave it back
  assert float(after) < float(before) - 150
