"""Scale-out: sharded step == 1-device step; row-sharded tables; multi-process == single-process."""

import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslrec import configuration, errors, parallel, train
from sslrec.run import cluster
from sslrec.run import workdir as workdir_lib
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(update="dense"):
  config = tiny_config()
  config.optimizer.embedding_update = update
  config.optimizer.sparse_min_rows = 1000  # item_id (2001 rows) takes the sparse path
  return config


@pytest.fixture(scope="module", params=["dense", "sparse"])
def reference(request):
  """One step on a single device, and the host batches it used."""
  config = _config(request.param)
  config.mesh.shape = (1,)
  config.mesh.axes = ("data",)
  run = train.Run(config, devices=jax.devices()[:1])
  pairs, items = next(run.pair_iter), next(run.item_iter)
  state, metrics = run.step_fn(
    run.state,
    parallel.to_global(pairs, run.mesh),
    parallel.to_global(items, run.mesh),
    run.step_rng,
  )
  return (pairs, items), jax.device_get(state.params), jax.device_get(metrics), request.param


@pytest.mark.parametrize("shape,axes", [((8,), ("data",)), ((4, 2), ("data", "model"))])
def test_sharded_step_equals_single_device_step(reference, shape, axes):
  """A 1-D and a 2-D mesh, dense and sparse updates (test_each_device_holds_its_share_of_every_table
  covers the (2, 4) layout)."""
  (pairs, items), ref_params, ref_metrics, update = reference
  config = _config(update)
  config.mesh.shape, config.mesh.axes = shape, axes
  run = train.Run(config)
  assert run.mesh.size == 8
  state, metrics = run.step_fn(
    run.state,
    parallel.to_global(pairs, run.mesh),
    parallel.to_global(items, run.mesh),
    run.step_rng,
  )
  metrics = jax.device_get(metrics)
  for k in ("loss", "loss/main", "loss/ssl"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_params)
  flat = jax.tree_util.tree_leaves(jax.device_get(state.params))
  for (path, a), b in zip(flat_ref, flat):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
  "shape,axes,shards", [((8,), ("data",), 8), ((2, 4), ("data", "model"), 4)]
)
def test_each_device_holds_its_share_of_every_table(shape, axes, shards):
  config = tiny_config()
  config.mesh.shape, config.mesh.axes = shape, axes
  run = train.Run(config)
  tables = {
    jax.tree_util.keystr(p): x
    for p, x in jax.tree_util.tree_leaves_with_path(run.state.params)
    if "_table" in jax.tree_util.keystr(p)
  }
  expected = sum(
    f.kind != "dense"
    for spec in (run.dataset.item_spec, run.dataset.query_spec)
    for f in spec.features
  )
  assert len(tables) == expected
  for name, t in tables.items():
    assert t.shape[0] % shards == 0
    for s in t.addressable_shards:
      assert s.data.shape == (t.shape[0] // shards, t.shape[1]), name
  # The row-wise optimizer's accumulators (every table is sparse by default) are sharded the
  # same way.
  acc = jax.tree.leaves(run.state.emb_state)
  assert len(acc) == expected
  assert acc and all(
    s.data.shape[0] == a.shape[0] // shards for a in acc for s in a.addressable_shards
  )


def test_sharded_top_k_matches_numpy():
  mesh = parallel.make_mesh((8,), ("data",))
  rng = np.random.default_rng(0)
  items = rng.normal(size=(1003, 16)).astype(np.float32)  # not a multiple of 8: padded
  q = rng.normal(size=(5, 16)).astype(np.float32)
  arr, n = parallel.shard_rows(items, mesh)
  _, ids = parallel.make_sharded_top_k(mesh, 20, n)(q, arr)
  expect = np.argsort(-(q @ items.T), axis=1)[:, :20]
  np.testing.assert_array_equal(np.asarray(ids), expect)


def _overrides(config_dict_updates):
  return [f"--config.{k}={v}" for k, v in config_dict_updates.items()]


MP = {
  "train.batch_size": 64,
  "ssl.batch_size": 64,
  "train.log_every": 1,
  "train.checkpoint_every": 3,
  "train.eval_every": 1000,
  "eval.max_queries": 500,
}


def test_two_processes_resume_and_match_one_process(tmp_path):
  wd = str(tmp_path / "mp")
  base_args = ["--config=configs/smoke.py", f"--workdir={wd}"] + _overrides(MP)
  log = io.StringIO()
  assert (
    cluster.run(
      base_args + ["--config.train.num_steps=3"], num_processes=2, devices_per_process=4, out=log
    )
    == 0
  ), log.getvalue()[-3000:]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]
  log = io.StringIO()
  assert (
    cluster.run(
      base_args + ["--config.train.num_steps=6"], num_processes=2, devices_per_process=4, out=log
    )
    == 0
  ), log.getvalue()[-3000:]
  assert "[0] resumed from checkpoint at step 3" in log.getvalue()
  assert "[1] step" not in log.getvalue()  # only process 0 reports

  config = tiny_config()
  for k, v in MP.items():
    section, name = k.split(".")
    config[section][name] = v
  config.train.num_steps = 6
  single = str(tmp_path / "single")
  train.train_and_evaluate(config, single)

  a = {r["step"]: r for r in workdir_lib.read_jsonl(os.path.join(single, "metrics.jsonl"))}
  b = {r["step"]: r for r in workdir_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))}
  for step in range(1, 7):
    np.testing.assert_allclose(b[step]["loss"], a[step]["loss"], rtol=1e-4, err_msg=str(step))

  # The validation at step 6 scores the same parameters in both (the test line may not: the
  # two-process run also validated at step 3, the end of its first invocation, and may select it).
  def valid_at_6(path):
    return next(
      r
      for r in workdir_lib.read_jsonl(os.path.join(path, "eval.jsonl"))
      if r["split"] == "valid" and r["step"] == 6
    )

  ea, eb = valid_at_6(single), valid_at_6(wd)
  for k in ("recall@10", "recall@50", "recall@50/tail", "recall@100"):
    assert abs(ea[k] - eb[k]) <= 0.004, (k, ea[k], eb[k])  # <= 2 of 500 pairs


def _main(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "launch/main.py", "--config=configs/smoke.py", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=env,
    timeout=timeout,
  )


def test_process_id_out_of_range(tmp_path):
  p = _main(
    f"--workdir={tmp_path}",
    "--coordinator_address=127.0.0.1:1234",
    "--num_processes=2",
    "--process_id=2",
  )
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert "error: --process_id=2 is out of range; allowed 0..1" in p.stderr


def test_unreachable_coordinator_times_out_clearly(tmp_path):
  port = cluster.free_port()
  p = _main(
    f"--workdir={tmp_path}",
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    "--process_id=1",
    "--distributed_timeout=3",
  )
  assert p.returncode == 2, p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  assert f"error: could not join the coordinator at 127.0.0.1:{port} within 3s" in p.stderr


def test_chunked_sharded_top_k_matches_numpy():
  mesh = parallel.make_mesh((8,), ("data",))
  rng = np.random.default_rng(1)
  items = rng.normal(size=(5000, 8)).astype(np.float32)
  q = rng.normal(size=(3, 8)).astype(np.float32)
  arr, n = parallel.shard_rows(items, mesh, row_multiple=128)  # 8 x 640 rows: 5 blocks each
  assert arr.shape[0] == 5120
  v, ids = parallel.make_sharded_top_k(mesh, 50, n, chunk=128)(q, arr)
  expect = np.argsort(-(q @ items.T), axis=1)[:, :50]
  np.testing.assert_array_equal(np.asarray(ids), expect)


def _reference_top_k(scores: np.ndarray, k: int) -> np.ndarray:
  """ids of the top ``k`` per row, ties to the lower id (numpy's stable sort)."""
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("rows,k", [(4096, 20), (2048, 16), (640, 40)])
def test_two_stage_block_top_k_is_exactly_top_k_with_ties_padding_and_exclusions(rows, k):
  """The grouped selection (top-k of group maxima, then of the winning groups' scores) returns
  what one top-k over the whole block does: same ids and scores, ties to the lower id, padding
  rows and excluded pairs never selected."""
  g = parallel._top_k_group(rows, k)
  assert g >= 4, g  # these sizes take the two-stage path
  rng = np.random.default_rng(rows + k)

  def ints(*shape):  # nonzero small integers: exact sums in any order, scores tie often
    return rng.choice(np.array([-3, -2, -1, 1, 2, 3], np.float32), size=shape)

  x = ints(rows, 8)
  x[rng.integers(0, rows, 200)] = x[7]  # more ties, across groups and within one
  x[rows // 2 : rows // 2 + 3 * g] = x[rows - 1]
  q = ints(6, 8)
  start, num_valid = 1000, 1000 + rows - 37  # the last 37 rows are padding
  ex_q = np.array([0, 0, 1, 5, 9, 2], np.int32)  # query 9 >= B: padding
  scores = q @ x.T
  ex_i = start + np.concatenate([_reference_top_k(scores, 3)[0, :2], [5, 7, 11, 1]]).astype(
    np.int32
  )
  top = jax.jit(
    lambda q, x, a, b: parallel.block_top_k(
      q, x, jnp.int32(start), k, num_valid, exclude=(a, b), precision=jax.lax.Precision.HIGHEST
    )
  )
  v, ids = map(np.asarray, top(q, x, ex_q, ex_i))
  want = scores.copy()
  want[:, num_valid - start :] = -np.inf
  for a, b in zip(ex_q, ex_i):
    if a < q.shape[0]:
      want[a, b - start] = -np.inf
  expect = _reference_top_k(want, k)
  np.testing.assert_array_equal(ids, start + expect)
  np.testing.assert_allclose(v, np.take_along_axis(want, expect, axis=1), rtol=1e-6)
  assert not np.isin(ids[0], ex_i[:2]).any() and (ids < num_valid).all()


def test_two_stage_top_k_through_the_sharded_scorer_matches_numpy():
  mesh = parallel.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  rng = np.random.default_rng(3)
  items = rng.choice(np.array([-2, -1, 1, 2], np.float32), size=(7000, 8))  # exact, many ties
  q = rng.choice(np.array([-2, -1, 1, 2], np.float32), size=(4, 8))
  arr, n = parallel.shard_rows(items, mesh, row_multiple=2048)  # 2 x 4096 rows: 2 blocks each
  assert parallel._top_k_group(2048, 30) >= 4
  _, ids = parallel.make_sharded_top_k(mesh, 30, n, chunk=2048)(q, arr)
  np.testing.assert_array_equal(np.asarray(ids), _reference_top_k(q @ items.T, 30))


def test_bench_reads_collective_bytes_from_hlo_and_passes_config_overrides():
  from sslrec.experiments import bench

  hlo = "\n".join(
    [
      "  %p = f32[64,8]{1,0} parameter(0)",
      '  %all-gather = s32[64,1]{1,0} all-gather(%x), dimensions={0}, metadata={op_name="jit(f)/'
      'embeddings/gather"}',
      '  %rs = f32[16,8]{1,0} reduce-scatter(%p), dimensions={0}, metadata={op_name="jit(f)/loss"}',
      "  %a2a = (f32[1,4]{1,0}, f32[1,4]{1,0}) all-to-all(%p, %p), metadata={op_name="
      '"jit(f)/embeddings/overflow/x"}',
      "  ROOT %all-reduce.1 = f32[] all-reduce(%y), to_apply=%add",
    ]
  )
  # all-gather 256 B + reduce-scatter (its operand, 2048 B) + all-reduce 4 B; overflow excluded
  assert bench.collective_bytes(hlo) == (256 + 2048 + 4, 3)
  assert bench.collective_bytes(hlo, "embeddings") == (256, 1)
  assert bench.collective_bytes(hlo, "embeddings", exclude=None) == (256 + 4096, 2)
  argv = ["--quick", "--config.ssl.alpha=0.5", "--config.data.num_items", "500", "--out=x"]
  assert bench.config_args(argv) == ["--config.ssl.alpha=0.5", "--config.data.num_items=500"]


def test_cpu_devices_sets_the_device_count_before_jax_starts():
  code = (
    "from sslrec import parallel; parallel.set_cpu_devices(3); import jax; "
    "print(jax.device_count(), parallel.make_mesh((-1,), ('data',)).shape['data'])"
  )
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.path.join(REPO, "src")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.split() == ["3", "3"]
  # here JAX already runs (8 devices): one clear error, nothing changed
  assert jax.device_count() == 8
  with pytest.raises(errors.ConfigError, match=r"mesh\.cpu_devices=2: JAX's backends are already"):
    parallel.set_cpu_devices(2)
  assert jax.device_count() == 8
  config = tiny_config()
  config.mesh.cpu_devices = -1
  with pytest.raises(errors.ConfigError, match=r"mesh\.cpu_devices=-1 is invalid"):
    configuration.validate(config)
