"""Serving an export: raw query features -> query tower -> top-K catalogue items.

``Retriever.load(EXPORT_DIR)`` reads a directory written by ``launch/export.py`` (layout in
docs/serving.md), checks it (format version, files, sha256 checksums) and serves it:

    r = Retriever.load("exports/base")
    res = r.search({"q_topic": 3, "q_style": 5, "q_history": [1, 2, 3]}, k=10)
    res.keys[0], res.scores[0]            # the 10 best items of the first query, best first
    r.similar_items(1234, k=10)           # item-to-item: the items closest to item key 1234

This package depends on numpy and jax only (plus, for ``method="ann"``, the optional ``ann``
extra); it never imports flax, orbax or the training code: the query tower is a ``jax.export``
artifact (StableHLO) called with its parameters from ``query_params.npz`` (the item tower, for new
items, likewise). Its modules, by role:

* ``format``: the export format (file names, manifest, schema) and the errors of reading it;
* ``query``: raw query values -> the query tower's ids (OOV handling), the command-line syntax;
* ``search``: exact top-K (JAX matmul + top_k);
* ``ann``: the approximate backends (ScaNN, faiss) behind one protocol, ``AnnIndex``;
* ``index_store``: ANN indexes persisted in the export (``ann/BACKEND/``), checked on load;
* ``filters``: query-time filters (``exclude`` / ``allow`` item keys);
* ``retriever``: ``Retriever``, which loads an export and answers queries, and its ``Results``;
* ``http``: ``sslrec-serve``, the HTTP server (the optional ``serve`` extra; not imported here).
"""

from sslrec.serving import ann, filters, index_store
from sslrec.serving.format import (
  ANN_DIR,
  FORMAT,
  FORMAT_VERSION,
  ITEM_EMBEDDINGS,
  ITEM_KEYS,
  ITEM_NAMES,
  ITEM_PARAMS,
  ITEM_TOWER,
  ITEM_VOCABULARIES,
  MANIFEST,
  OOV_ID,
  QUERY_PARAMS,
  QUERY_TOWER,
  REQUIRED_FILES,
  SCHEMA,
  VOCABULARIES,
  ExportDirError,
  Feature,
  QueryError,
  ServingError,
  ServingWarning,
  read_item_schema,
  read_manifest,
  read_schema,
  sha256_file,
)
from sslrec.serving.query import parse_query
from sslrec.serving.retriever import Results, Retriever, format_results
from sslrec.serving.search import MAX_SCORES_PER_CHUNK, exact_search

__all__ = [
  "Retriever",
  "Results",
  "ServingError",
  "ExportDirError",
  "QueryError",
  "ServingWarning",
  "parse_query",
  "format_results",
  "read_manifest",
  "read_schema",
  "exact_search",
  "sha256_file",
  "Feature",
  "ann",
  "filters",
  "index_store",
  "read_item_schema",
  "FORMAT",
  "FORMAT_VERSION",
  "MANIFEST",
  "ITEM_EMBEDDINGS",
  "ITEM_KEYS",
  "ITEM_NAMES",
  "QUERY_TOWER",
  "QUERY_PARAMS",
  "SCHEMA",
  "VOCABULARIES",
  "ITEM_TOWER",
  "ITEM_PARAMS",
  "ITEM_VOCABULARIES",
  "ANN_DIR",
  "REQUIRED_FILES",
  "OOV_ID",
  "MAX_SCORES_PER_CHUNK",
]
