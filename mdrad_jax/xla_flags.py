"""Default XLA flags, applied before JAX initialises its backends (overridable by the user).

The defaults are empty until a flag is measured to help on the library's own train step (see
``docs/performance.md``).  A flag the user already put in ``XLA_FLAGS`` is never changed; set
``MDRAD_NO_DEFAULT_XLA_FLAGS=1`` to add none.
"""
from __future__ import annotations

import os

# flag name -> value, per platform ('cpu' applies only when no accelerator is requested).
DEFAULT_FLAGS: dict[str, dict[str, str]] = {"cpu": {}}


def apply_defaults(platform: str | None = None) -> str:
  if os.environ.get("MDRAD_NO_DEFAULT_XLA_FLAGS"):
    return os.environ.get("XLA_FLAGS", "")
  platform = platform or os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] or "cpu"
  flags = DEFAULT_FLAGS.get(platform, {})
  current = os.environ.get("XLA_FLAGS", "")
  present = {part.split("=", 1)[0] for part in current.split()}
  extra = [f"{k}={v}" for k, v in flags.items() if k not in present]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
  return os.environ.get("XLA_FLAGS", "")
