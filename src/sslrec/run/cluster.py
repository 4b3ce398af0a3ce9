"""A local multi-process cluster: N processes of ``launch/main.py`` on 127.0.0.1.

Each process gets ``--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i`` and
``devices_per_process`` fake CPU devices (CPU collectives through gloo), so the multi-host code path
(per-process data shares, global arrays, orbax saves from every process) runs on one machine.
Every line a process prints is prefixed with ``[i]``. When any process fails, the others are
stopped and the cluster exits with that process's exit code.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(proc: subprocess.Popen, prefix: str, out, lock: threading.Lock):
  for line in proc.stdout:
    with lock:
      out.write(f"{prefix}{line}")
      out.flush()


def run(
  main_args: list[str],
  *,
  num_processes: int,
  devices_per_process: int,
  script: str | None = None,
  port: int | None = None,
  out=None,
) -> int:
  """Runs the cluster to completion; returns 0 or the first failing process's exit code."""
  out = out or sys.stdout
  repo = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  )  # src/sslrec/run/cluster.py -> the checkout
  script = script or os.path.join(repo, "launch", "main.py")
  port = port or free_port()
  env = dict(os.environ)
  kept = [
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  env["XLA_FLAGS"] = " ".join(
    kept + [f"--xla_force_host_platform_device_count={devices_per_process}"]
  )
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONUNBUFFERED"] = "1"
  procs, threads, lock = [], [], threading.Lock()
  for i in range(num_processes):
    cmd = [
      sys.executable,
      script,
      *main_args,
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={num_processes}",
      f"--process_id={i}",
    ]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t = threading.Thread(target=_pump, args=(p, f"[{i}] ", out, lock), daemon=True)
    t.start()
    procs.append(p)
    threads.append(t)
  code = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        code = failed[0]
        break
      if all(c == 0 for c in codes):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    for p in procs:
      try:
        p.wait(timeout=20)
      except subprocess.TimeoutExpired:
        p.kill()
    for t in threads:
      t.join(timeout=5)
  return code
