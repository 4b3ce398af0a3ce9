"""An embedded dataset on which the masking strategy must matter (``data.name='mechanism'``).

The default embedded dataset (``synthetic.py``) plants three *independent* latent groups: two
views that keep whole groups share no information, so CFM has nothing to align and RFM and CFM
end level. This generator is built so that correlated masking has a reason to win, and every
part is there for one reason:

* **One relevance latent shared by every group.** Each item has a relevance value ``z`` in
  ``[0, NUM_RELEVANCE)``; queries prefer one value, ``P(item | query) ∝ popularity(item) *
  exp(BETA * [z == preference])``. Every item feature carries ``z`` (replaced by a random value
  with probability ``feature_noise``, independently per feature), so two views that keep whole,
  different groups still share it: the SSL task is solvable *through relevance*.
* **A private nuisance per group, copied into all of that group's features.** Each item draws
  ``n_g`` uniformly from ``nuisance_values`` values per group ``g``; every feature of group g is
  the bag ``[relevance token, nuisance token n_g]``. The nuisance carries no relevance. Two views
  that both hold features of group g share ``n_g`` exactly, and with two groups the pair
  ``(n_a, n_b)`` nearly identifies an item among its batch (``nuisance_values ** 2`` combinations):
  a shortcut that solves the SSL task without learning relevance. Random masking almost always
  leaves every group on both sides; CFM (and the oracle) keep each group on one side, so the only
  shared information is ``z``. ``data.nuisance_values`` is the knob: 1 removes the nuisance (then
  CFM has nothing to close and should equal RFM); more values make the shortcut sharper.
* **Groups of half the features.** Two groups of ``GROUP_SIZE`` features each (no item id), so
  with ``ssl.mask_fraction = 0.5`` a mask can hold exactly one whole group and CFM's seed plus
  its top partners are exactly the seed's group.
* **Values only tail items carry.** Tail items' relevance tokens (``[R, 2R)``) are not head
  items' (``[0, R)``), so the main loss sees them only through the few tail pairs while the SSL
  stream (uniform over the catalogue) sees them as often as any. If SSL helps the tail here it
  is by aligning those tokens across groups, which only works when the views cannot match by
  nuisance.
* **Small relevance classes.** ``NUM_RELEVANCE`` classes of ~30 items on the default 8000-item
  catalogue: a query's relevant items fit in its top 50, tail ones included, so tail recall
  measures whether the model knows a tail item's relevance (with a few large classes the
  relevant head items fill the top K and tail recall is 0 for any model).

Queries: ``q_pref`` (the preference, noisy with ``feature_noise``) and ``q_region`` (irrelevant).
The last ``synthetic.EVAL_QUERY_FRACTION`` of the queries are held out, the first half of them
validation users, the rest test users. ``item_spec().groups`` declares the two groups
(``ssl.masking='oracle'`` masks them whole; the mask statistics count how often a strategy keeps
them whole).
"""

from __future__ import annotations

import numpy as np

from sslrec import features as features_lib
from sslrec.data import synthetic, table

NUM_RELEVANCE = 256
GROUP_NAMES = ("a", "b")
GROUP_SIZE = 4
HEAD_FRACTION = 0.2  # the most popular items by construction draw head nuisances
BETA = 8.0  # log-odds boost of an item whose relevance matches the query's preference
NUM_REGIONS = 16


def groups() -> tuple[tuple[str, ...], ...]:
  """The declared groups: ``(('a1', ..., 'a4'), ('b1', ..., 'b4'))``."""
  return tuple(tuple(f"{g}{i + 1}" for i in range(GROUP_SIZE)) for g in GROUP_NAMES)


def item_spec(nuisance_values: int, embed_dim: int = 32) -> features_lib.TowerSpec:
  """Each item feature is a bag of two tokens: its relevance token (``2 * NUM_RELEVANCE`` values:
  head items' and tail items' apart) and its group's nuisance token (``nuisance_values``)."""
  vocab = 2 * NUM_RELEVANCE + nuisance_values
  return features_lib.TowerSpec(
    "item",
    groups=groups(),
    features=tuple(
      features_lib.FeatureSpec(name, "multi", vocab_size=vocab, max_len=2, embed_dim=embed_dim)
      for g in groups()
      for name in g
    ),
  )


def query_spec(embed_dim: int = 32) -> features_lib.TowerSpec:
  f = features_lib.FeatureSpec
  return features_lib.TowerSpec(
    "query",
    (
      f("q_pref", "id", vocab_size=NUM_RELEVANCE, embed_dim=embed_dim),
      f("q_region", "id", vocab_size=NUM_REGIONS, embed_dim=embed_dim),
    ),
  )


def _noisy(rng, clean: np.ndarray, vocab: int, noise: float) -> np.ndarray:
  return np.where(rng.random(clean.shape) < noise, rng.integers(0, vocab, clean.shape), clean)


def generate(
  seed: int,
  *,
  num_items: int = 8000,
  num_queries: int = 20_000,
  num_train_pairs: int = 200_000,
  num_eval_pairs: int = 10_000,
  popularity_exponent: float = 1.1,
  feature_noise: float = 0.2,
  nuisance_values: int = 32,
  embed_dim: int = 32,
) -> table.Dataset:
  """The mechanism dataset (module docstring); identical arrays for identical arguments."""
  for name, value, low in (
    ("num_items", num_items, 100),
    ("num_queries", num_queries, 10),
    ("num_train_pairs", num_train_pairs, 1),
    ("num_eval_pairs", num_eval_pairs, 2),
    ("nuisance_values", nuisance_values, 1),
  ):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise table.DataError(f"mechanism: data.{name}={value!r}; must be an integer >= {low}")
  if not 0.0 <= float(feature_noise) <= 1.0:
    raise table.DataError(f"mechanism: data.feature_noise={feature_noise!r}; must be in [0, 1]")
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4D454348]))
  m = int(nuisance_values)

  # Items: relevance, popularity (rank = row order of a random permutation), nuisances.
  z = rng.integers(0, NUM_RELEVANCE, num_items)
  rank = rng.permutation(num_items)
  popularity = (rank + 1.0) ** -float(popularity_exponent)
  is_head = rank < int(np.ceil(HEAD_FRACTION * num_items))
  items = {}
  for g in groups():
    nuisance = 2 * NUM_RELEVANCE + rng.integers(0, m, num_items)  # one per item and group
    for name in g:
      z_f = _noisy(rng, z, NUM_RELEVANCE, float(feature_noise))
      token = z_f + np.where(is_head, 0, NUM_RELEVANCE)  # tail items' tokens are their own
      items[name] = np.stack([token, nuisance], axis=1).astype(np.int32)

  # Queries.
  pref = rng.integers(0, NUM_RELEVANCE, num_queries)
  queries = {
    "q_pref": _noisy(rng, pref, NUM_RELEVANCE, float(feature_noise)).astype(np.int32),
    "q_region": rng.integers(0, NUM_REGIONS, num_queries).astype(np.int32),
  }

  # Pairs: a relevance cell by mass x exp(BETA * match), then an item in it by popularity.
  order = np.argsort(z, kind="stable")
  cum = np.cumsum(popularity[order])
  cum0 = np.concatenate([[0.0], cum])
  start = np.searchsorted(z[order], np.arange(NUM_RELEVANCE), side="left")
  end = np.searchsorted(z[order], np.arange(NUM_RELEVANCE), side="right")
  mass = cum0[end] - cum0[start]
  weight = mass[None, :] * np.exp(BETA * np.eye(NUM_RELEVANCE))  # [pref, cell]
  cdf = np.cumsum(weight, axis=1) / weight.sum(axis=1, keepdims=True)

  def sample(rows: np.ndarray, n: int):
    query = rows[rng.integers(0, rows.size, n)]
    cell = (rng.random(n)[:, None] > cdf[pref[query]]).sum(axis=1)
    cell = np.minimum(cell, NUM_RELEVANCE - 1)
    target = cum0[start[cell]] + rng.random(n) * mass[cell]
    pos = np.clip(np.searchsorted(cum, target, side="right"), start[cell], end[cell] - 1)
    return query.astype(np.int32), order[pos].astype(np.int32)

  train_rows, eval_rows = synthetic.held_out_rows(num_queries)
  train_query, train_item = sample(train_rows, int(num_train_pairs))
  eval_query, eval_item = sample(eval_rows, int(num_eval_pairs))
  return table.Dataset(
    name="mechanism",
    item_spec=item_spec(m, int(embed_dim)),
    query_spec=query_spec(int(embed_dim)),
    items=items,
    queries=queries,
    train_query=train_query,
    train_item=train_item,
    item_keys=np.arange(num_items),
    **synthetic.split_held_out("mechanism", eval_query, eval_item, eval_rows),
  ).validate()
