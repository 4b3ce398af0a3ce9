"""Top-K items of an export: ``sslrec-retrieve --export=DIR --query='q_topic=3' --k=10`` (or
``python launch/retrieve.py ...`` in a checkout).

``--query='name=value,name=v1|v2|v3'``: raw feature values (``|`` separates the values of a
multi-valued or dense feature); ``--query_json='{"q_history": [1, 2, 3]}'`` for values the short
syntax cannot hold; ``--item=KEY``: the items most similar to that item (item-to-item). Prints a
table of items (with names where the dataset has them) and scores. ``--exclude=K1,K2`` /
``--allow=K1,K2``: item keys never returned / the only ones that may be. See docs/serving.md.
"""

import json
import sys
import warnings

from absl import app, flags, logging

from sslrec import cli
from sslrec.serving import ann

_EXPORT = flags.DEFINE_string("export", None, "Export directory written by launch/export.py.")
_QUERY = flags.DEFINE_string("query", None, "Raw query features: 'name=value,name=v1|v2|v3'.")
_QUERY_JSON = flags.DEFINE_string("query_json", None, "Raw query features as a JSON object.")
_ITEM = flags.DEFINE_string("item", None, "Item key: return the items most similar to it.")
_K = flags.DEFINE_integer("k", 10, "Number of items to return.")
_METHOD = flags.DEFINE_enum(
  "method",
  "exact",
  ["exact", "ann"],
  "exact (JAX, every item scored) or ann (approximate index, needs the 'ann' extra).",
)
_BACKEND = flags.DEFINE_enum("backend", "auto", ["auto", *ann.BACKENDS], "ann backend.")
_EXCLUDE = flags.DEFINE_list("exclude", None, "Item keys never returned (e.g. seen items).")
_ALLOW = flags.DEFINE_list("allow", None, "Item keys that alone may be returned.")
_NO_VERIFY = flags.DEFINE_bool("no_verify", False, "Skip the sha256 check of the export's files.")
flags.mark_flag_as_required("export")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter out of the table
  from sslrec import serving

  given = [
    n
    for n, f in (("--query", _QUERY), ("--query_json", _QUERY_JSON), ("--item", _ITEM))
    if f.value is not None
  ]
  try:
    if len(given) != 1:
      raise serving.QueryError(
        "give exactly one of --query, --query_json, --item"
        + (f" (got {', '.join(given)})" if given else "")
      )
    r = serving.Retriever.load(_EXPORT.value, verify=not _NO_VERIFY.value)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", serving.ServingWarning)  # also in res.notes, printed below
      kw = dict(
        k=_K.value,
        method=_METHOD.value,
        backend=_BACKEND.value,
        exclude=_EXCLUDE.value,
        allow=_ALLOW.value,
      )
      if _ITEM.value is not None:
        res = r.similar_items(_ITEM.value, **kw)
        row = r.item_row(_ITEM.value)
        name = f" ({r.item_names[row]})" if r.item_names is not None else ""
        title = f"items most similar to item {r.item_keys[row]}{name}"
      else:
        if _QUERY.value is not None:
          query = serving.parse_query(_QUERY.value)
        else:
          try:
            query = json.loads(_QUERY_JSON.value)
          except ValueError as e:
            raise serving.QueryError(f"--query_json is not valid JSON ({e})") from None
        res = r.search(query, **kw)
        title = "query " + ", ".join(
          f"{k}={'|'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in query.items()
        )
  except serving.ServingError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  for note in res.notes:
    print(f"note: {note}", file=sys.stderr)
  print(
    f"{title}: top {res.rows.shape[1]} of {r.num_items} items ({res.method} search; export of "
    f"step {r.step})"
  )
  print(serving.format_results(res))


def run():
  """The ``sslrec-retrieve`` console script."""
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
