"""The embedded default dataset: a synthetic catalogue with planted correlated feature groups.

Every item has three independent latent categorical variables, one per *planted group*:

* ``topic``    (``NUM_TOPICS`` values)    -> ``category``, ``subcategory``, ``tags``
* ``style``    (``NUM_STYLES`` values)    -> ``brand``, ``style_words``, ``price_bucket``
* ``audience`` (``NUM_AUDIENCES`` values) -> ``language``, ``age_rating``, ``keywords``

Each item feature is a noisy function of its group's latent only, so features of one group are
strongly dependent (high pairwise mutual information) while features of different groups are
independent; ``item_id`` (the row index) belongs to no group. This is the structure Correlated
Feature Masking is meant to exploit (see ``planted_groups()``). ``brand`` and ``age_rating`` are
missing (-1) for ``MISSING_RATE`` of the items and ``keywords`` is empty for
``EMPTY_KEYWORDS_RATE`` of them, so the missing/empty paths are exercised.

Item popularity is a power law independent of the features: the item of popularity rank ``r``
(ranks are a seeded random permutation) has weight ``(r + 1) ** -popularity_exponent``.

Each query prefers one topic and one style (the audience group is irrelevant to preference). An
interaction picks a query uniformly from its split's queries and then an item with

    P(item | query) ∝ popularity(item) * exp(BETA * match(query, item)),
    match = [item topic == preferred topic] + [item style == preferred style],

so the query features (noisy views of the preferences) carry real signal, while the item marginal
of D_train stays dominated by head items. Train pairs use the first ``1 - EVAL_QUERY_FRACTION`` of
the query rows, eval pairs the remaining held-out queries (the first half of them validation
queries, the rest test queries).

Sampling is vectorised: items are grouped into (topic, style) cells; a pair first draws a cell
from its query type's cell distribution, then an item within the cell proportionally to popularity
(cumulative sums + ``searchsorted``).
"""

from __future__ import annotations

import math

import numpy as np

from sslrec import features as features_lib
from sslrec.data import table

PAD = features_lib.PAD

# Latent cardinalities.
NUM_TOPICS = 32
NUM_STYLES = 24
NUM_AUDIENCES = 24

# Item feature structure.
SUBCATS_PER_TOPIC = 3
TAGS_PER_TOPIC = 8
TAGS_MAX_LEN = 6
BRANDS_PER_STYLE = 4
STYLE_WORDS_PER_STYLE = 6
STYLE_WORDS_MAX_LEN = 5
NUM_PRICE_BUCKETS = 10
AUDIENCES_PER_LANGUAGE = 2
NUM_LANGUAGES = NUM_AUDIENCES // AUDIENCES_PER_LANGUAGE
NUM_AGE_RATINGS = 6
KEYWORDS_PER_AUDIENCE = 6
KEYWORDS_MAX_LEN = 4
MISSING_RATE = 0.05  # `brand` and `age_rating` are missing (-1) for this fraction of items.
EMPTY_KEYWORDS_RATE = 0.1  # fraction of items with an empty `keywords` bag.

# Query feature structure.
HISTORY_MAX_LEN = 8
HISTORY_TOKENS_PER_TOPIC = 8
HISTORY_TOKENS_PER_STYLE = 6
HISTORY_VOCAB = NUM_TOPICS * HISTORY_TOKENS_PER_TOPIC + NUM_STYLES * HISTORY_TOKENS_PER_STYLE
HISTORY_MIX = (0.5, 0.3, 0.2)  # P(token from topic pool), P(style pool), P(uniform random).
NUM_REGIONS = 16
QUERY_DENSE_DIM = 4

# Interaction process.
BETA = 5.0  # log-odds boost per matched preference (topic, style).
EVAL_QUERY_FRACTION = 0.2  # last fraction of query rows, held out for eval pairs.
LATENT_CONCENTRATION = 5.0  # Dirichlet concentration of the latent marginals (mildly non-uniform).

_GROUPS: tuple[tuple[str, ...], ...] = (
  ("category", "subcategory", "tags"),
  ("brand", "style_words", "price_bucket"),
  ("language", "age_rating", "keywords"),
)
GROUP_LATENTS = ("topic", "style", "audience")


def planted_groups() -> list[tuple[str, ...]]:
  """The item-feature names of each planted correlated group (topic, style, audience).

  ``item_id`` belongs to no group.
  """
  return [tuple(g) for g in _GROUPS]


def item_spec(embed_dim: int = 32, num_items: int = 20_000) -> features_lib.TowerSpec:
  """The item tower schema: ``item_id`` then the nine grouped features."""
  f = features_lib.FeatureSpec
  return features_lib.TowerSpec(
    "item",
    groups=tuple(planted_groups()),
    features=(
      f("item_id", "id", vocab_size=num_items, embed_dim=embed_dim),
      f("category", "id", vocab_size=NUM_TOPICS, embed_dim=embed_dim),
      f("subcategory", "id", vocab_size=NUM_TOPICS * SUBCATS_PER_TOPIC, embed_dim=embed_dim),
      f(
        "tags",
        "multi",
        vocab_size=NUM_TOPICS * TAGS_PER_TOPIC,
        max_len=TAGS_MAX_LEN,
        embed_dim=embed_dim,
      ),
      f("brand", "id", vocab_size=NUM_STYLES * BRANDS_PER_STYLE, embed_dim=embed_dim),
      f(
        "style_words",
        "multi",
        vocab_size=NUM_STYLES * STYLE_WORDS_PER_STYLE,
        max_len=STYLE_WORDS_MAX_LEN,
        embed_dim=embed_dim,
      ),
      f("price_bucket", "id", vocab_size=NUM_PRICE_BUCKETS, embed_dim=embed_dim),
      f("language", "id", vocab_size=NUM_LANGUAGES, embed_dim=embed_dim),
      f("age_rating", "id", vocab_size=NUM_AGE_RATINGS, embed_dim=embed_dim),
      f(
        "keywords",
        "multi",
        vocab_size=NUM_AUDIENCES * KEYWORDS_PER_AUDIENCE,
        max_len=KEYWORDS_MAX_LEN,
        embed_dim=embed_dim,
      ),
    ),
  )


def query_spec(embed_dim: int = 32) -> features_lib.TowerSpec:
  """The query tower schema (no query-id feature)."""
  f = features_lib.FeatureSpec
  return features_lib.TowerSpec(
    "query",
    (
      f("q_topic", "id", vocab_size=NUM_TOPICS, embed_dim=embed_dim),
      f("q_style", "id", vocab_size=NUM_STYLES, embed_dim=embed_dim),
      f(
        "q_history", "multi", vocab_size=HISTORY_VOCAB, max_len=HISTORY_MAX_LEN, embed_dim=embed_dim
      ),
      f("q_region", "id", vocab_size=NUM_REGIONS, embed_dim=embed_dim),
      f("q_dense", "dense", dense_dim=QUERY_DENSE_DIM, embed_dim=embed_dim),
    ),
  )


def _check_args(
  seed,
  num_items,
  num_queries,
  num_train_pairs,
  num_eval_pairs,
  popularity_exponent,
  feature_noise,
  embed_dim,
) -> None:
  def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

  for name, value, low in (
    ("seed", seed, 0),
    ("num_items", num_items, 100),
    ("num_queries", num_queries, 10),
    ("num_train_pairs", num_train_pairs, 1),
    ("num_eval_pairs", num_eval_pairs, 1),
    ("embed_dim", embed_dim, 1),
  ):
    if not is_int(value) or value < low:
      raise table.DataError(f"synthetic.generate: {name}={value!r}; must be an integer >= {low}")
  if not (
    isinstance(popularity_exponent, (int, float, np.floating, np.integer))
    and math.isfinite(popularity_exponent)
    and popularity_exponent >= 0
  ):
    raise table.DataError(
      f"synthetic.generate: popularity_exponent={popularity_exponent!r}; must be a finite "
      "number >= 0"
    )
  if not (
    isinstance(feature_noise, (int, float, np.floating, np.integer)) and 0.0 <= feature_noise <= 1.0
  ):
    raise table.DataError(
      f"synthetic.generate: feature_noise={feature_noise!r}; must be a probability in [0, 1]"
    )


def _noisy_id(rng: np.random.Generator, clean: np.ndarray, vocab: int, noise: float) -> np.ndarray:
  """Replaces each value of ``clean`` [N] by a uniform id in [0, vocab) with prob ``noise``."""
  n = clean.shape[0]
  flip = rng.random(n) < noise
  return np.where(flip, rng.integers(0, vocab, size=n), clean)


def _with_missing(rng: np.random.Generator, x: np.ndarray, rate: float) -> np.ndarray:
  return np.where(rng.random(x.shape[0]) < rate, PAD, x)


def _make_bag(
  rng: np.random.Generator,
  latent: np.ndarray,
  pool_size: int,
  max_len: int,
  vocab: int,
  noise: float,
  *,
  empty_rate: float = 0.0,
) -> np.ndarray:
  """Multi-valued feature: per item 1..max_len distinct values from its latent's pool.

  The pool of latent ``z`` is ids ``[z * pool_size, (z + 1) * pool_size)``; distinct pool values
  come from a random start and a random step coprime with ``pool_size``. Each value is then
  replaced by a uniform id in ``[0, vocab)`` with prob ``noise``. With prob ``empty_rate`` the
  bag is empty.

  Args:
    latent: ``[N]`` latent value of each item.

  Returns:
    ``int32 [N, max_len]``, right-padded with -1.
  """
  assert max_len <= pool_size
  n = latent.shape[0]
  lengths = rng.integers(1, max_len + 1, size=n)
  if empty_rate > 0:
    lengths = np.where(rng.random(n) < empty_rate, 0, lengths)
  start = rng.integers(0, pool_size, size=n)
  steps = np.array([s for s in range(1, pool_size) if math.gcd(s, pool_size) == 1] or [1])
  step = steps[rng.integers(0, steps.size, size=n)]
  j = np.arange(max_len)
  slot = (start[:, None] + j[None, :] * step[:, None]) % pool_size
  values = latent[:, None].astype(np.int64) * pool_size + slot
  flip = rng.random((n, max_len)) < noise
  values = np.where(flip, rng.integers(0, vocab, size=(n, max_len)), values)
  values = np.where(j[None, :] < lengths[:, None], values, PAD)
  return values.astype(np.int32)


def _items(
  rng: np.random.Generator, topic: np.ndarray, style: np.ndarray, audience: np.ndarray, noise: float
) -> dict[str, np.ndarray]:
  """The item feature table from the latents [N]."""
  n = topic.shape[0]
  items = {"item_id": np.arange(n, dtype=np.int32)}
  # Topic group.
  items["category"] = _noisy_id(rng, topic, NUM_TOPICS, noise)
  subcat = topic * SUBCATS_PER_TOPIC + rng.integers(0, SUBCATS_PER_TOPIC, size=n)
  items["subcategory"] = _noisy_id(rng, subcat, NUM_TOPICS * SUBCATS_PER_TOPIC, noise)
  items["tags"] = _make_bag(
    rng, topic, TAGS_PER_TOPIC, TAGS_MAX_LEN, NUM_TOPICS * TAGS_PER_TOPIC, noise
  )
  # Style group.
  brand = style * BRANDS_PER_STYLE + rng.integers(0, BRANDS_PER_STYLE, size=n)
  brand = _noisy_id(rng, brand, NUM_STYLES * BRANDS_PER_STYLE, noise)
  items["brand"] = _with_missing(rng, brand, MISSING_RATE)
  items["style_words"] = _make_bag(
    rng,
    style,
    STYLE_WORDS_PER_STYLE,
    STYLE_WORDS_MAX_LEN,
    NUM_STYLES * STYLE_WORDS_PER_STYLE,
    noise,
  )
  # Each style has a typical price bucket, or the one above it.
  center = (style * 7) % (NUM_PRICE_BUCKETS - 1)
  price = center + rng.integers(0, 2, size=n)
  items["price_bucket"] = _noisy_id(rng, price, NUM_PRICE_BUCKETS, noise)
  # Audience group: two audiences per language; the age rating follows the language's market.
  language = audience // AUDIENCES_PER_LANGUAGE
  items["language"] = _noisy_id(rng, language, NUM_LANGUAGES, noise)
  age = language % NUM_AGE_RATINGS
  age = _noisy_id(rng, age, NUM_AGE_RATINGS, noise)
  items["age_rating"] = _with_missing(rng, age, MISSING_RATE)
  items["keywords"] = _make_bag(
    rng,
    audience,
    KEYWORDS_PER_AUDIENCE,
    KEYWORDS_MAX_LEN,
    NUM_AUDIENCES * KEYWORDS_PER_AUDIENCE,
    noise,
    empty_rate=EMPTY_KEYWORDS_RATE,
  )
  return {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in items.items()}


def _queries(
  rng: np.random.Generator, pref_topic: np.ndarray, pref_style: np.ndarray, noise: float
) -> dict[str, np.ndarray]:
  """The query feature table from the preferences [Q]."""
  q = pref_topic.shape[0]
  queries = {
    "q_topic": _noisy_id(rng, pref_topic, NUM_TOPICS, noise).astype(np.int32),
    "q_style": _noisy_id(rng, pref_style, NUM_STYLES, noise).astype(np.int32),
  }
  # History: tokens from the preferred topic's pool, the preferred style's pool, or random.
  lengths = rng.integers(1, HISTORY_MAX_LEN + 1, size=q)
  shape = (q, HISTORY_MAX_LEN)
  kind = np.searchsorted(np.cumsum(HISTORY_MIX)[:-1], rng.random(shape), side="right")
  topic_tok = pref_topic[:, None] * HISTORY_TOKENS_PER_TOPIC + rng.integers(
    0, HISTORY_TOKENS_PER_TOPIC, size=shape
  )
  style_tok = (
    NUM_TOPICS * HISTORY_TOKENS_PER_TOPIC
    + pref_style[:, None] * HISTORY_TOKENS_PER_STYLE
    + rng.integers(0, HISTORY_TOKENS_PER_STYLE, size=shape)
  )
  random_tok = rng.integers(0, HISTORY_VOCAB, size=shape)
  hist = np.choose(kind, [topic_tok, style_tok, random_tok])
  hist = np.where(np.arange(HISTORY_MAX_LEN)[None, :] < lengths[:, None], hist, PAD)
  queries["q_history"] = hist.astype(np.int32)
  queries["q_region"] = rng.integers(0, NUM_REGIONS, size=q).astype(np.int32)
  # Dense: a noisy embedding of the preference, standardised per column.
  emb_topic = rng.normal(size=(NUM_TOPICS, QUERY_DENSE_DIM))
  emb_style = rng.normal(size=(NUM_STYLES, QUERY_DENSE_DIM))
  dense = emb_topic[pref_topic] + emb_style[pref_style] + rng.normal(size=(q, QUERY_DENSE_DIM))
  dense = (dense - dense.mean(0)) / np.maximum(dense.std(0), 1e-6)
  queries["q_dense"] = dense.astype(np.float32)
  return queries


class _PairSampler:
  """Samples (query, item) pairs from P(item | query) ∝ pop(item) * exp(BETA * match)."""

  def __init__(
    self,
    topic: np.ndarray,
    style: np.ndarray,
    popularity: np.ndarray,
    pref_topic: np.ndarray,
    pref_style: np.ndarray,
  ):
    num_cells = NUM_TOPICS * NUM_STYLES
    self.num_cells = num_cells
    cell = topic.astype(np.int64) * NUM_STYLES + style
    # Items sorted by cell; popularity mass of each cell from one cumulative sum.
    self.order = np.argsort(cell, kind="stable")
    self.cum = np.cumsum(popularity[self.order])
    cum0 = np.concatenate([[0.0], self.cum])
    sorted_cell = cell[self.order]
    self.start = np.searchsorted(sorted_cell, np.arange(num_cells), side="left")
    self.end = np.searchsorted(sorted_cell, np.arange(num_cells), side="right")
    self.before = cum0[self.start]
    self.mass = cum0[self.end] - self.before  # [C], 0 for empty cells
    # Cell distribution of each query type (pref topic, pref style): [C types, C cells].
    cells = np.arange(num_cells)
    ct, cs = cells // NUM_STYLES, cells % NUM_STYLES
    match = (ct[:, None] == ct[None, :]).astype(np.float64) + (cs[:, None] == cs[None, :]).astype(
      np.float64
    )
    weight = self.mass[None, :] * np.exp(BETA * match)
    cdf = np.cumsum(weight, axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    # Row r lives in [r, r + 1]: one searchsorted over all rows at once.
    self.cdf_flat = (cdf + np.arange(num_cells)[:, None]).ravel()
    self.query_type = pref_topic.astype(np.int64) * NUM_STYLES + pref_style

  def sample(
    self, rng: np.random.Generator, query_rows: np.ndarray, num_pairs: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(query int32 [P], item int32 [P])``; queries uniform over ``query_rows``."""
    query = query_rows[rng.integers(0, query_rows.size, size=num_pairs)]
    row = self.query_type[query]
    u = rng.random(num_pairs)
    cell = np.searchsorted(self.cdf_flat, row + u, side="right") - row * self.num_cells
    cell = np.clip(cell, 0, self.num_cells - 1)
    target = self.before[cell] + rng.random(num_pairs) * self.mass[cell]
    pos = np.searchsorted(self.cum, target, side="right")
    pos = np.clip(pos, self.start[cell], self.end[cell] - 1)
    return query.astype(np.int32), self.order[pos].astype(np.int32)


def generate(
  seed: int,
  *,
  num_items: int = 20_000,
  num_queries: int = 40_000,
  num_train_pairs: int = 300_000,
  num_eval_pairs: int = 20_000,
  popularity_exponent: float = 1.1,
  feature_noise: float = 0.1,
  embed_dim: int = 32,
) -> table.Dataset:
  """Generates the synthetic dataset; identical arrays for identical arguments.

  Args:
    seed: non-negative integer seed of all randomness.
    num_items: catalogue size (>= 100).
    num_queries: number of query rows (>= 10); the last ``EVAL_QUERY_FRACTION`` of them are
      held out and only appear in eval pairs.
    num_train_pairs / num_eval_pairs: number of (query, item) pairs per split.
    popularity_exponent: item of popularity rank r has weight ``(r + 1) ** -exponent``.
    feature_noise: probability in [0, 1] that an item feature value (and the query's
      ``q_topic`` / ``q_style``) is replaced by a uniformly random value.
    embed_dim: ``embed_dim`` of every feature spec.

  Returns:
    A validated ``Dataset`` named ``'synthetic'`` with towers ``'item'`` and ``'query'``.

  Raises:
    DataError: on invalid arguments.
  """
  _check_args(
    seed,
    num_items,
    num_queries,
    num_train_pairs,
    num_eval_pairs,
    popularity_exponent,
    feature_noise,
    embed_dim,
  )
  noise = float(feature_noise)
  rng = np.random.default_rng(int(seed))

  # Latent marginals (mildly non-uniform) and item latents, independent across groups.
  probs = [
    rng.dirichlet(np.full(k, LATENT_CONCENTRATION)) for k in (NUM_TOPICS, NUM_STYLES, NUM_AUDIENCES)
  ]
  topic, style, audience = (rng.choice(p.size, size=num_items, p=p) for p in probs)
  items = _items(rng, topic, style, audience, noise)

  # Power-law popularity over a random permutation of ranks (independent of the features).
  rank = rng.permutation(num_items)
  popularity = (rank + 1.0) ** -float(popularity_exponent)

  pref_topic = rng.choice(NUM_TOPICS, size=num_queries, p=probs[0])
  pref_style = rng.choice(NUM_STYLES, size=num_queries, p=probs[1])
  queries = _queries(rng, pref_topic, pref_style, noise)

  train_rows, eval_rows = held_out_rows(num_queries)
  sampler = _PairSampler(topic, style, popularity, pref_topic, pref_style)
  train_query, train_item = sampler.sample(rng, train_rows, int(num_train_pairs))
  eval_query, eval_item = sampler.sample(rng, eval_rows, int(num_eval_pairs))
  return table.Dataset(
    name="synthetic",
    item_spec=item_spec(int(embed_dim), int(num_items)),
    query_spec=query_spec(int(embed_dim)),
    items=items,
    queries=queries,
    train_query=train_query,
    train_item=train_item,
    item_keys=np.arange(num_items),
    **split_held_out("synthetic", eval_query, eval_item, eval_rows),
  ).validate()


def held_out_rows(num_queries: int) -> tuple[np.ndarray, np.ndarray]:
  """``(train_rows, eval_rows)``: the query rows of D_train and the last ``EVAL_QUERY_FRACTION``
  (at least one), held out for the eval pairs (the embedded generators)."""
  num_eval = max(1, int(round(EVAL_QUERY_FRACTION * num_queries)))
  return np.arange(num_queries - num_eval), np.arange(num_queries - num_eval, num_queries)


def split_held_out(source: str, eval_query, eval_item, eval_rows: np.ndarray) -> dict:
  """The ``Dataset`` fields of the held-out pairs split by query: the first half of the held-out
  rows are validation users, the rest test users (no user is in both). Raises DataError when a
  split would be empty."""
  num_eval_queries = eval_rows.size
  is_valid = eval_query < eval_rows[0] + num_eval_queries // 2
  if num_eval_queries < 2 or is_valid.all() or not is_valid.any():
    raise table.DataError(
      f"{source}: {num_eval_queries} held-out queries and {eval_query.size} held-out pairs "
      "leave the validation or the test split empty; raise data.num_queries / "
      "data.num_eval_pairs"
    )
  return {
    "eval_query": eval_query[~is_valid],
    "eval_item": eval_item[~is_valid],
    "valid_query": eval_query[is_valid],
    "valid_item": eval_item[is_valid],
  }
