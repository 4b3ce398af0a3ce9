"""Paths of runs and exports through ``etils.epath``: local folders and ``gs://``, ``s3://``, ...
alike (orbax writes its checkpoints through the same layer).

A remote path needs its filesystem's client (``gs://``: gcsfs, ``pip install sslrec[gcs]``, or
TensorFlow; ``s3://``: s3fs); ``check`` turns a missing one into one ``PathError`` line instead of
the silent local folder named ``gs:`` that ``os.makedirs`` would create.
"""

from __future__ import annotations

import os
import re

from etils import epath

_CLIENTS = {"gs": "gcsfs (pip install 'sslrec[gcs]')", "s3": "s3fs (pip install s3fs)"}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class PathError(ValueError):
  """A path whose filesystem is unknown or whose client is not installed."""


def scheme(p) -> str | None:
  """``'gs'`` for ``gs://bucket/x``; None for a local path."""
  m = _SCHEME.match(os.fspath(p))
  return m.group(1) if m else None


def is_remote(p) -> bool:
  return scheme(p) is not None


def path(p, *, flag: str = "path") -> epath.Path:
  """``p`` as an ``epath.Path``; PathError for a filesystem etils does not know."""
  s = os.fspath(p)
  try:
    return epath.Path(s)
  except KeyError:
    raise PathError(
      f"{flag}={s}: unknown filesystem {scheme(s)}://; use a local path, gs://, s3:// or "
      "another filesystem etils.epath knows"
    ) from None


def check(p, *, flag: str = "path") -> epath.Path:
  """``path(p)``, after one look at it, so that a remote filesystem whose client is missing (or
  that cannot be reached) is one PathError line naming the flag and the client to install."""
  out = path(p, flag=flag)
  if is_remote(p):
    try:
      out.exists()
    except ImportError as e:
      name = scheme(p)
      raise PathError(
        f"{flag}={os.fspath(p)}: reading {name}:// paths needs "
        f"{_CLIENTS.get(name, 'its filesystem client')}, which is not installed ({e})"
      ) from None
  return out


def join(p, *parts) -> str:
  """``os.path.join`` for local and remote paths alike."""
  if not is_remote(p):
    return os.path.join(p, *parts)
  return os.fspath(path(p).joinpath(*parts))


def upload(local_dir: str, remote: str) -> None:
  """Copies the files under ``local_dir`` to the folder ``remote`` (any epath filesystem)."""
  dst = path(remote)
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = dst if rel == "." else dst.joinpath(rel)
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        target.joinpath(name).write_bytes(f.read())
