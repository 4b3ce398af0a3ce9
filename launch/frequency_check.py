"""The streaming frequency estimator against exact counts: ``python launch/frequency_check.py``.

A simulated stream of batches of item ids drawn from a Zipf distribution (exponent 1.1) over a
catalogue, whose popularity ranking is reshuffled half-way (a distribution switch). At the end of
each half, the per-pair probability of the most likely items under the *current* distribution is
compared with (a) the streaming estimate (``sslrec.frequency``) and (b) static counts of every id
seen so far (what ``loss.logq_source='counts'`` gives for a stream). Prints the median relative
error per setting (buckets, hashes, moving-average rate).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from sslrec import frequency  # noqa: E402

_ITEMS = flags.DEFINE_integer("items", 100_000, "Catalogue size.")
_BATCH = flags.DEFINE_integer("batch", 512, "Ids per step.")
_STEPS = flags.DEFINE_integer("steps", 4000, "Steps (the switch is half-way).")
_TOP = flags.DEFINE_integer("top", 1000, "The most likely items scored.")
_SETTINGS = flags.DEFINE_list(
  "settings",
  ["1048576:2:0.01", "1048576:2:0.05", "65536:1:0.05", "65536:3:0.05", "8192:3:0.05"],
  "BUCKETS:HASHES:RATE settings.",
)


def _zipf(n, perm):
  p = 1.0 / np.arange(1, n + 1) ** 1.1
  p /= p.sum()
  out = np.empty(n)
  out[perm] = p
  return out


def main(argv):
  del argv
  n, b, steps = _ITEMS.value, _BATCH.value, _STEPS.value
  rng = np.random.default_rng(0)
  dists = (_zipf(n, np.arange(n)), _zipf(n, rng.permutation(n)))
  stream = [rng.choice(n, b, p=dists[int(t >= steps // 2)]).astype(np.int32) for t in range(steps)]
  print(
    f"{n:,} items, batch {b}, {steps} steps, ranking reshuffled at step {steps // 2}; median "
    f"relative error of the per-pair probability of the {_TOP.value} most likely items"
  )
  print("\n| estimator | buckets | hashes | rate | before the switch | after | ms / update |")
  print("|---|---|---|---|---|---|---|")
  ends = (steps // 2 - 1, steps - 1)
  counts = np.zeros(n)
  static = []
  for t, ids in enumerate(stream):
    np.add.at(counts, ids, 1)
    if t in ends:
      top = np.argsort(-dists[int(t >= steps // 2)])[: _TOP.value]
      p = dists[int(t >= steps // 2)][top]
      static.append(np.median(np.abs(counts[top] / counts.sum() - p) / p))
  print(f"| static counts | - | - | - | {static[0]:.3f} | {static[1]:.3f} | - |")
  for setting in _SETTINGS.value:
    buckets, hashes, rate = setting.split(":")
    buckets, hashes, rate = int(buckets), int(hashes), float(rate)
    fn = jax.jit(
      lambda s, ids, t, r=rate: frequency.update(s, ids, t, learning_rate=r), donate_argnums=0
    )
    state = frequency.init(buckets, hashes)
    errs = []
    t0 = None
    for t, ids in enumerate(stream):
      if t == 1:
        jax.block_until_ready(state)
        t0 = time.perf_counter()
      state = fn(state, jnp.asarray(ids), t)
      if t in ends:
        dist = dists[int(t >= steps // 2)]
        top = np.argsort(-dist)[: _TOP.value]
        est = np.asarray(frequency.estimate(state, jnp.asarray(top, jnp.int32))) / b
        errs.append(np.median(np.abs(est - dist[top]) / dist[top]))
    jax.block_until_ready(state)
    ms = (time.perf_counter() - t0) / (steps - 1) * 1e3
    row = f"| streaming | {buckets:,} | {hashes} | {rate} | {errs[0]:.3f} | {errs[1]:.3f}"
    print(f"{row} | {ms:.2f} |")


if __name__ == "__main__":
  app.run(main)
