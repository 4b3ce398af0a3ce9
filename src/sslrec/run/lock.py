"""One owner per directory: an advisory lock file naming its holder.

A training run holds ``WORKDIR/.lock`` from the moment its workdir is accepted until it ends
(one multi-host job holds it through process 0); an export holds ``.<out>.lock`` beside its
``--out``. A second run on the same workdir, or a second export to the same ``--out``, is refused
in one line that names the holder (pid, host, command, since when), and the first is untouched.

The lock is ``fcntl.flock`` on the file: the kernel drops it when its holder exits, however it
exits (SIGKILL, a crash, a lost machine's NFS lease), so a lock is never left held by a dead
process. A lock file that still names a holder but is not locked is *stale* (its holder ended
without releasing it, e.g. on SIGKILL): it is taken over, and the caller is told whose it was.
A clean release removes the file. Where the file system does not support locks (some network
file systems), the run goes on without one and says so once.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys


class Busy(ValueError):
  """The directory is owned by another live process; the message names it."""


def _holder() -> dict:
  return {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def describe(holder: dict | None) -> str:
  if not holder:
    return "an unknown process"
  return (
    f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
    f"({holder.get('command')})"
  )


def _read(fd: int) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  data = b""
  while chunk := os.read(fd, 1 << 16):
    data += chunk
  if not data.strip():
    return None  # a new lock file, or one released cleanly
  try:
    value = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return {"command": "a lock file that is not JSON"}
  return value if isinstance(value, dict) else {"command": "a lock file that is not an object"}


class Lock:
  """A held lock (``acquire``); ``release`` (or the context manager's exit) drops it.

  Attributes:
    path: the lock file.
    stale: the holder a stale lock named (taken over), else None.
    supported: False where the file system refused to lock (the run holds no lock).
  """

  def __init__(self, path: str, fd: int | None, stale: dict | None, supported: bool):
    self.path, self._fd, self.stale, self.supported = path, fd, stale, supported

  def release(self) -> None:
    """Removes the lock file (a clean release leaves nothing behind) and drops the lock."""
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still held: a process that opened it re-checks (acquire)
    except OSError:
      pass
    finally:
      os.close(self._fd)  # closing drops the flock
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def acquire(path: str, what: str) -> Lock:
  """Takes the lock file ``path`` (created if needed); ``what`` names the locked thing in the
  error (e.g. ``--workdir=runs/x``). Raises Busy when a live process holds it."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        holder = _read(fd)
        os.close(fd)
        raise Busy(
          f"{what} is in use by another process: {describe(holder)}; wait for it to finish, "
          f"stop it, or use another directory (lock file {path})"
        ) from None
      os.close(fd)
      return Lock(path, None, None, supported=False)  # e.g. ENOLCK on a network file system
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # the file was released (unlinked) between our open and flock: take the new one
  stale = _read(fd)
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(_holder()).encode("utf-8"))
  os.fsync(fd)
  return Lock(path, fd, stale, supported=True)
