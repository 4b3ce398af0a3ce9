"""The export format on disk: file names, the manifest, the schema, and the errors of reading it.

An export directory (written by ``sslrec.export``, layout in docs/serving.md) holds the files named
below; ``read_manifest`` checks it (format version, files present, sha256 checksums) and
``read_schema`` reads the query tower's input features (``Feature``) and their vocabularies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile

import numpy as np

FORMAT = "sslrec-export"
FORMAT_VERSION = 1  # bump on any change a reader of version 1 would misread
MANIFEST = "manifest.json"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_KEYS = "item_keys.npy"
ITEM_NAMES = "item_names.npy"
QUERY_TOWER = "query_tower.jax"
QUERY_PARAMS = "query_params.npz"
SCHEMA = "schema.json"
VOCABULARIES = "vocabularies.json"
# Optional (exports written before they existed lack them; readers of format 1 ignore them):
ITEM_TOWER = "item_tower.jax"  # f(params, item features) -> [B, D]: embeds new items
ITEM_PARAMS = "item_params.npz"
ITEM_VOCABULARIES = "item_vocabularies.json"  # {item feature: [raw value of id 0, ...]}
ANN_DIR = "ann"  # ann/BACKEND/: persisted ANN indexes (sslrec.serving.index_store)
REQUIRED_FILES = (ITEM_EMBEDDINGS, ITEM_KEYS, QUERY_TOWER, QUERY_PARAMS, SCHEMA, VOCABULARIES)
OOV_ID = -1  # what an unknown raw value maps to: the missing id (learned default embedding)


class ServingError(ValueError):
  """A user error while loading or querying an export; the message is one line."""


class ExportDirError(ServingError):
  """An export directory that cannot be served (missing files, other format, bad checksums)."""


class QueryError(ServingError):
  """A query that cannot be answered (unknown features, bad values, unknown item key, bad K)."""


class ServingWarning(UserWarning):
  """Something was adjusted to answer a query (e.g. K clamped to the catalogue size)."""


@dataclasses.dataclass(frozen=True)
class Feature:
  """One query-tower input as ``schema.json`` describes it."""

  name: str
  kind: str  # 'id' | 'multi' | 'dense'
  vocab_size: int = 0
  max_len: int = 1
  dense_dim: int = 0
  oov_id: int = OOV_ID
  hashed: bool = False  # values are fingerprints crc32(str(value)) & 0x7fffffff (features.py)

  @property
  def shape(self) -> tuple[int, ...]:
    return {"id": (), "multi": (self.max_len,), "dense": (self.dense_dim,)}[self.kind]

  @property
  def dtype(self):
    return np.float32 if self.kind == "dense" else np.int32


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def one_line(e: BaseException) -> str:
  """An exception's message on one line (at most 300 characters)."""
  return " ".join(str(e).split())[:300]


def cannot_read(export_dir: str, e: BaseException) -> ExportDirError:
  """The error for an export whose files exist but cannot be parsed."""
  return ExportDirError(f"{export_dir}: cannot read the export ({type(e).__name__}: {one_line(e)})")


# What reading a file of a damaged export raises (each becomes ``cannot_read``'s one line).
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


def read_schema(export_dir: str) -> tuple[list[Feature], dict[str, list]]:
  """``(query features, {feature: [raw value of id 0, id 1, ...]})`` of an export directory."""
  try:
    with open(os.path.join(export_dir, SCHEMA)) as f:
      schema = json.load(f)
    with open(os.path.join(export_dir, VOCABULARIES)) as f:
      vocabularies = json.load(f)
  except READ_ERRORS as e:
    raise cannot_read(export_dir, e) from None
  path = os.path.join(export_dir, SCHEMA)
  if not isinstance(schema, dict) or not isinstance(schema.get("query"), list):
    raise ExportDirError(f"{path}: not a schema (needs an object with a 'query' list)")
  features = [_feature(path, i, f) for i, f in enumerate(schema["query"])]
  names = [f.name for f in features]
  if len(set(names)) != len(names):
    raise ExportDirError(f"{path}: query feature names repeat: {names}")
  vpath = os.path.join(export_dir, VOCABULARIES)
  if not isinstance(vocabularies, dict) or not all(
    isinstance(k, str) and isinstance(v, list) for k, v in vocabularies.items()
  ):
    raise ExportDirError(f"{vpath}: not an object of {{feature: [values...]}}")
  return features, vocabularies


_LIMITS = {"vocab_size": 2**31 - 1, "max_len": 1 << 20, "dense_dim": 1 << 20}


def _feature(path: str, i: int, entry, side: str = "query") -> Feature:
  """One ``schema.json`` query (or item) entry, checked (a tampered one is an ExportDirError)."""
  where = f"{path}: {side} feature {i}"
  if not isinstance(entry, dict):
    raise ExportDirError(f"{where}: not an object")
  unknown = sorted(set(entry) - {f.name for f in dataclasses.fields(Feature)})
  if unknown:
    raise ExportDirError(f"{where}: unknown fields {unknown}")
  name, kind = entry.get("name"), entry.get("kind")
  if not isinstance(name, str) or not name:
    raise ExportDirError(f"{where}: 'name' is {name!r}, not a non-empty string")
  if kind not in ("id", "multi", "dense"):
    raise ExportDirError(f"{where} ({name}): 'kind' is {kind!r}; allowed: 'id', 'multi', 'dense'")
  for key, limit in _LIMITS.items():
    v = entry.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= limit:
      raise ExportDirError(f"{where} ({name}): {key!r} is {v!r}; allowed: an integer 0..{limit}")
  oov = entry.get("oov_id", OOV_ID)
  if not isinstance(oov, int) or isinstance(oov, bool) or oov < -1:
    raise ExportDirError(f"{where} ({name}): 'oov_id' is {oov!r}; allowed: -1 or an id")
  if not isinstance(entry.get("hashed", False), bool):
    raise ExportDirError(f"{where} ({name}): 'hashed' is {entry.get('hashed')!r}, not a bool")
  return Feature(**entry)


def read_item_schema(export_dir: str) -> tuple[list[Feature], dict[str, list]]:
  """``(item features, {item feature: [raw value of id 0, ...]})`` of an export with an item
  tower (the schema's ``item`` entries and ``item_vocabularies.json``)."""
  try:
    with open(os.path.join(export_dir, SCHEMA)) as f:
      schema = json.load(f)
    with open(os.path.join(export_dir, ITEM_VOCABULARIES)) as f:
      vocabularies = json.load(f)
  except READ_ERRORS as e:
    raise cannot_read(export_dir, e) from None
  path = os.path.join(export_dir, SCHEMA)
  if not isinstance(schema, dict) or not isinstance(schema.get("item"), list):
    raise ExportDirError(f"{path}: not a schema with an 'item' list")
  features = [_feature(path, i, f, "item") for i, f in enumerate(schema["item"])]
  vpath = os.path.join(export_dir, ITEM_VOCABULARIES)
  if not isinstance(vocabularies, dict) or not all(
    isinstance(k, str) and isinstance(v, list) for k, v in vocabularies.items()
  ):
    raise ExportDirError(f"{vpath}: not an object of {{feature: [values...]}}")
  return features, vocabularies


def read_manifest(export_dir: str, *, verify: bool = True) -> dict:
  """The manifest of an export directory, after checking format, files and (optionally) sha256s."""
  if not os.path.isdir(export_dir):
    raise ExportDirError(f"{export_dir}: no such export directory")
  path = os.path.join(export_dir, MANIFEST)
  if not os.path.isfile(path):
    raise ExportDirError(
      f"{export_dir}: not an sslrec export (no {MANIFEST}); write one with launch/export.py"
    )
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportDirError(f"{path}: unreadable ({one_line(e)})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ExportDirError(f"{path}: not an sslrec export manifest (format != {FORMAT!r})")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ExportDirError(
      f"{export_dir} was written in export format version {version!r}; this sslrec reads "
      f"version {FORMAT_VERSION}: re-export the run with this version (launch/export.py)"
    )
  files = manifest.get("files")
  needed = ("step", "num_items", "embedding_dim")
  if not isinstance(files, dict) or any(k not in manifest for k in needed):
    raise ExportDirError(f"{path}: incomplete manifest (needs 'files', {', '.join(needed)})")
  missing = [
    n
    for n in sorted(set(files) | set(REQUIRED_FILES))
    if not os.path.isfile(os.path.join(export_dir, n))
  ]
  if missing:
    raise ExportDirError(
      f"{export_dir}: missing files: {', '.join(missing)} (an incomplete copy? "
      "copy the whole directory, or re-export)"
    )
  unlisted = [n for n in REQUIRED_FILES if n not in files]
  if unlisted:
    raise ExportDirError(f"{path}: no checksum for {', '.join(unlisted)}")
  if verify:
    bad = [
      n
      for n, meta in sorted(files.items())
      if sha256_file(os.path.join(export_dir, n)) != meta.get("sha256")
    ]
    if bad:
      raise ExportDirError(
        f"{export_dir}: checksum mismatch for {', '.join(bad)} (changed or "
        "corrupted since export; re-export or copy it again)"
      )
  return manifest
