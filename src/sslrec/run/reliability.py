"""Stopping a run cleanly: preemption signals, non-finite steps, and a crash hook for tests.

* ``StopRequest``: SIGTERM / SIGINT ask the loop to save a checkpoint at the next step boundary and
  exit; a second signal stops at once. With several processes, every process must stop after the
  same step. Where JAX's distributed runtime runs its preemption service (multi-process runs
  started by ``jax.distributed.initialize``; ``jax_enable_preemption_service``, on by default),
  the runtime catches SIGTERM itself and agrees on the step: the loop asks
  ``multihost_utils.reached_preemption_sync_point`` at every step, and SIGINT is forwarded to it
  as a SIGTERM (a second SIGINT stops at once; a second SIGTERM goes to the runtime, so the
  scheduler's SIGKILL is what stops at once). Without it, each process contributes its "stop
  requested" flag to a tiny jitted all-reduce each step (one int32 per device), dispatched
  asynchronously and read ``lag`` steps later, so the check never stalls the device queue.
* ``NonFiniteError`` and ``write_nonfinite_report``: the message and the
  ``WORKDIR/nonfinite_step_<N>.json`` debugging record of a step whose loss or gradient is not
  finite.
* ``KILL_ENV``: test-only. ``SSLREC_TEST_KILL_AT_STEP=N`` makes the run SIGKILL itself right after
  step N's logging, evaluation and checkpoint call (so while the asynchronous save of step N is in
  flight when N is a checkpoint step). Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

KILL_ENV = "SSLREC_TEST_KILL_AT_STEP"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteError(FloatingPointError):
  """A step's loss or gradient was not finite; the message names the step and the loss parts."""


class Stopped(Exception):
  """The run stopped on a signal after saving a checkpoint at ``step``."""

  def __init__(self, step: int, signal_name: str, checkpoint: str):
    super().__init__(f"stopped at step {step} ({signal_name}); checkpoint {checkpoint}")
    self.step = step
    self.signal_name = signal_name
    self.checkpoint = checkpoint


def kill_step() -> int | None:
  """The step after which the test-only crash hook kills the run, or None (the normal case)."""
  v = os.environ.get(KILL_ENV, "").strip()
  return int(v) if v else None


def kill_now():
  os.kill(os.getpid(), signal.SIGKILL)


def preemption_service() -> bool:
  """Whether this process runs JAX's preemption sync service (a multi-process run started by
  ``jax.distributed.initialize`` with ``jax_enable_preemption_service``)."""
  try:
    from jax._src import distributed  # the runtime's state: no public accessor for the manager
  except ImportError:
    return False
  state = getattr(distributed, "global_state", None)
  return (
    getattr(state, "client", None) is not None
    and getattr(state, "preemption_sync_manager", None) is not None
    and getattr(state, "num_processes", 1) > 1
  )


class StopRequest:
  """Catches SIGTERM / SIGINT (from construction to ``close``); the loop asks ``should_stop(step)``
  at each step boundary (every step, on every process). ``bind(mesh)`` before the first step."""

  def __init__(self, lag: int = 2):
    self.signal_name: str | None = None
    self._previous = {}
    self._multi = False
    self._lag = lag
    self._pending = collections.deque()
    self._service = preemption_service()  # SIGTERM is the runtime's; the sync point decides
    self._calls = 0
    if threading.current_thread() is threading.main_thread():
      for sig in STOP_SIGNALS:
        if sig == signal.SIGTERM and self._service:
          continue
        self._previous[sig] = signal.signal(sig, self._handle)

  def bind(self, mesh):
    """Sets up the agreement across processes (a no-op with one process)."""
    self._multi = jax.process_count() > 1
    if self._multi and not self._service:
      sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))  # one flag per device
      self._flags = [
        jax.make_array_from_callback(
          (mesh.size,), sharding, lambda _, v=v: np.full((1,), v, np.int32)
        )
        for v in (0, 1)
      ]
      self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None:  # asked twice: stop now, without a checkpoint
      self.close()
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      os.kill(os.getpid(), signum)
      return
    self.signal_name = name
    os.write(
      2,
      f"{name} received: the run saves a checkpoint at the next step boundary and "
      f"stops (send it again to stop at once, without saving)\n".encode(),
    )
    if self._service:  # tell the runtime, which agrees on the step with every process
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """True when the loop must stop after ``step`` (the same answer on every process)."""
    del step
    local = self.signal_name is not None
    if self._service:
      # A call counter, not the step: the service's sync point counts calls from the first one
      # (a resumed run's first step is not 0), and every process calls once per step.
      stop = multihost_utils.reached_preemption_sync_point(self._calls)
      self._calls += 1
      if stop and self.signal_name is None:
        self.signal_name = "SIGTERM (a preemption notice to the distributed runtime)"
      return stop
    if not self._multi:
      return local
    self._pending.append(self._reduce(self._flags[int(local)]))
    if len(self._pending) <= self._lag:
      return False
    stop = bool(self._pending.popleft())
    if stop and self.signal_name is None:
      self.signal_name = "a stop requested by another process"
    return stop

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def format_parts(scalars: dict) -> str:
  keys = [
    k for k in ("loss", "loss/main", "loss/ssl", "loss/spread_out", "grad_norm") if k in scalars
  ]
  return ", ".join(f"{k} {scalars[k]:.6g}" for k in keys)


def write_nonfinite_report(
  workdir: str, step: int, scalars: dict, ids: dict, last_checkpoint: int | None
) -> str:
  """Writes ``WORKDIR/nonfinite_step_<step>.json``; returns its path."""
  path = os.path.join(workdir, f"nonfinite_step_{step}.json")
  record = {
    "step": step,
    "metrics": {k: (float(v) if np.isfinite(v) else str(float(v))) for k, v in scalars.items()},
    "last_good_checkpoint": last_checkpoint,
    **{k: np.asarray(v).tolist() for k, v in ids.items()},
  }
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f)
  os.replace(tmp, path)
  return path
