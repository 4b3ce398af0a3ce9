"""Interaction logs -> ``Dataset``: time-respecting split, vocabularies, query contexts, history.

Both file readers (``movielens.py``, ``files.py``) parse their files into a ``Log`` (one row per
interaction: key, item, time, positive) and two ``Table``s of raw features, then call ``build``.

**Split** (``split``) into three periods, train < validation < test in time: 'global' puts every
event at or after one time cutoff (the time of the event at quantile ``1 - eval_fraction``) into
the test period, and the events from the cutoff at quantile ``1 - eval_fraction -
valid_fraction`` up to it into the validation period (the slice just before test); 'user' does so
per key, at the times of the key's ``floor(eval_fraction * n)``-th and ``floor((eval_fraction +
valid_fraction) * n)``-th latest events (ties at a boundary go to the later period, so each key's
events of one period are strictly earlier than those of the next). D_train = the positives of the
training period; validation / test pairs = the positives of their periods. Non-positive events
(e.g. low ratings) still count as *seen*: they feed the history and the evaluation's exclusions.

**Vocabularies** come from the training period only: item features from the items of its events,
query features from its keys (see ``encode.py``: OOV id 0, or hash buckets).

**Queries** are contexts, one row each (``mode``):

* 'user'  the key is a row of the query table. With a 'history' feature, every training pair gets
  its own context (the key's features + its latest ``max_len`` items strictly before the pair's
  time, most recent first) and every key with validation (test) pairs one context at the start of
  its validation (test) period (history = its latest items before that period), so no held-out
  item is ever in the history of its own period's query.
  Without one, the query table's rows are the contexts.
* 'item'  the key is itself an item (e.g. a page linking to another): queries are the catalogue's
  rows, read with the item features.
* 'previous_item'  the key is a user; the query of a training pair is the user's previous item
  (strictly earlier), the query of its held-out pairs the user's last item before their period.

**Seen items**: each held-out context gets the items of its key's events before its period
(``Dataset.valid_seen_*`` / ``eval_seen_*``), which evaluation removes from its ranking. The model
trains on the training period only; a test query's history and exclusions also hold its
validation-period events (known at test time, never trained on).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from sslrec import features as features_lib
from sslrec.data import encode
from sslrec.data import table as table_lib

PAD = features_lib.PAD
SPLITS = ("global", "user")
TRAIN, VALID, TEST = 0, 1, 2  # the periods, in time order
MODES = ("user", "item", "previous_item")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Log:
  """Interactions after key lookup, ``[E]`` each.

  Attributes:
    key: int64 grouping key: a query table row ('user' mode, 'previous_item': the user) or an
      item row ('item' mode).
    item: int64 item table row.
    time: int64 / float64 time (ties keep the file order).
    positive: bool, True for a D_train / eval pair (False: seen only).
  """

  key: np.ndarray
  item: np.ndarray
  time: np.ndarray
  positive: np.ndarray


@dataclasses.dataclass(frozen=True)
class Table:
  """Raw features of a table's ``num_rows`` rows: ``raw[name]`` for each ``Decl`` in ``decls``."""

  decls: tuple[encode.Decl, ...]
  raw: dict
  num_rows: int


@dataclasses.dataclass(frozen=True)
class Split:
  """The sorted log and its periods (arrays over sorted events, or over keys present)."""

  order: np.ndarray  # [E] original index of each sorted event
  key: np.ndarray
  item: np.ndarray
  time: np.ndarray
  positive: np.ndarray
  period: np.ndarray  # int8 [E]: TRAIN, VALID or TEST
  key_start: np.ndarray  # [E] first sorted position of the event's key
  tie_start: np.ndarray  # [E] first sorted position of the event's (key, time) group
  keys: np.ndarray  # [K] distinct keys, sorted
  first: np.ndarray  # [K] first sorted position of each key
  num_before: dict  # {VALID, TEST: [K]} events of each key before that period (a prefix)


def index_of(table_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """Row of each of ``keys`` in ``table_keys`` (distinct): ``int64 [len(keys)]``, -1 if absent."""
  table_keys, keys = np.asarray(table_keys), np.asarray(keys)
  if table_keys.size == 0:
    return np.full(keys.shape, -1, np.int64)
  order = np.argsort(table_keys, kind="stable")
  sorted_keys = table_keys[order]
  pos = np.clip(np.searchsorted(sorted_keys, keys), 0, sorted_keys.size - 1)
  return np.where(sorted_keys[pos] == keys, order[pos], -1).astype(np.int64)


def first_duplicate(keys: np.ndarray):
  """``(row, value)`` of the first repeated key (in row order), or None."""
  keys = np.asarray(keys)
  _, first = np.unique(keys, return_index=True)
  if first.size == keys.size:
    return None
  dup = np.ones(keys.size, bool)
  dup[first] = False
  row = int(np.flatnonzero(dup)[0])
  return row, keys[row].item() if hasattr(keys[row], "item") else keys[row]


def known(
  rows: np.ndarray, keys: np.ndarray, policy: str, *, what: str, table: str, source: str
) -> np.ndarray:
  """``bool [E]``: the interactions whose key was found (``rows >= 0``).

  Interactions with an unknown key are counted and reported: dropped with a warning
  (``policy='drop'``) or a DataError (``'error'``).
  """
  ok = rows >= 0
  bad = int((~ok).sum())
  if bad:
    examples = ", ".join(str(v) for v in np.unique(np.asarray(keys)[~ok])[:5].tolist())
    msg = (
      f"{source}: {bad} of {rows.size} interactions have {what} absent from {table} "
      f"(e.g. {examples})"
    )
    if policy == "error":
      raise table_lib.DataError(f"{msg}; config.data.unknown_items='drop' drops them")
    log.warning("%s; dropped (config.data.unknown_items='drop')", msg)
  return ok


def split_log(lg: Log, how: str, eval_fraction: float, valid_fraction: float = 0.0) -> Split:
  """Sorts by (key, time, file order) and marks the periods (see the module docstring)."""
  if how not in SPLITS:
    raise ValueError(f"split={how!r}; allowed: {SPLITS}")
  n = lg.key.size
  order = np.lexsort((lg.time, lg.key))  # stable: equal (key, time) keep the file order
  key, item = lg.key[order], lg.item[order]
  time, positive = lg.time[order], lg.positive[order]
  idx = np.arange(n)
  new_key = np.ones(n, bool)
  new_key[1:] = key[1:] != key[:-1]
  new_tie = new_key.copy()
  new_tie[1:] |= time[1:] != time[:-1]
  key_start = np.maximum.accumulate(np.where(new_key, idx, 0))
  tie_start = np.maximum.accumulate(np.where(new_tie, idx, 0))
  first = np.flatnonzero(new_key)
  count = np.diff(np.append(first, n))
  seg = np.cumsum(new_key) - 1

  def held_out(fraction: float) -> np.ndarray:  # bool [E]: the latest `fraction` of the events
    if fraction <= 0:
      return np.zeros(n, bool)
    if how == "global":
      cut_at = min(n - 1, max(0, math.ceil((1.0 - fraction) * n - 1e-9)))
      return time >= np.sort(time)[cut_at]
    num = np.floor(fraction * count + 1e-9).astype(np.int64)
    boundary = np.minimum(first + count - num, n - 1)
    return (num[seg] > 0) & (time >= time[boundary][seg])

  is_test = held_out(eval_fraction)
  is_held = held_out(eval_fraction + valid_fraction) | is_test if valid_fraction > 0 else is_test
  period = np.where(is_test, TEST, np.where(is_held, VALID, TRAIN)).astype(np.int8)
  num_before = {
    p: np.bincount(seg, period < p, minlength=first.size).astype(np.int64) for p in (VALID, TEST)
  }
  return Split(
    order, key, item, time, positive, period, key_start, tie_start, key[first], first, num_before
  )


def _history(end: np.ndarray, low: np.ndarray, event_ids: np.ndarray, length: int) -> np.ndarray:
  """``int32 [M, length]``: ``event_ids`` at sorted positions ``end-1, end-2, ...`` down to
  ``low`` (most recent first), right-padded with -1."""
  pos = end[:, None] - 1 - np.arange(length)[None, :]
  valid = pos >= low[:, None]
  return np.where(valid, event_ids[np.maximum(pos, 0)], PAD).astype(np.int32)


def _encode_table(tab: Table, fit: np.ndarray, embed_dim: int):
  arrays, specs, vocabs = {}, [], {}
  for d in tab.decls:
    arr, spec, vocab = encode.encode(d, tab.raw[d.name], fit, embed_dim)
    arrays[d.name] = arr
    specs.append(spec)
    if vocab is not None:
      vocabs[d.name] = vocab
  return arrays, specs, vocabs


def _concat(a: dict, b: dict) -> dict:
  return {k: np.concatenate([a[k], b[k]], axis=0) for k in a}


def build(
  name: str,
  lg: Log,
  items: Table,
  queries: Table | None,
  *,
  mode: str,
  split: str,
  eval_fraction: float,
  seed: int,
  embed_dim: int,
  item_keys: np.ndarray,
  item_names: np.ndarray | None = None,
  share_tables: bool = False,
  describe: str = "",
  valid_fraction: float = 0.0,
) -> table_lib.Dataset:
  """The Dataset of a log (see the module docstring).

  Args:
    name: dataset name.
    lg: the interactions.
    items: the catalogue's raw features; row i is item i.
    queries: the query table's raw features ('user' mode; may hold one 'history' decl).
    mode: 'user' | 'item' | 'previous_item'.
    split / eval_fraction / valid_fraction: the time split (test, and the validation slice
      just before it; ``valid_fraction=0``: no validation split).
    seed: orders the held-out pairs (so ``eval.max_queries`` takes a random sample).
    embed_dim: every feature's embedding width.
    item_keys: ``[N]`` raw item keys (the 'history' feature's vocabulary values).
    item_names: optional ``[N]`` display names.
    share_tables: the query tower reads the item tower's tables ('item', 'previous_item' modes).
    describe: what to name in errors (source and the fields that shaped the split).

  Raises:
    DataError: when a split has no pairs.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; allowed: {MODES}")
  where = f" ({describe})" if describe else ""
  if not lg.positive.any():
    raise table_lib.DataError(f"{name}: no positive interactions{where}")
  s = split_log(lg, split, eval_fraction, valid_fraction)
  periods = (VALID, TEST) if valid_fraction > 0 else (TEST,)
  period_name = {VALID: "validation", TEST: "test"}
  train_pos = np.flatnonzero((s.period == TRAIN) & s.positive)
  held = {p: np.flatnonzero((s.period == p) & s.positive) for p in periods}
  if train_pos.size == 0:
    raise table_lib.DataError(f"{name}: the training period has no positive interactions{where}")
  for p in periods:
    if held[p].size == 0:
      raise table_lib.DataError(
        f"{name}: the {period_name[p]} period has no positive interactions{where}"
      )
  train_period = s.period == TRAIN

  # Items: vocabularies from the training period's items (and query items in 'item' mode).
  fit_items = np.zeros(items.num_rows, bool)
  fit_items[s.item[train_period]] = True
  if mode == "item":
    fit_items[s.key[train_period]] = True
  item_arrays, item_specs, vocabs = _encode_table(items, fit_items, embed_dim)
  item_spec = features_lib.TowerSpec("item", tuple(item_specs))

  seg = np.searchsorted(s.keys, s.key)  # [E] index of the event's key in s.keys
  held_keys = {p: np.unique(seg[held[p]]) for p in periods}  # indices into s.keys
  ctx_of_key = {p: np.full(s.keys.size, -1, np.int64) for p in periods}
  dropped = 0
  if mode == "user":
    fit_q = np.zeros(queries.num_rows, bool)
    fit_q[s.key[train_period]] = True
    static = Table(
      tuple(d for d in queries.decls if d.kind != "history"), queries.raw, queries.num_rows
    )
    q_arrays, q_specs, q_vocabs = _encode_table(static, fit_q, embed_dim)
    vocabs.update(q_vocabs)
    hist = [d for d in queries.decls if d.kind == "history"]
    if hist:
      (h,) = hist
      if h.buckets > 0:
        event_ids = encode.hash_ids(item_keys[s.item], h.buckets)
        hist_size, hist_vocab = h.buckets, None
      else:
        vocab = encode.Vocabulary(item_keys[fit_items])
        event_ids = vocab.lookup(item_keys[s.item])
        hist_size, hist_vocab = vocab.size, vocab.to_list()
      # One context per training pair, then one per held-out key at the start of each period.
      ks = [held_keys[p] for p in periods]
      ctx_key = np.concatenate([s.key[train_pos]] + [s.keys[k] for k in ks])
      end = np.concatenate(
        [s.tie_start[train_pos]] + [s.first[k] + s.num_before[p][k] for p, k in zip(periods, ks)]
      )
      low = np.concatenate([s.key_start[train_pos]] + [s.first[k] for k in ks])
      q_arrays = table_lib.take(q_arrays, ctx_key)
      q_arrays[h.name] = _history(end, low, event_ids, h.max_len)
      q_specs.append(
        features_lib.FeatureSpec(
          h.name,
          "multi",
          vocab_size=int(hist_size),
          max_len=h.max_len,
          embed_dim=embed_dim,
          hashed=h.buckets > 0,
          second_hash=h.second_hash,
        )
      )
      if hist_vocab is not None:
        vocabs[h.name] = hist_vocab
      train_ctx = np.arange(train_pos.size)
      offset = train_pos.size
      for p, k in zip(periods, ks):
        ctx_of_key[p][k] = offset + np.arange(k.size)
        offset += k.size
    else:
      train_ctx = s.key[train_pos]
      for p in periods:
        ctx_of_key[p][held_keys[p]] = s.keys[held_keys[p]]
    query_spec = features_lib.TowerSpec("query", tuple(q_specs))
  else:
    q_arrays = dict(item_arrays)
    query_spec = features_lib.TowerSpec(
      "query", item_spec.features, share_tables_with="item" if share_tables else ""
    )
    if mode == "item":
      train_ctx = s.key[train_pos]
      for p in periods:
        ctx_of_key[p][held_keys[p]] = s.keys[held_keys[p]]
    else:  # 'previous_item'
      prev = s.tie_start[train_pos] - 1
      has_prev = prev >= s.key_start[train_pos]
      dropped = int((~has_prev).sum())
      train_pos, train_ctx = train_pos[has_prev], s.item[prev[has_prev]]
      if train_pos.size == 0:
        raise table_lib.DataError(
          f"{name}: no training pair has an earlier item to be its query{where}"
        )
      offset = items.num_rows
      for p in periods:
        k = held_keys[p][s.num_before[p][held_keys[p]] > 0]
        last = s.item[s.first[k] + s.num_before[p][k] - 1]
        q_arrays = _concat(q_arrays, table_lib.take(item_arrays, last))
        ctx_of_key[p][k] = offset + np.arange(k.size)
        offset += k.size

  out = {}
  for p in periods:
    pos = held[p]
    ctx = ctx_of_key[p][seg[pos]]
    keep = ctx >= 0
    if not keep.all():
      dropped += int((~keep).sum())
      pos, ctx = pos[keep], ctx[keep]
      if pos.size == 0:
        raise table_lib.DataError(
          f"{name}: no {period_name[p]} pair has an earlier item to be its query{where}"
        )
    perm = np.random.default_rng(seed if p == TEST else [seed, p]).permutation(pos.size)
    pos, ctx = pos[perm], ctx[perm]
    # Seen items of every held-out context: its key's items before its period.
    before = s.period < p
    seen_ctx = ctx_of_key[p][seg[before]]
    seen = np.unique(np.stack([seen_ctx, s.item[before]], axis=1)[seen_ctx >= 0], axis=0)
    out[p] = (
      ctx.astype(np.int32),
      s.item[pos].astype(np.int32),
      seen[:, 0].astype(np.int32),
      seen[:, 1].astype(np.int32),
    )
  if dropped:
    log.warning(
      "%s: %d positive interactions have no earlier item to be their query; not used", name, dropped
    )
  test_q, test_i, test_sq, test_si = out[TEST]
  valid = (
    dict(zip(("valid_query", "valid_item", "valid_seen_query", "valid_seen_item"), out[VALID]))
    if VALID in out
    else {}
  )
  return table_lib.Dataset(
    name=name,
    item_spec=item_spec,
    query_spec=query_spec,
    items=item_arrays,
    queries=q_arrays,
    train_query=np.asarray(train_ctx, np.int32),
    train_item=s.item[train_pos].astype(np.int32),
    eval_query=test_q,
    eval_item=test_i,
    item_keys=np.asarray(item_keys),
    item_names=item_names,
    vocabularies=vocabs,
    eval_seen_query=test_sq,
    eval_seen_item=test_si,
    **valid,
  ).validate()
