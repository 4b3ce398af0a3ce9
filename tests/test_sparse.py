"""Sparse row-wise embedding updates against a dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslrec import sparse


def _loss(table, ids, target):
  valid = (ids >= 0)[..., None]
  rows = jnp.take(table, jnp.where(ids >= 0, ids, 0), axis=0) * valid
  return jnp.sum((rows.sum(axis=1) - target) ** 2)


def test_dedupe_positions_and_fill():
  a = jnp.array([[3, 3, -1], [7, 0, -1]])
  b = jnp.array([7, 9])
  uniq, (la, lb) = sparse.dedupe([a, b], num_rows=10)
  assert uniq.shape == (8,)
  np.testing.assert_array_equal(uniq[:4], [0, 3, 7, 9])
  assert (uniq[4:] == 10).all()
  np.testing.assert_array_equal(uniq[jnp.where(la >= 0, la, 0)][a >= 0], a[a >= 0])
  assert (la[a < 0] == -1).all()
  np.testing.assert_array_equal(uniq[lb], b)


@pytest.mark.parametrize("rows", [1, 5, 40, 300, 5000, 100_000])
def test_dedupe_by_presence_and_by_sort_agree(rows):
  """Small tables (rows <= DENSE_DEDUPE_RATIO per id slot) dedupe through a presence vector,
  large ones by sorting: both give the same sorted ids, fill and positions, with padding, every
  row present (rows=1, 5) or few (100,000 rows)."""
  rng = np.random.default_rng(rows)
  ids = [jnp.asarray(rng.integers(-1, rows, size=s), jnp.int32) for s in ((64,), (32, 3), (0,))]
  flat = jnp.concatenate([x.reshape(-1) for x in ids])
  by_presence = jax.jit(lambda f, *x: sparse._dedupe_by_presence(f, x, rows))(flat, *ids)
  by_sort = jax.jit(lambda f, *x: sparse._dedupe_by_sort(f, x, rows))(flat, *ids)
  for a, b in zip(jax.tree.leaves(by_presence), jax.tree.leaves(by_sort), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  uniq, _ = sparse.dedupe(ids, rows)
  np.testing.assert_array_equal(np.asarray(uniq), np.asarray(by_sort[0]))


def test_rowwise_adagrad_matches_dense_reference_and_leaves_other_rows_untouched():
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(1000, 8)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 50, size=(64, 4)) * 7, jnp.int32)  # many duplicates
  ids = ids.at[:, 3].set(-1)
  target = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  opt = sparse.RowwiseAdagrad(learning_rate=0.3)
  state = opt.init(table)

  # Sparse: gather, differentiate w.r.t. the gathered rows, update, scatter.
  uniq, (local,) = sparse.dedupe([ids], table.shape[0])
  rows = sparse.gather_rows(table, uniq)
  g_rows = jax.grad(_loss)(rows, local, target)
  new_table, new_state = jax.jit(opt.update)(table, state, uniq, g_rows, jnp.int32(0))

  # Dense reference on the full table.
  g_full = jax.grad(_loss)(table, ids, target)
  ref_table, ref_acc = sparse.dense_rowwise_adagrad_reference(table, state["acc"], g_full, 0.3)

  touched = np.unique(np.asarray(ids)[np.asarray(ids) >= 0])
  untouched = np.setdiff1d(np.arange(1000), touched)
  np.testing.assert_allclose(new_table[touched], ref_table[touched], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state["acc"][touched], ref_acc[touched], rtol=1e-5)
  assert not np.allclose(new_table[touched], table[touched])
  # Untouched rows and accumulators are bit-identical to before the step.
  np.testing.assert_array_equal(np.asarray(new_table)[untouched], np.asarray(table)[untouched])
  np.testing.assert_array_equal(
    np.asarray(new_state["acc"])[untouched], np.asarray(state["acc"])[untouched]
  )


def test_lazy_adam_updates_only_touched_rows_like_adam_on_them():
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.normal(size=(200, 4)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 200, size=(16, 2)), jnp.int32)
  target = jnp.zeros((16, 4))
  opt = sparse.LazyAdam(learning_rate=0.01)
  state = opt.init(table)
  uniq, (local,) = sparse.dedupe([ids], 200)
  g_rows = jax.grad(_loss)(sparse.gather_rows(table, uniq), local, target)
  new_table, _ = opt.update(table, state, uniq, g_rows, jnp.int32(0))
  # First Adam step moves each touched element by lr * sign(g) (bias-corrected).
  g_full = np.asarray(jax.grad(_loss)(table, ids, target))
  touched = np.unique(np.asarray(ids))
  np.testing.assert_allclose(
    np.asarray(new_table - table)[touched], -0.01 * np.sign(g_full[touched]), atol=1e-5
  )
  untouched = np.setdiff1d(np.arange(200), touched)
  np.testing.assert_array_equal(np.asarray(new_table)[untouched], np.asarray(table)[untouched])


def _sparse_run(**overrides):
  from sslrec import train
  from tests.conftest import tiny_config

  config = tiny_config()
  config.optimizer.embedding_update = "sparse"
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.sparse_min_rows = 0  # every table on the sparse path
  config.mesh.shape = (1,)
  for k, v in overrides.items():
    section, name = k.split(".")
    config[section][name] = v
  return train.Run(config, devices=jax.devices()[:1]), config


def test_sparse_train_step_matches_dense_rowwise_reference():
  from sslrec import parallel, step

  run, config = _sparse_run()
  pairs = parallel.to_global(next(run.pair_iter), run.mesh)
  items = parallel.to_global(next(run.item_iter), run.mesh)
  before = jax.device_get(run.state)
  # Reference: full gradient of every table row, then dense row-wise Adagrad on the whole table.
  rng = jax.random.fold_in(run.step_rng, 0)
  views = step.make_views(
    rng, items, model=run.model, config=config, mi=jnp.asarray(run.stats.mi, jnp.float32)
  )
  grad_fn = jax.jit(
    jax.grad(lambda p: step.loss_fn(p, pairs, items, views, model=run.model, config=config)[0])
  )
  full_grads = jax.device_get(grad_fn(before.params))
  new_state, metrics = run.step_fn(run.state, pairs, items, run.step_rng)
  new_state = jax.device_get(new_state)
  assert np.isfinite(metrics["loss"])
  lr = config.optimizer.embedding_learning_rate
  checked = 0
  for scope in ("item_input", "query_input"):
    for name, table in before.params["params"][scope].items():
      if not name.endswith("_table"):
        continue
      acc = before.emb_state[f"{scope}/{name}"]["acc"]  # every table is sparse here
      g = full_grads["params"][scope][name]
      ref, _ = sparse.dense_rowwise_adagrad_reference(table, acc, g, lr)
      touched = np.abs(g).sum(axis=1) > 0
      new = new_state.params["params"][scope][name]
      np.testing.assert_allclose(new[touched], ref[touched], rtol=1e-4, atol=1e-6, err_msg=name)
      np.testing.assert_array_equal(new[~touched], table[~touched])  # bit-identical
      checked += int(touched.sum())
  assert checked > 100


def test_sparse_training_learns(tmp_path):
  from sslrec import train
  from sslrec.run import workdir
  from tests.conftest import tiny_config

  config = tiny_config()
  config.optimizer.embedding_update = "sparse"
  config.optimizer.sparse_min_rows = 0  # every table, also the smoke config's small ones
  config.train.num_steps = 200
  config.train.log_every = 50
  out = train.train_and_evaluate(config, str(tmp_path))
  m = {r["step"]: r for r in workdir.read_jsonl(str(tmp_path / "metrics.jsonl"))}
  assert m[200]["loss/main"] < 0.8 * m[50]["loss/main"]
  assert m[200]["data/oov_ids"] == 0
  assert out["recall@50"] > 1.5 * out["popularity/recall@50"]


def _routing_runs(**overrides):
  """The same sparse run on 8 devices with 'gather' and with 'owner' routing."""
  from sslrec import train
  from tests.conftest import tiny_config

  runs = []
  for routing in ("gather", "owner"):
    config = tiny_config()
    config.optimizer.embedding_update = "sparse"
    config.optimizer.embedding_routing = routing
    config.optimizer.warmup_steps = 3
    config.optimizer.grad_clip_norm = 0.05  # binds: the routed norm must equal the gathered one
    config.data.num_items = 1500
    config.data.num_train_pairs = 5000
    config.data.num_queries = 2000
    config.data.num_eval_pairs = 300
    config.eval.references = ()
    for k, v in overrides.items():
      section, name = k.split(".")
      config[section][name] = v
    runs.append(train.Run(config, devices=jax.devices()[:8]))
  return runs


def _assert_same_steps(runs, steps=2):
  gather, owner = runs
  before = jax.device_get(gather.state)
  for _ in range(steps):
    mg, mo = gather.step(), owner.step()
    for k in ("loss", "grad_norm", "loss/ssl")[: 3 if "loss/ssl" in mg else 2]:
      np.testing.assert_allclose(float(mo[k]), float(mg[k]), rtol=2e-5, err_msg=k)
  assert float(mg["grad_norm"]) > gather.config.optimizer.grad_clip_norm  # clipping was on
  a, b = jax.device_get(gather.state), jax.device_get(owner.state)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  old, new = (
    before.params["params"]["item_input"]["item_id_table"],
    b.params["params"]["item_input"]["item_id_table"],
  )
  moved = np.any(old != new, axis=1)
  assert 0 < moved.sum() < len(moved)  # only touched rows moved
  assert "item_input/item_id_table" in b.emb_state  # routed (row-wise optimizer state)
  assert "item_input/category_table" not in b.emb_state  # replicated: dense optimizer


def test_owner_routing_matches_gather_on_8_devices():
  """Owner-routed lookups and updates (all-to-all, ``sparse.RoutedPlan``) give the same losses,
  clipped gradient norm, updated rows and optimizer state as the gathered path over two steps,
  with CFM SSL (the views reuse the SSL items' rows) and the tables under
  ``model.replicate_table_rows`` replicated (both paths: dense optimizer under sparse_min_rows)."""
  _assert_same_steps(
    _routing_runs(**{"model.replicate_table_rows": 1024, "optimizer.sparse_min_rows": 1024})
  )


def test_owner_routing_overflow_path_matches_gather():
  """routing_capacity=1: 4 id slots per destination for 32 slots on 8 devices, so some owner
  gets more distinct ids than that and the step takes the full-capacity path; still exact."""
  _assert_same_steps(
    _routing_runs(
      **{"optimizer.sparse_min_rows": 1024, "optimizer.routing_capacity": 1.0, "ssl.alpha": 0.0}
    ),
    steps=1,
  )


def test_unroutable_mesh_and_bad_routing_are_config_errors():
  import pytest

  from sslrec import configuration, errors, parallel
  from tests.conftest import tiny_config

  mesh = parallel.make_mesh((4, 2), ("data", "model"), jax.devices()[:8])
  with pytest.raises(errors.ConfigError, match="embedding_routing='owner'.*mesh"):
    sparse.check_routable(mesh)
  sparse.check_routable(parallel.make_mesh((8,), ("data",), jax.devices()[:8]))  # routable
  config = tiny_config()
  config.optimizer.embedding_routing = "scatter"
  with pytest.raises(errors.ConfigError, match="optimizer.embedding_routing"):
    configuration.validate(config)
