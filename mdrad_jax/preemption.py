"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what SLURM, Kubernetes and TPU preemption send).

Inside :class:`StopOnSignal` the two signals no longer kill the process: the current step finishes, the loop
asks :meth:`StopOnSignal.should_stop` after every step, writes a checkpoint of that step and raises
:class:`mdrad_jax.errors.Interrupted` (one line from ``main.py``, exit status 128 + the signal number).

With several processes every process must checkpoint the same step.  There JAX's preemption service (started
by ``jax.distributed.initialize``) catches SIGTERM itself, tells the other processes, and
``reached_preemption_sync_point`` (through orbax's ``CheckpointManager.reached_preemption``) returns True on
every process at the same step; a SIGINT is passed on to that service as a SIGTERM so that it is agreed on the
same way.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
  """Context manager turning SIGINT/SIGTERM into a stop request checked at step boundaries."""

  def __init__(self, *, multiprocess: bool = False):
    self.multiprocess = bool(multiprocess)
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  def _handler(self, signum, frame):  # noqa: ARG002
    if self.signum is None:
      self.signum = signum
    elif signum == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait for the checkpoint
      raise KeyboardInterrupt
    if self.multiprocess and signum == signal.SIGINT:
      signal.raise_signal(signal.SIGTERM)  # to JAX's preemption service, which syncs all processes

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be set from the main thread
    wanted = (signal.SIGINT,) if self.multiprocess else SIGNALS
    for s in wanted:
      self._previous[s] = signal.getsignal(s)
      signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h if h is not None else signal.SIG_DFL)
    self._previous.clear()

  def should_stop(self, step: int, checkpoint_manager=None) -> bool:
    """True when this step is the one to checkpoint and stop at (the same step on every process)."""
    if self.multiprocess and checkpoint_manager is not None:
      if checkpoint_manager.reached_preemption(int(step)):
        if self.signum is None:
          self.signum = signal.SIGTERM
        return True
      return False
    return self.signum is not None

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else "signal"
