"""Beyond in-batch negatives: the streaming frequency estimator, mixed negatives, corrected logQ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from sslrec import cli, frequency, losses, step, train

# ------------------------------------------------------------------- the streaming estimator


def _zipf(n, perm, exponent=1.1):
  p = 1.0 / np.arange(1, n + 1) ** exponent
  p /= p.sum()
  out = np.empty(n)
  out[perm] = p
  return out


def _slipped_update(state, ids, step, *, learning_rate):
  """The classic slip: ``A <- t`` written before the gap is read (every gap is then 0)."""
  moved = frequency.update(state, ids, step, learning_rate=1.0)  # A <- t (and B: any value)
  last = moved["last_table"]
  fresh = {"last_table": last, "gap_table": state["gap_table"]}
  return frequency.update(fresh, ids, step, learning_rate=learning_rate)


def _stream_errors(update, *, n=2000, batch=256, steps=600, buckets=1 << 14, hashes=2):
  """Median relative error of the per-pair probability of the 100 most likely items, just
  before and at the end of a stream whose Zipf ranking is reshuffled half-way."""
  rng = np.random.default_rng(0)
  p1, p2 = _zipf(n, np.arange(n)), _zipf(n, rng.permutation(n))
  fn = jax.jit(lambda s, ids, t: update(s, ids, t, learning_rate=0.05))
  state = frequency.init(buckets, hashes)
  errors = []
  for t in range(steps):
    p = p1 if t < steps // 2 else p2
    state = fn(state, jnp.asarray(rng.choice(n, batch, p=p), jnp.int32), t)
    if t in (steps // 2 - 1, steps - 1):
      top = np.argsort(-p)[:100]
      est = np.asarray(frequency.estimate(state, jnp.asarray(top, jnp.int32))) / batch
      errors.append(float(np.median(np.abs(est - p[top]) / p[top])))
  return errors


def test_streaming_estimate_tracks_a_zipf_stream_with_a_switch():
  before, after = _stream_errors(frequency.update)
  assert before < 0.2 and after < 0.2, (before, after)  # the switch is forgotten in 300 steps
  # The check catches the classic slip (A written before the gap is read).
  slipped = _stream_errors(_slipped_update)
  assert min(slipped) > 1.0, slipped


def test_estimate_counts_repeats_and_takes_the_most_conservative_hash():
  state = frequency.init(64, 3)
  ids = jnp.asarray([5, 5, 5, 9], jnp.int32)
  for t in range(10):  # id 5 three times a step, id 9 once
    state = frequency.update(state, ids, t, learning_rate=0.5)
  est = np.asarray(frequency.estimate(state, jnp.asarray([5, 9, 1234], jnp.int32)))
  np.testing.assert_allclose(est[:2], [3.0, 1.0], rtol=1e-5)
  assert est[2] == 0.0 or est[2] >= 1.0  # never seen, or sharing a bucket with 5 or 9
  # One bucket: every id collides, each hash sees the total rate; the estimate is that rate.
  one = frequency.init(1, 2)
  for t in range(5):
    one = frequency.update(one, ids, t)
  np.testing.assert_allclose(np.asarray(frequency.estimate(one, ids)), 4.0, rtol=1e-5)
  # The most conservative hash: the largest gap (the smallest rate) wins.
  gaps = {"last_table": jnp.zeros((4, 2), jnp.int32), "gap_table": jnp.full((4, 2), 2.0)}
  gaps["gap_table"] = gaps["gap_table"].at[:, 1].set(8.0)
  np.testing.assert_allclose(np.asarray(frequency.estimate(gaps, ids)), 1 / 8.0)


def test_estimator_bad_sizes():
  with pytest.raises(ValueError, match="num_buckets=0"):
    frequency.init(0, 2)


# ---------------------------------------------------------------------------------- the loss


def _np_standard(logits, log_q, ids):
  z = logits - log_q[None, :]
  b = logits.shape[0]
  out = []
  for i in range(b):
    keep = [j for j in range(z.shape[1]) if j == i or ids[j] != ids[i]]
    zi = z[i, keep]
    out.append(np.log(np.exp(zi).sum()) - z[i, i])
  return np.mean(out)


def _np_corrected(logits, log_q, ids):
  b = logits.shape[0]
  out = []
  for i in range(b):
    neg = [j for j in range(logits.shape[1]) if j != i and ids[j] != ids[i]]
    z = logits[i, neg] - log_q[neg]
    s_p = logits[i, i]
    p_hat = np.exp(s_p) / (np.exp(s_p) + np.exp(z).mean())
    out.append((1 - p_hat) * (np.log(np.exp(z).sum()) - s_p))
  return np.mean(out)


def _emb(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.mark.parametrize("mode", ["standard", "corrected"])
def test_loss_with_mixed_negatives_matches_brute_force(mode):
  rng = np.random.default_rng(0)
  q, x, u = _emb(rng, 6, 4), _emb(rng, 6, 4), _emb(rng, 5, 4)
  ids = np.array([1, 2, 3, 1, 4, 5])
  extra_ids = np.array([7, 2, 8, 9, 1])
  lq, elq = rng.normal(size=6), rng.normal(size=5)
  tau = 0.5
  got = losses.batch_softmax_loss(
    q,
    x,
    temperature=tau,
    log_q=lq,
    item_ids=ids,
    extra_emb=u,
    extra_log_q=elq,
    extra_ids=extra_ids,
    logq_mode=mode,
  )
  qn = np.asarray(q) / np.linalg.norm(q, axis=1, keepdims=True)
  cand = np.concatenate([np.asarray(x), np.asarray(u)])
  cn = cand / np.linalg.norm(cand, axis=1, keepdims=True)
  logits = qn @ cn.T / tau
  ref = (_np_standard if mode == "standard" else _np_corrected)(
    logits, np.concatenate([lq, elq]), np.concatenate([ids, extra_ids])
  )
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_standard_loss_without_extra_columns_is_unchanged():
  rng = np.random.default_rng(1)
  q, x = _emb(rng, 8, 4), _emb(rng, 8, 4)
  ids = np.array([0, 1, 2, 0, 3, 4, 5, 6])
  lq = rng.normal(size=8)
  got = losses.batch_softmax_loss(q, x, temperature=0.2, log_q=lq, item_ids=ids)
  qn = np.asarray(q) / np.linalg.norm(q, axis=1, keepdims=True)
  xn = np.asarray(x) / np.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_allclose(float(got), _np_standard(qn @ xn.T / 0.2, lq, ids), rtol=1e-5)


def test_corrected_weight_is_held_constant():
  """The gradient is the weight times the gradient of the unweighted row loss."""
  rng = np.random.default_rng(2)
  q, x = _emb(rng, 4, 3), _emb(rng, 4, 3)
  lq = jnp.asarray(rng.normal(size=4), jnp.float32)
  loss = lambda q: losses.batch_softmax_loss(q, x, temperature=0.5, log_q=lq, logq_mode="corrected")  # noqa: E731
  g = jax.grad(loss)(q)

  def row_terms(q):
    s = losses._cosine_logits(q, x, 0.5)
    z = jnp.where(jnp.eye(4, dtype=bool), -jnp.inf, s - lq[None, :])
    return jax.nn.logsumexp(z, axis=1) - jnp.diagonal(s), z, jnp.diagonal(s)

  terms, z, s_p = row_terms(q)
  w = 1 - jax.nn.sigmoid(s_p - (jax.nn.logsumexp(z, axis=1) - jnp.log(3.0)))
  expect = jax.grad(lambda q: jnp.mean(w * row_terms(q)[0]))(q)
  np.testing.assert_allclose(np.asarray(g), np.asarray(expect), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------- the step


def test_pool_log_q_of_mixed_negatives():
  c = tiny_config()
  c.loss.mixed_negatives = True
  table = np.log(np.array([0.5, 0.3, 0.2], np.float32))
  pairs = {"item_id": jnp.asarray([0, 1], jnp.int32), "log_q": jnp.asarray(table[[0, 1]])}
  items = {"item_id": jnp.asarray([2, 0, 1], jnp.int32)}
  p, it, _ = step.sampling_log_q(None, pairs, items, 0, config=c, log_q_table=table)
  expect = lambda i: np.log(2 * np.exp(table[i]) + 3 / 3)  # noqa: E731  B p_j + M / N
  np.testing.assert_allclose(np.asarray(p["log_q"]), expect([0, 1]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(it["log_q"]), expect([2, 0, 1]), rtol=1e-6)


def test_streaming_logq_and_mixed_negatives_train_and_checkpoint(tmp_path):
  c = tiny_config()
  c.ssl.alpha = 0.0  # the D_item stream serves the mixed negatives alone
  c.loss.logq_source, c.loss.mixed_negatives, c.loss.logq_mode = "streaming", True, "corrected"
  c.loss.frequency_buckets = 1000  # rounded up to the table row multiple
  c.train.num_steps, c.train.checkpoint_every, c.train.eval_every = 12, 12, 12
  run = train.Run(c)
  assert run.item_data is not None  # mixed negatives draw the item stream
  f = run.state.freq
  assert f["gap_table"].shape == (1024, c.loss.frequency_hashes)
  assert f["gap_table"].sharding.spec[0] is not None  # sharded on its buckets, like a table
  losses_ = [float(run.step()["loss/main"]) for _ in range(12)]
  assert np.isfinite(losses_).all() and np.mean(losses_[-3:]) < np.mean(losses_[:3])
  assert int(run.state.freq["last_table"].max()) == 11  # keyed by the global step
  # The estimator's state is part of the checkpoint.
  wd = str(tmp_path / "run")
  train.train_and_evaluate(c, wd)
  manager = train.checkpoint_manager(wd, c)
  restored = manager.restore(manager.latest_step(), args=run.checkpoint_args(save=False))
  freq = np.asarray(restored["state"].freq["last_table"])
  assert int(freq.max()) == 11 and (freq >= 0).sum() > 0


@pytest.mark.parametrize(
  "field,value,expect",
  [
    ("loss.logq_source", "online", "config.loss.logq_source='online' is invalid; allowed: one of"),
    ("loss.frequency_buckets", 0, "config.loss.frequency_buckets=0 is invalid"),
    ("loss.frequency_hashes", 0, "config.loss.frequency_hashes=0 is invalid"),
    ("loss.frequency_learning_rate", 0.0, "config.loss.frequency_learning_rate=0.0 is invalid"),
    ("loss.logq_mode", "exact", "config.loss.logq_mode='exact' is invalid; allowed: one of"),
  ],
)
def test_bad_negatives_config_one_line(tmp_path, capsys, field, value, expect):
  config = tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  assert cli.run_main(config, str(tmp_path / "run")) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and expect in err and "\n" not in err, err


def test_corrected_needs_logq_and_mixed_batch_divides_the_mesh(tmp_path, capsys):
  config = tiny_config()
  config.loss.logq_mode, config.loss.logq_correction = "corrected", False
  assert cli.run_main(config, str(tmp_path / "a")) == 2
  assert "config.loss.logq_mode='corrected'" in capsys.readouterr().err
  config = tiny_config()
  config.ssl.alpha, config.loss.mixed_negatives, config.ssl.batch_size = 0.0, True, 100
  assert cli.run_main(config, str(tmp_path / "b")) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: config.ssl.batch_size=100") and "\n" not in err, err


def test_negatives_config_options():
  from configs import negatives

  assert negatives.get_config("counts").loss.logq_source == "counts"
  assert negatives.get_config("streaming").loss.logq_source == "streaming"
  assert negatives.get_config("movielens.mixed").loss.mixed_negatives
  assert negatives.get_config("movielens.mixed").data.name == "movielens"
  assert negatives.get_config("corrected").loss.logq_mode == "corrected"
  with pytest.raises(ValueError, match="OPTION one of"):
    negatives.get_config("movielens.online")
