"""Persisted ANN indexes: ``EXPORT_DIR/ann/BACKEND/``, built once, read by every later load.

Building an approximate index costs ~30 s at 10^6 items (docs/serving.md); a server process
should not pay it on every start. ``save`` writes an index's files (``AnnIndex.save``) with an
``index.json``:

    {"backend": "scann", "package_version": "1.4.2", "state": {...}, "calibration": {...},
     "item_embeddings_sha256": "...", "files": {name: {"sha256": ..., "bytes": ...}}}

into a temporary directory next to ``ann/BACKEND`` and renames it into place when complete.
``load`` reads it back only if it belongs to this export's catalogue (the sha256 of the
``item_embeddings.npy`` it was built from equals the manifest's) and its files are exactly the
listed ones with their checksums. Anything else -- a tampered or truncated file, an extra file,
an index built for other embeddings, another backend, an unreadable ``index.json`` -- is refused
with one ``ExportDirError`` line naming the file and the fix (delete the directory to fall back to
building in memory, or rebuild it with ``Retriever.save_ann_index``): a persisted index is never
silently replaced, and its files are never loaded (ScaNN's may include a pickle) unverified.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile

from sslrec.serving import ann
from sslrec.serving.format import ANN_DIR, ExportDirError, one_line, sha256_file

INDEX_META = "index.json"


def directory(export_dir: str, backend: str) -> str:
  return os.path.join(export_dir, ANN_DIR, backend)


def _version(backend: str) -> str | None:
  try:
    return importlib.metadata.version(ann.BACKENDS[backend].package)
  except importlib.metadata.PackageNotFoundError:
    return None


def save(index: ann.AnnIndex, export_dir: str, items_sha256: str) -> str:
  """Writes ``index`` to ``ann/<backend>/`` of ``export_dir`` (replacing one there); returns it."""
  final = directory(export_dir, index.backend)
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{index.backend}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)
    index.save(tmp)
    names = sorted(os.listdir(tmp))
    meta = {
      "backend": index.backend,
      "package_version": _version(index.backend),
      "state": index.state(),
      "calibration": index.calibration,
      "item_embeddings_sha256": items_sha256,
      "files": {
        n: {
          "sha256": sha256_file(os.path.join(tmp, n)),
          "bytes": os.path.getsize(os.path.join(tmp, n)),
        }
        for n in names
      },
    }
    with open(os.path.join(tmp, INDEX_META), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.isdir(final):
      old = tempfile.mkdtemp(prefix=f".{index.backend}.old-", dir=parent)
      os.rename(final, os.path.join(old, "index"))
      os.rename(tmp, final)
      shutil.rmtree(old)
    else:
      os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def saved_backends(export_dir: str) -> list[str]:
  """The backends with a persisted index in ``export_dir``."""
  root = os.path.join(export_dir, ANN_DIR)
  if not os.path.isdir(root):
    return []
  return sorted(b for b in ann.BACKENDS if os.path.isfile(os.path.join(root, b, INDEX_META)))


def load(export_dir: str, backend: str, items_sha256: str, *, verify: bool = True):
  """The persisted ``backend`` index of ``export_dir``, or None when there is none.

  Raises ExportDirError (one line) for an index that does not belong to this export or whose
  files changed since it was saved (checksums checked unless ``verify`` is False).
  """
  d = directory(export_dir, backend)
  meta_path = os.path.join(d, INDEX_META)
  if not os.path.isfile(meta_path):
    return None
  fix = f"delete {d} to build the index in memory instead, or rebuild it (Retriever.save_ann_index)"
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    files, state = meta["files"], meta["state"]
    if not isinstance(files, dict) or not isinstance(state, dict):
      raise TypeError("'files' and 'state' must be objects")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ExportDirError(f"{meta_path}: unreadable ({one_line(e)}); {fix}") from None
  if meta.get("backend") != backend:
    raise ExportDirError(
      f"{meta_path}: holds a {meta.get('backend')!r} index, not {backend!r}; {fix}"
    )
  if meta.get("item_embeddings_sha256") != items_sha256:
    raise ExportDirError(
      f"{d} was built for other item embeddings than this export's (item_embeddings.npy sha256 "
      f"differs): it does not match this catalogue; {fix}"
    )
  present = sorted(set(os.listdir(d)) - {INDEX_META})
  if present != sorted(files):
    extra = sorted(set(present) - set(files))
    missing = sorted(set(files) - set(present))
    raise ExportDirError(
      f"{d}: files differ from {INDEX_META} (unlisted: {', '.join(extra) or 'none'}; missing: "
      f"{', '.join(missing) or 'none'}); {fix}"
    )
  if verify:
    bad = [
      n for n, m in sorted(files.items()) if sha256_file(os.path.join(d, n)) != m.get("sha256")
    ]
    if bad:
      raise ExportDirError(
        f"{d}: checksum mismatch for {', '.join(bad)} (changed or corrupted since it was saved); "
        f"{fix}"
      )
  try:
    index = ann.BACKENDS[backend].load(d, state)
  except ann.AnnUnavailable:
    raise
  except Exception as e:  # noqa: BLE001 -- a backend's reader raises many types; all mean unusable
    raise ExportDirError(
      f"{d}: the {backend} index cannot be read ({type(e).__name__}: {one_line(e)}; saved with "
      f"{ann.BACKENDS[backend].package} {meta.get('package_version')}, this is "
      f"{_version(backend)}); {fix}"
    ) from None
  index.calibration = meta.get("calibration")
  return index
