"""The two-stage augmentation of the SSL task: feature masking, then multi-value dropout.

Everything here is a pure function meant to be traced inside the jitted train step: the
number of features ``k``, the masked fraction and the dropout rate are static Python values;
``rng`` is a JAX PRNG key.

A feature mask is ``bool [k]`` in the tower's feature order (``TowerSpec.features``):
``True`` where view 1 masks the feature. View 2 masks the complement, so the two views keep
disjoint feature sets. The model replaces a masked feature by that feature's learned default
embedding.

* RFM (random feature masking): a uniformly random subset of ``num_masked(k)`` features.
* CFM (correlated feature masking): a uniformly drawn seed feature plus the features with the
  highest mutual information with it; ``num_masked(k)`` features in all, seed included, so
  that for ``fraction = 0.5`` the two views have equal halves (``ceil(k/2)`` vs ``floor(k/2)``).
* Dropout on multi-valued features: each present value independently becomes ``-1``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sslrec import features as features_lib


def num_masked(k: int, fraction: float = 0.5) -> int:
  """Number of features view 1 masks: ``ceil(k * fraction)`` clipped to ``[1, k - 1]``.

  A tiny tolerance is subtracted before the ceiling so that floating-point noise (e.g.
  ``10 * 0.3 = 3.0000000000000004``) does not round up.

  Args:
    k: number of features, ``>= 2``.
    fraction: fraction of features to mask, in ``(0, 1)``.

  Returns:
    Python int in ``[1, k - 1]``.
  """
  k = int(k)
  if k < 2:
    raise ValueError(f"feature masking needs k >= 2 features, got k={k}")
  if not 0.0 < float(fraction) < 1.0:
    raise ValueError(f"mask fraction must be in (0, 1), got {fraction}")
  n = math.ceil(k * float(fraction) - 1e-9)
  return min(max(n, 1), k - 1)


def rfm_mask(rng: jax.Array, k: int, fraction: float = 0.5) -> jax.Array:
  """Random Feature Masking: a uniformly random subset of exactly ``num_masked(k)`` features.

  Args:
    rng: PRNG key.
    k: static number of features.
    fraction: static masked fraction.

  Returns:
    ``bool [k]``, True where view 1 masks the feature.
  """
  n = num_masked(k, fraction)
  perm = jax.random.permutation(rng, k)  # [k], a random ordering of 0..k-1
  return perm < n


def cfm_mask(rng: jax.Array, mi: jax.Array, fraction: float = 0.5) -> jax.Array:
  """Correlated Feature Masking.

  Draws a seed feature uniformly from the *ranked* features, then masks the seed together with
  its highest-``mi[seed, j]`` ranked partners, ``num_masked(k, fraction)`` features in all (the
  seed counts among them). A feature whose off-diagonal MI row is all NaN is *unranked*
  (``stats.ranking_mi`` marks per-item id features so, ``ssl.rank_ids=False``): never the seed
  nor a partner, it is masked by view 1 with probability ``fraction`` and the ranked features
  fill what is left of the count. Without unranked features this is plain CFM: seed uniform
  over all ``k``, its ``n - 1`` top partners. The diagonal ``mi[seed, seed]`` is ignored.

  Ties among equal MI values are broken uniformly at random without perturbing the MI
  values: features are sorted by MI (descending) with i.i.d. uniform random numbers as the
  secondary key (``jnp.lexsort``), i.e. a random permutation decides among equal MI values
  however small the MI differences elsewhere are. NaN MI values count as lowest.

  Args:
    rng: PRNG key.
    mi: ``[k, k]`` pairwise mutual information between features (symmetric in practice;
      row ``seed`` is what is read). ``k = mi.shape[0]`` is static.
    fraction: static masked fraction.

  Returns:
    ``bool [k]``, True where view 1 masks the feature.
  """
  mi = _square(mi, "cfm_mask")
  return _seeded_mask(rng, mi, fraction, unranked_features(mi), most_correlated=True)


def anti_cfm_mask(rng: jax.Array, mi: jax.Array, fraction: float = 0.5) -> jax.Array:
  """The control of CFM: the seed plus its *least* correlated (ranked) features.

  Everything as ``cfm_mask`` except the partners' order (MI ascending): the masked set pairs the
  seed with features of other groups, so correlated features are split across the two views, the
  opposite of what CFM does. A mask strategy that beats this one by tail recall shows that *which*
  features are masked together matters, not only how many.
  """
  mi = _square(mi, "anti_cfm_mask")
  return _seeded_mask(rng, mi, fraction, unranked_features(mi), most_correlated=False)


def unranked_features(mi: jax.Array) -> jax.Array:
  """``bool [k]``: features whose off-diagonal MI row is all NaN (kept out of the ranking)."""
  k = mi.shape[0]
  off = jnp.where(jnp.eye(k, dtype=bool), 0.0, jnp.where(jnp.isnan(mi), 0.0, 1.0))
  return (off.sum(axis=1) == 0) & (k > 1)


def _seeded_mask(rng, mi, fraction, ids, *, most_correlated: bool) -> jax.Array:
  """A seed among the non-``ids`` features plus its top (or bottom) MI partners among them;
  ``ids`` on a random side (each masked with probability ``fraction``); ``num_masked(k)`` in all
  when the counts allow (at least one non-id masked and one kept)."""
  k = mi.shape[0]
  n = num_masked(k, fraction)
  side_rng, seed_rng, tie_rng = jax.random.split(rng, 3)
  ids_masked = ids & (jax.random.uniform(side_rng, (k,)) < fraction)  # [k]
  num_rest = k - ids.sum()
  r = jnp.clip(n - ids_masked.sum(), jnp.minimum(1, num_rest - 1), num_rest - 1)
  seed = jax.random.categorical(seed_rng, jnp.where(ids, -jnp.inf, 0.0))
  ranked = jnp.where(ids[None, :] | ids[:, None], jnp.nan, mi)
  if not most_correlated:
    ranked = jnp.where(jnp.isnan(ranked), jnp.nan, -ranked)
  order = _partners_of(seed, ranked, tie_rng, ids)  # non-ids first, then seed, then partners
  rank = jnp.zeros((k,), jnp.int32).at[order].set(jnp.arange(k, dtype=jnp.int32))
  return jnp.where(ids, ids_masked, rank < r)


def oracle_mask(rng: jax.Array, k: int, fraction: float, groups) -> jax.Array:
  """The data's own groups: whole declared groups, in random order, while they fit.

  ``groups``: static tuple of tuples of feature indices (``Dataset.feature_groups``). Groups are
  taken in a random order and masked whole while the masked count stays within
  ``num_masked(k, fraction)``; what is left of the count is filled by random ungrouped features,
  then by random features of the remaining groups. With two groups of k/2 features, view 1 masks
  one whole group and view 2 the other: the mask CFM is meant to find from the MI.
  """
  n = num_masked(k, fraction)
  order_rng, fill_rng = jax.random.split(rng)
  sizes = jnp.asarray([len(g) for g in groups], jnp.int32)
  member = jnp.zeros((len(groups), k), bool)
  for gi, g in enumerate(groups):
    member = member.at[gi, jnp.asarray(g, jnp.int32)].set(True)
  perm = jax.random.permutation(order_rng, len(groups))

  # Greedy: take each group in the random order when it still fits.
  def take(carry, gi):
    used, mask = carry
    fits = used + sizes[gi] <= n
    return (used + jnp.where(fits, sizes[gi], 0), mask | (member[gi] & fits)), None

  (used, mask), _ = jax.lax.scan(take, (jnp.int32(0), jnp.zeros((k,), bool)), perm)
  grouped = member.any(axis=0)
  tie = jax.random.uniform(fill_rng, (k,))
  # Fill order: ungrouped features first, then the others, random within each; masked ones last.
  order = jnp.lexsort((tie, grouped, mask))
  rank = jnp.zeros((k,), jnp.int32).at[order].set(jnp.arange(k, dtype=jnp.int32))
  return mask | (~mask & (rank < n - used))


def _square(mi, caller: str) -> jax.Array:
  mi = jnp.asarray(mi, jnp.float32)
  if mi.ndim != 2 or mi.shape[0] != mi.shape[1]:
    raise ValueError(f"{caller} needs a square [k, k] MI matrix, got shape {mi.shape}")
  return mi


def _partners_of(seed: jax.Array, mi: jax.Array, tie_rng: jax.Array, *first) -> jax.Array:
  """Feature indices ordered by the ``first`` sort keys (ascending, most significant first),
  then the seed, then MI with the seed descending (NaN lowest), then a random tie-break: a
  random permutation decides among equal MI values without perturbing them."""
  k = mi.shape[0]
  row = jnp.where(jnp.isnan(mi[seed]), -jnp.inf, mi[seed])  # [k]
  not_seed = jnp.arange(k) != seed
  tie = jax.random.uniform(tie_rng, (k,))
  # jnp.lexsort: ascending, the last key most significant.
  return jnp.lexsort((tie, -row, not_seed, *reversed(first)))


def id_like_features(mi: jax.Array, rtol: float = 1e-4) -> jax.Array:
  """Features that identify the item, read off the MI matrix.

  A per-item id ``i`` determines every feature, so by the data-processing inequality
  ``MI(i, j) >= MI(l, j)`` for all other ``l, j``: it is the top MI partner of every other
  feature; and it has the largest entropy (``log N`` for N distinct items). Feature ``i`` is
  flagged when both hold, up to the relative tolerance ``rtol`` (an id shared by a few items,
  e.g. an out-of-vocabulary id, still qualifies). If every feature would be flagged, none is.

  Args:
    mi: ``[k, k]`` MI matrix with the entropies on the diagonal (``stats.mutual_information``).
    rtol: relative tolerance of the comparisons.

  Returns:
    ``bool [k]``.
  """
  mi = jnp.asarray(mi, jnp.float32)
  k = mi.shape[0]
  eye = jnp.eye(k, dtype=bool)
  off = jnp.where(eye, -jnp.inf, mi)  # [k, k], MI with the other features only
  best = off.max(axis=0)  # [k], each feature's highest MI with another feature
  slack = rtol * jnp.abs(mi).max()
  top_of_all = jnp.all(eye | (off >= best[None, :] - slack), axis=1)  # [k]
  entropy = jnp.diagonal(mi)
  flags = top_of_all & (entropy >= entropy.max() - slack)
  return flags & ~jnp.all(flags)


def cfm_ids_random_mask(rng: jax.Array, mi: jax.Array, fraction: float = 0.5) -> jax.Array:
  """CFM with per-item id features left out of the MI ranking and put on a random side.

  ``MI(item_id, f) = H(f)`` under the plug-in estimate: the raw MI ranks a unique id first for
  every seed, so plain CFM masks it together with the seed's group almost always, whatever the
  correlations are. Here the id-like features (``id_like_features``, read off the MI matrix) and
  the unranked ones (``unranked_features``) are never the seed nor a ranked partner; each is
  masked by view 1 with probability ``fraction``. The other features are split by CFM (seed
  among them, then its highest-MI partners among them) so that view 1 masks ``num_masked(k)``
  features in all, as in ``cfm_mask``. With ``ssl.rank_ids=False`` (the default) the ids are
  already unranked and this is ``cfm_mask``.

  Args:
    rng: PRNG key.
    mi: ``[k, k]`` MI matrix (entropies on the diagonal).
    fraction: static masked fraction.

  Returns:
    ``bool [k]``, True where view 1 masks the feature.
  """
  mi = _square(mi, "cfm_ids_random_mask")
  ids = unranked_features(mi) | id_like_features(jnp.nan_to_num(mi, nan=0.0))
  return _seeded_mask(rng, mi, fraction, ids, most_correlated=True)


def multi_value_dropout(rng: jax.Array, ids: jax.Array, rate: float) -> jax.Array:
  """Drops each present value of a multi-valued feature with probability ``rate``.

  Dropped values become ``-1`` in place (no re-packing; pooling ignores ``-1`` anywhere).
  Padding (``-1``) stays ``-1``.

  Args:
    rng: PRNG key.
    ids: ``int32 [B, L]`` values, right-padded with ``-1``.
    rate: static drop probability in ``[0, 1]``; ``0`` returns ``ids`` unchanged.

  Returns:
    ``int32 [B, L]``.
  """
  rate = float(rate)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
  if rate == 0.0:
    return ids
  drop = jax.random.bernoulli(rng, rate, ids.shape)
  return jnp.where(drop & (ids >= 0), jnp.asarray(features_lib.PAD, ids.dtype), ids)


def two_views(
  rng: jax.Array,
  batch: dict[str, jax.Array],
  spec: features_lib.TowerSpec,
  mask: jax.Array,
  dropout_rate: float,
) -> tuple[dict[str, jax.Array], jax.Array, dict[str, jax.Array], jax.Array]:
  """Builds the two augmented views of a batch of items.

  Each view gets its own independent dropout on every ``multi`` feature of ``spec`` (one key
  per view and per feature); other features, and batch entries not in ``spec``, pass through
  unchanged. View 1 masks ``mask``, view 2 its complement.

  Args:
    rng: PRNG key.
    batch: ``{name: [B, ...]}`` item-tower inputs.
    spec: the item tower's schema; its feature order is the mask's order.
    mask: ``bool [k]``, ``k = spec.num_features``; True where view 1 masks the feature.
    dropout_rate: static drop probability of multi-valued values.

  Returns:
    ``(batch1, mask1, batch2, mask2)`` with ``mask1 = mask`` and ``mask2 = ~mask``.
  """
  mask = jnp.asarray(mask, bool)
  if mask.shape != (spec.num_features,):
    raise ValueError(
      f"mask has shape {mask.shape}, expected ({spec.num_features},) for tower {spec.name!r}"
    )
  views = [one_view(view_rng, batch, spec, dropout_rate) for view_rng in jax.random.split(rng, 2)]
  return views[0], mask, views[1], ~mask


def one_view(
  rng: jax.Array, batch: dict[str, jax.Array], spec: features_lib.TowerSpec, dropout_rate: float
) -> dict[str, jax.Array]:
  """``batch`` with independent dropout on each ``multi`` feature of ``spec`` (one key per
  feature). With complementary masks a feature is real in exactly one of the two views, so one
  such batch serves both (``step.make_views``): the joint distribution of what the two encoders
  see is that of ``two_views``, at half the random numbers and lookups."""
  out = dict(batch)
  for i, f in enumerate(spec.features):
    if f.kind == "multi":
      out[f.name] = multi_value_dropout(jax.random.fold_in(rng, i), batch[f.name], dropout_rate)
  return out


def make_mask(
  rng: jax.Array,
  masking: str,
  k: int,
  mi: jax.Array | None = None,
  fraction: float = 0.5,
  groups=None,
) -> jax.Array:
  """Draws view 1's feature mask with the named strategy.

  Args:
    rng: PRNG key.
    masking: a name of ``MASKS``: 'cfm', 'anti_cfm', 'cfm_ids_random' (need ``mi``), 'oracle'
      (needs ``groups``), 'rfm', or 'none' (all False: both views keep every feature and differ
      only by dropout, the spread-out-like special case).
    k: static number of features.
    mi: ``[k, k]`` mutual-information matrix (``stats.ranking_mi``).
    fraction: static masked fraction.
    groups: static tuple of tuples of feature indices (the dataset's declared groups).

  Returns:
    ``bool [k]``.
  """
  if masking not in MASKS:
    raise ValueError(f"unknown masking {masking!r}; allowed: {tuple(MASKS)}")
  fn, needs = MASKS[masking]
  if needs == "mi":
    if mi is None:
      raise ValueError(f"masking={masking!r} needs the feature MI matrix (mi=None given)")
    if tuple(mi.shape) != (k, k):
      raise ValueError(f"masking={masking!r}: mi has shape {tuple(mi.shape)}, expected ({k}, {k})")
    return fn(rng, mi, fraction)
  if needs == "groups":
    if not groups:
      raise ValueError(f"masking={masking!r} needs the dataset's declared feature groups")
    return fn(rng, k, fraction, groups)
  return fn(rng, k, fraction)


def no_mask(rng: jax.Array, k: int, fraction: float = 0.5) -> jax.Array:
  """'none': nothing masked; both views keep every feature and differ only by dropout."""
  del rng, fraction
  return jnp.zeros((k,), bool)


def mask_statistics(
  masking: str, k: int, mi=None, fraction: float = 0.5, groups=None, draws: int = 4000, seed=0
) -> dict:
  """What a strategy draws, measured over ``draws`` masks (printed before training):
  ``distinct`` masks, ``groups_whole`` (the fraction of draws that keep every declared group on
  one side; None without groups) and ``frequency`` (per feature, how often view 1 masks it)."""
  fn = jax.jit(
    jax.vmap(lambda r: make_mask(r, masking, k, mi=mi, fraction=fraction, groups=groups))
  )
  masks = np.asarray(fn(jax.random.split(jax.random.key(seed), draws)))
  whole = None
  if groups:
    whole = float(
      np.mean(
        np.all([masks[:, list(g)].all(1) | (~masks[:, list(g)]).all(1) for g in groups], axis=0)
      )
    )
  return {
    "distinct": int(len({m.tobytes() for m in masks})),
    "groups_whole": whole,
    "frequency": masks.mean(axis=0).tolist(),
  }


# The masking strategies by ``ssl.masking`` name: (function, what it needs). A strategy that
# reads MI is ``fn(rng, mi [k, k], fraction)``, one that reads the dataset's declared groups
# ``fn(rng, k, fraction, groups)``, one that needs neither ``fn(rng, k, fraction)``;
# configuration reads the allowed names from here, so a new strategy is a function plus a line.
MASKS = {
  "cfm": (cfm_mask, "mi"),
  "rfm": (rfm_mask, ""),
  "none": (no_mask, ""),
  "cfm_ids_random": (cfm_ids_random_mask, "mi"),
  "anti_cfm": (anti_cfm_mask, "mi"),
  "oracle": (oracle_mask, "groups"),
}
