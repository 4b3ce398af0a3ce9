"""The masking mechanism: control masks, bias-corrected MI, the mechanism dataset, and the step's
SSL wiring (tests a wrong change would fail)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from configs import mechanism as mechanism_config
from sslrec import cli, features, losses, sparse, step, train
from sslrec.data import mechanism, sources, stats
from sslrec.model import augment

GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))


def _block_mi() -> jnp.ndarray:
  rng = np.random.default_rng(0)
  mi = rng.uniform(0.01, 0.1, size=(8, 8))
  for blk in (slice(0, 4), slice(4, 8)):
    mi[blk, blk] = rng.uniform(0.5, 0.9, size=(4, 4))
  mi = (mi + mi.T) / 2
  np.fill_diagonal(mi, 2.0)
  return jnp.asarray(mi, jnp.float32)


def test_cfm_keeps_groups_whole_and_anti_cfm_splits_them():
  mi = _block_mi()
  cfm = augment.mask_statistics("cfm", 8, mi=mi, groups=GROUPS, draws=1000)
  anti = augment.mask_statistics("anti_cfm", 8, mi=mi, groups=GROUPS, draws=1000)
  rfm = augment.mask_statistics("rfm", 8, groups=GROUPS, draws=1000)
  assert cfm["groups_whole"] == 1.0 and cfm["distinct"] == 2
  assert anti["groups_whole"] == 0.0 and anti["distinct"] > 2
  assert 0.0 < rfm["groups_whole"] < 0.1 and rfm["distinct"] == 70
  for s in (cfm, rfm):
    np.testing.assert_allclose(s["frequency"], 0.5, atol=0.1)
  assert np.mean(anti["frequency"]) == pytest.approx(0.5)  # 4 of 8 every draw


def test_oracle_masks_whole_groups_and_fills_the_count():
  masks = np.asarray(
    jax.vmap(lambda r: augment.oracle_mask(r, 8, 0.5, GROUPS))(
      jax.random.split(jax.random.key(0), 200)
    )
  )
  assert {m.tobytes() for m in masks} == {
    np.array([1] * 4 + [0] * 4, bool).tobytes(),
    np.array([0] * 4 + [1] * 4, bool).tobytes(),
  }
  # Groups that do not fill the count: 3 + 3 + one ungrouped feature (k = 10 masks 5).
  groups = ((1, 2, 3), (4, 5, 6), (7, 8, 9))
  masks = np.asarray(
    jax.vmap(lambda r: augment.oracle_mask(r, 10, 0.5, groups))(
      jax.random.split(jax.random.key(1), 500)
    )
  )
  assert np.all(masks.sum(axis=1) == 5)
  whole = [masks[:, list(g)].all(1) for g in groups]
  assert np.all(np.sum(whole, axis=0) == 1)  # exactly one whole group masked...
  assert masks[:, 0].all()  # ...plus the ungrouped feature, then one more of another group


def test_unranked_features_are_never_seeds_and_take_a_random_side():
  mi = np.array(_block_mi())
  mi = stats.ranking_mi(mi, np.array([True] + [False] * 7))
  keys = jax.random.split(jax.random.key(0), 2000)
  masks = np.asarray(jax.vmap(lambda r: augment.cfm_mask(r, jnp.asarray(mi), 0.5))(keys))
  assert np.all(masks.sum(axis=1) == 4)
  assert abs(masks[:, 0].mean() - 0.5) < 0.05  # the unranked feature: a random side
  np.testing.assert_array_equal(augment.unranked_features(jnp.asarray(mi)), [1] + [0] * 7)


def test_permutation_mi_measures_dependence_not_vocabulary():
  rng = np.random.default_rng(0)
  n = 4000
  latent = rng.integers(0, 8, n)
  items = {
    "id": np.arange(n, dtype=np.int32),  # unique per item
    "big_a": rng.integers(0, 1500, n).astype(np.int32),  # independent, large vocabularies
    "big_b": rng.integers(0, 1500, n).astype(np.int32),
    "dep_a": (latent * 4 + rng.integers(0, 4, n)).astype(np.int32),  # dependent through latent
    "dep_b": (latent * 4 + rng.integers(0, 4, n)).astype(np.int32),
  }
  f = features.FeatureSpec
  spec = features.TowerSpec(
    "item",
    (
      f("id", "id", vocab_size=n),
      f("big_a", "id", vocab_size=1500),
      f("big_b", "id", vocab_size=1500),
      f("dep_a", "id", vocab_size=32),
      f("dep_b", "id", vocab_size=32),
    ),
  )
  plug = stats.mutual_information(items, spec, estimator="plugin")
  corr = stats.mutual_information(items, spec, estimator="permutation")
  # Plug-in: the unique id and the independent large vocabularies look most dependent.
  assert plug[0, 3] > plug[3, 4] and plug[1, 2] > 1.0
  # Corrected: only the truly dependent pair stands out.
  assert corr[3, 4] > 1.0 and corr[3, 4] > 5 * max(corr[0, 3], corr[1, 2], corr[0, 1])
  np.testing.assert_allclose(np.diag(corr), np.diag(plug))
  np.testing.assert_array_equal(stats.id_like(items, spec), [True, False, False, False, False])
  with pytest.raises(ValueError, match="estimator"):
    stats.mutual_information(items, spec, estimator="mm")


def test_ssl_loss_same_item_rows_are_not_negatives():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  ids = np.array([0, 1, 0, 2, 3, 1])
  got = losses.ssl_loss(z1, z2, temperature=0.5, item_ids=ids)
  a = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  b = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  logits = a @ b.T / 0.5
  want = []
  for i in range(6):
    keep = (ids != ids[i]) | (np.arange(6) == i)
    want.append(np.log(np.exp(logits[i, keep]).sum()) - logits[i, i])
  assert float(got) == pytest.approx(np.mean(want), rel=1e-5)
  assert float(losses.ssl_loss(z1, z2, temperature=0.5, item_ids=np.arange(6))) == pytest.approx(
    float(losses.ssl_loss(z1, z2, temperature=0.5)), rel=1e-6
  )


@pytest.mark.parametrize("opt", [sparse.LazyAdam(0.1), sparse.RowwiseAdagrad(0.1)])
def test_table_warmup_scales_the_step_not_the_gradient(opt):
  table = jnp.ones((4, 3))
  state = opt.init(table)
  uniq, g = jnp.array([1, 2]), jnp.full((2, 3), 0.5)
  full, _ = opt.update(table, state, uniq, g, jnp.int32(0))
  part, _ = opt.update(table, state, uniq, g, jnp.int32(0), 0.25)
  np.testing.assert_allclose(table - part, 0.25 * (table - full), rtol=1e-5)


def test_mechanism_dataset():
  c = mechanism_config.get_config("cfm")
  c.data.num_items, c.data.num_train_pairs, c.data.nuisance_values = 2000, 20_000, 16
  d1, d2 = sources.load(c), sources.load(c)
  np.testing.assert_array_equal(d1.items["a1"], d2.items["a1"])
  assert d1.item_spec.groups == mechanism.groups() and d1.item_spec.num_features == 8
  c.seed = 1  # data.seed = -1: the data follows seed
  assert not np.array_equal(sources.load(c).items["a1"], d1.items["a1"])
  # Every feature of a group carries the group's nuisance token; groups differ.
  a, b = d1.items["a1"], d1.items["b1"]
  np.testing.assert_array_equal(a[:, 1], d1.items["a4"][:, 1])
  assert not np.array_equal(a[:, 1], b[:, 1])
  # Tail items' relevance tokens are never a head item's.
  head_token = a[:, 0] < mechanism.NUM_RELEVANCE
  assert head_token.mean() == pytest.approx(mechanism.HEAD_FRACTION)
  assert not set(a[head_token, 0]) & set(a[~head_token, 0])
  freq = np.bincount(d1.train_item, minlength=d1.num_items)
  assert head_token[np.argsort(-freq)[:100]].all()  # the most frequent items are head items
  # Without a nuisance every item of a group has the same nuisance token.
  c.data.nuisance_values = 1
  assert np.unique(sources.load(c).items["a1"][:, 1]).size == 1


def test_oracle_needs_declared_groups(tmp_path, capsys):
  from tests.test_movielens import ml_config

  config = ml_config()
  config.ssl.masking = "oracle"
  assert cli.run_main(config, str(tmp_path / "run")) == 2
  err = capsys.readouterr().err.strip()
  assert (
    err.startswith("error: config.ssl.masking='oracle'") and "declares no feature groups" in err
  )
  assert "\n" not in err


# ----------------------------------------------------------------------------- the SSL step


def _run(**ssl):
  config = tiny_config()
  for k, v in ssl.items():
    config.ssl[k] = v
  return train.Run(config)


def _grads(run, pairs, items, rng):
  views = step.make_views(
    rng, items, model=run.model, config=run.config, mi=jnp.asarray(run.stats.mi, jnp.float32)
  )
  fn = lambda p: step.loss_fn(p, pairs, items, views, model=run.model, config=run.config)  # noqa: E731
  (_, metrics), grads = jax.value_and_grad(fn, has_aux=True)(run.state.params)
  return views, metrics, grads


def test_ssl_wiring():
  run = _run()
  pairs = jax.device_get(next(run.pair_iter))
  items = jax.device_get(next(run.item_iter))
  views, metrics, grads = _grads(run, pairs, items, jax.random.key(0))
  # Default (mask) embeddings of the masked features receive gradient through L_self.
  g = grads["params"]["item_input"]
  masked = [f.name for f, m in zip(run.model.item_spec.features, views.m1) if m]
  assert masked and all(float(jnp.abs(g[f"{n}_default"]).sum()) > 0 for n in masked)
  # The mask changes from step to step.
  masks = {
    np.asarray(
      step.make_views(
        jax.random.fold_in(jax.random.key(0), s),
        items,
        model=run.model,
        config=run.config,
        mi=jnp.asarray(run.stats.mi),
      ).mask
    ).tobytes()
    for s in range(20)
  }
  assert len(masks) > 1
  # alpha scales L_self: loss = main + alpha * ssl.
  run.config.ssl.alpha = 0.3
  _, m3, _ = _grads(run, pairs, items, jax.random.key(0))
  assert float(m3["loss"]) == pytest.approx(float(m3["loss/main"] + 0.3 * m3["loss/ssl"]), rel=1e-5)
  assert float(m3["loss/ssl"]) == pytest.approx(float(metrics["loss/ssl"]), rel=1e-5)
  # SSL reads the item stream, not the pairs: other items change L_self, other pairs do not.
  other_items = jax.device_get(next(run.item_iter))
  _, m_items, _ = _grads(run, pairs, other_items, jax.random.key(0))
  other_pairs = jax.device_get(next(run.pair_iter))
  _, m_pairs, _ = _grads(run, other_pairs, items, jax.random.key(0))
  assert float(m_items["loss/ssl"]) != pytest.approx(float(metrics["loss/ssl"]), rel=1e-4)
  assert float(m_pairs["loss/ssl"]) == pytest.approx(float(metrics["loss/ssl"]), rel=1e-6)


def test_mask_summary_before_training():
  """The line printed before training: what the strategy draws on this data."""
  c = mechanism_config.get_config("oracle")
  c.data.num_items, c.data.num_train_pairs, c.data.num_eval_pairs = 2000, 20_000, 2000
  c.data.num_queries = 4000
  run = train.Run(c)
  oracle = run.mask_summary(draws=500)
  assert oracle.startswith(
    "ssl masks (oracle): 2 distinct in 500 draws, declared groups whole 100%"
  )
  freq = dict(kv.split("=") for kv in oracle.split("view 1: ")[1].split())
  assert len({freq[f"a{i}"] for i in range(1, 5)}) == 1  # a group moves as one
  assert abs(float(freq["a1"]) - 0.5) < 0.1 and abs(float(freq["b1"]) - 0.5) < 0.1
  run.config.ssl.masking = "rfm"
  rfm = run.mask_summary(draws=500)
  distinct = int(rfm.split(": ")[1].split(" ")[0])
  assert distinct > 40 and "declared groups whole 100%" not in rfm


@pytest.mark.parametrize(
  "sharing,hidden,encoding,count",
  [
    ("all_but_last", (64,), "stacked", "drawn"),
    ("all_but_last", (64,), "blocks", "drawn"),
    ("all_but_last", (64,), "blocks", "other"),
    ("all", (32, 16), "blocks", "drawn"),
    ("all", (32, 16), "blocks", None),
    ("none", (), "blocks", "drawn"),
    ("all_but_last", (), "stacked", "drawn"),
  ],
)
def test_shared_views_encode_as_two_separate_views(sharing, hidden, encoding, count):
  """Complementary masks: the two views come from one dropped-out batch, each feature looked up
  once and each first-layer block multiplied once (``second_mask``); the embeddings and their
  gradients equal those of the 2N-row pass over the two views. ``count``: the static mask count
  given to the encoder: the drawn one (each view's kept blocks gathered into one product),
  another (the draw disagrees: the per-block sums, chosen on the device) or none. 'none' masks
  nothing in either view (two dropouts)."""
  config = tiny_config()
  config.ssl.encoder_sharing, config.model.item_hidden = sharing, hidden
  config.ssl.view_encoding = encoding
  run = train.Run(config)
  items = jax.device_get(next(run.item_iter))
  views = step.make_views(
    jax.random.key(3), items, model=run.model, config=run.config, mi=jnp.asarray(run.stats.mi)
  )
  assert views.shared and views.v1 is views.v2
  np.testing.assert_array_equal(np.asarray(views.m2), ~np.asarray(views.m1))
  assert views.num_masked == int(np.asarray(views.m1).sum())
  p, m = run.state.params, run.model
  given = {"drawn": views.num_masked, "other": views.num_masked - 1, None: None}[count]
  two = functools.partial(m.apply, second_mask=views.m2, num_masked=given, method=m.ssl_encoder)
  fast = two(p, views.v1, views.m1)
  n = jax.tree.leaves(views.v1)[0].shape[0]
  both = jax.tree.map(lambda a: np.concatenate([a, a], 0), views.v1)
  rows = np.concatenate([np.broadcast_to(v, (n, v.size)) for v in (views.m1, views.m2)])
  slow = m.apply(p, both, rows, method=m.ssl_encoder)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-5, atol=1e-6)
  w = jnp.asarray(np.random.default_rng(0).normal(size=fast.shape), jnp.float32)
  g_fast = jax.grad(lambda p: (w * two(p, views.v1, views.m1)).sum())(p)
  g_slow = jax.grad(lambda p: (w * m.apply(p, both, rows, method=m.ssl_encoder)).sum())(p)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_slow), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  run.config.ssl.masking = "none"
  none = step.make_views(
    jax.random.key(3), items, model=run.model, config=run.config, mi=jnp.asarray(run.stats.mi)
  )
  assert not none.shared and not np.asarray(none.m1).any() and not np.asarray(none.m2).any()
