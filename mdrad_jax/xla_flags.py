"""Default XLA flags, applied before JAX initialises its backends (overridable by the user).

A flag becomes a default only where it was measured to help the library's own train step in a same-run
comparison (``benchmarks/bench_train_step.py``, ``docs/performance.md``).  On the CPU:
``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` makes XLA:CPU compile convolutions itself
instead of handing each one to YNNPACK, which made the PGD-AT step faster on the small CNN and on ResNet-18
(the measurement: docs/performance.md, "Levers").

XLA reads ``XLA_FLAGS`` once, when JAX starts its first backend, so :func:`apply_defaults` must run before
anything touches a device: ``main.py`` calls it through ``runtime.configure_xla()`` before parsing flags (no
module it imports starts JAX), and the benchmark calls it first thing in each child.  A flag the user already
put in ``XLA_FLAGS`` is never changed (whatever its value); ``MDRAD_NO_DEFAULT_XLA_FLAGS=1`` adds none.  XLA
aborts the process on a flag it does not know, so defaults are added only for the jaxlib versions they were
checked with (``TESTED_JAXLIB``).
"""

from __future__ import annotations

import importlib.metadata
import os

# platform -> {flag name: value}.  'cpu' applies when JAX_PLATFORMS is unset or names cpu first.
DEFAULT_FLAGS: dict[str, dict[str, str]] = {
  "cpu": {"--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"},
}
# jaxlib versions whose XLA knows every default flag (an unknown flag in XLA_FLAGS is a fatal error).
TESTED_JAXLIB = ("0.10.2",)
DISABLE_ENV = "MDRAD_NO_DEFAULT_XLA_FLAGS"


def _jaxlib_version() -> str | None:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None


def default_flags(platform: str | None = None) -> dict[str, str]:
  """The defaults that :func:`apply_defaults` would add for ``platform`` (before looking at XLA_FLAGS)."""
  if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
    return {}
  if _jaxlib_version() not in TESTED_JAXLIB:
    return {}
  platform = platform or os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0].strip() or "cpu"
  return dict(DEFAULT_FLAGS.get(platform, {}))


def apply_defaults(platform: str | None = None) -> str:
  """Adds the default flags missing from ``XLA_FLAGS``; returns the resulting ``XLA_FLAGS``."""
  flags = default_flags(platform)
  current = os.environ.get("XLA_FLAGS", "")
  present = {part.split("=", 1)[0] for part in current.split()}
  extra = [f"{k}={v}" for k, v in flags.items() if k not in present]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
  return os.environ.get("XLA_FLAGS", "")
