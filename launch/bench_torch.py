"""The JAX train step against a plain PyTorch two-tower of the same size, in one run.

    python launch/bench_torch.py [--variants=baseline,cfm] [--table_rows=1e6] [--threads=2]
        [--steps=8] [--repeats=5] [--out=F.json] [--config.FIELD=VALUE ...]

PyTorch is not a dependency of sslrec: ``pip install torch`` (a CPU build) first. Both sides train
on the same batches of the same data (the JAX run's grain streams, drawn before timing) with the
same schema, widths, batch sizes, losses and optimizer family, and both are timed in this process
on batches already in memory (the JAX side: ``launch/bench.py``'s device-resident step), their
repetitions interleaved, so that the ratio of each repetition pairs the two sides under the same
machine load; the record gives the median ratio and its range.

The PyTorch model (eager, ``torch.set_num_threads(--threads)``), written as a careful user would:
  * one ``nn.Embedding(sparse=True)`` per id feature, ``nn.EmbeddingBag(mode='mean',
    sparse=True, padding_idx=...)`` per multi-valued feature, ``nn.Linear`` per dense feature, a
    learned default per feature where a value is missing / a bag is empty / a view masks it;
  * ReLU MLP towers of ``model.*_hidden`` into ``model.output_dim``, L2-normalised;
  * batch softmax with logQ correction and accidental hits removed, temperature
    ``loss.temperature``;
  * CFM / RFM: the SSL items looked up once, multi-valued values dropped once, both views stacked
    through the item MLP's hidden layers and an SSL head (``ssl.encoder_sharing='all_but_last'``),
    InfoNCE at ``ssl.temperature`` weighted by ``ssl.alpha``; the masks are drawn before timing by
    sslrec's own ``augment.make_mask`` (the JAX step draws them inside the step);
  * ``torch.optim.Adagrad`` for the sparse table gradients and for the dense parameters (with
    global-norm clipping of the dense gradients at ``optimizer.grad_clip_norm``). sslrec's default
    is row-wise Adagrad on the tables (one accumulator per row), which costs less.

Records (JSON list, ``--out``): ``{"benchmark": "vs_torch", "variant", "table_rows",
"batch_size", "ssl_batch_size", "embed_dim", "jax_examples_per_sec", "torch_examples_per_sec",
"jax_vs_torch" (median of the paired repetitions' ratios), "jax_vs_torch_range", "jax_step_ms",
"torch_step_ms", "jax_params", "torch_params", "threads", "repeats", "torch_version"}``.
"""

import functools
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sslrec import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Base config.")
_VARIANTS = flags.DEFINE_list("variants", "baseline,cfm", "Variants (launch/bench.py's names).")
_ROWS = flags.DEFINE_list("table_rows", "1e6", "Item-id table sizes.")
_THREADS = flags.DEFINE_integer("threads", os.cpu_count() or 1, "PyTorch intra-op threads.")
_STEPS = flags.DEFINE_integer("steps", 8, "Distinct batches per timed repetition.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (the median is reported).")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 10_000, "data.num_items unless given as --config.")
_EMBED_DIM = flags.DEFINE_integer("embed_dim", 64, "data.embed_dim unless given as --config.")
_OUT = flags.DEFINE_string("out", None, "Write the records as JSON here.")
_SIDE = flags.DEFINE_string(
  "side", None, "Internal: serve one side's timings (VARIANT,ROWS,jax|torch)."
)

SUPPORTED = ("baseline", "rfm", "cfm")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _torch():
  try:
    import torch
  except ImportError as e:
    _fail(f"bench_torch needs PyTorch, which sslrec does not depend on ({e}): pip install torch")
  return torch


def torch_model(torch, model, config):
  """The PyTorch two-tower of sslrec's ``TwoTower`` ``model`` (its schemas and widths)."""
  nn = torch.nn

  class Input(nn.Module):
    def __init__(self, spec):
      super().__init__()
      self.spec = spec
      self.tables = nn.ModuleDict()
      for f in spec.features:
        rows = f.vocab_size  # + the OOV row (+ a padding row for bags), as sslrec's tables
        if f.kind == "id":
          self.tables[f.name] = nn.Embedding(rows + 1, f.embed_dim, sparse=True)
        elif f.kind == "multi":
          self.tables[f.name] = nn.EmbeddingBag(
            rows + 2, f.embed_dim, mode="mean", sparse=True, padding_idx=rows + 1
          )
        else:
          self.tables[f.name] = nn.Linear(f.dense_dim, f.embed_dim)
      self.defaults = nn.Parameter(torch.zeros(len(spec.features), spec.features[0].embed_dim))

    def blocks(self, batch):
      """``[B, F, d]``: every feature's embedding (its default where missing / empty)."""
      out = []
      for i, f in enumerate(self.spec.features):
        x, table = batch[f.name], self.tables[f.name]
        if f.kind == "dense":
          out.append(table(x))
          continue
        rows = table.num_embeddings - (2 if f.kind == "multi" else 1)
        valid = x >= 0
        ids = torch.where(valid, x.clamp(max=rows), rows + 1 if f.kind == "multi" else 0)
        e = table(ids)
        present = valid if f.kind == "id" else valid.any(dim=1)
        out.append(torch.where(present[:, None], e, self.defaults[i]))
      return torch.stack(out, dim=1)

  def mlp(din, hidden, dout):
    layers = []
    for h in hidden:
      layers += [nn.Linear(din, h), nn.ReLU()]
      din = h
    return nn.Sequential(*layers), nn.Linear(din, dout)

  class TwoTower(nn.Module):
    def __init__(self):
      super().__init__()
      q, i = model.query_spec, model.item_spec
      self.query_input, self.item_input = Input(q), Input(i)
      width = lambda s: sum(f.embed_dim for f in s.features)  # noqa: E731
      self.query_trunk, self.query_out = mlp(width(q), model.query_hidden, model.output_dim)
      self.item_trunk, self.item_out = mlp(width(i), model.item_hidden, model.output_dim)
      last = model.item_hidden[-1] if model.item_hidden else width(i)
      self.ssl_head = nn.Linear(last, model.output_dim)

    def tower(self, inputs, trunk, out, batch):
      x = inputs.blocks(batch).flatten(1)
      return nn.functional.normalize(out(trunk(x)), dim=1)

    def loss(self, pairs, items, mask):
      q = self.tower(self.query_input, self.query_trunk, self.query_out, pairs["query"])
      x = self.tower(self.item_input, self.item_trunk, self.item_out, pairs["item"])
      logits = q @ x.T / config.loss.temperature - pairs["log_q"][None, :]
      loss = _diagonal_ce(torch, logits, pairs["item_id"])
      if mask is None:
        return loss
      e = self.item_input.blocks(items["item"])  # [N, F, d]: one lookup, one dropout
      d = self.item_input.defaults[None]
      m = mask[None, :, None]
      views = torch.cat([torch.where(m, d, e).flatten(1), torch.where(m, e, d).flatten(1)])
      z = nn.functional.normalize(self.ssl_head(self.item_trunk(views)), dim=1)
      n = e.shape[0]
      ssl_logits = z[:n] @ z[n:].T / config.ssl.temperature
      return loss + config.ssl.alpha * _diagonal_ce(torch, ssl_logits, items["item_id"])

  return TwoTower()


def _diagonal_ce(torch, logits, ids):
  """Cross-entropy of each row against its diagonal, same-item columns off the diagonal left
  out (accidental hits)."""
  same = ids[:, None] == ids[None, :]
  same.fill_diagonal_(False)
  logits = logits.masked_fill(same, float("-inf"))
  return torch.nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]))


def torch_stepper(torch, run, *, steps: int, losses: list | None = None):
  """``(go, parameter count)``: ``go()`` runs the PyTorch step on ``steps`` batches drawn from
  ``run``'s streams (``losses``: every step's loss is appended to it)."""
  import jax
  import numpy as np

  from sslrec.model import augment

  config, model = run.config, run.model
  torch.sparse.check_sparse_tensor_invariants.disable()  # Adagrad's sparse rows: PyTorch's default
  torch.manual_seed(config.seed)
  as_tensor = lambda a: torch.from_numpy(np.array(a))  # a writable copy (device_get's is not)
  net = torch_model(torch, model, config)
  sparse = [p for m in net.modules() if getattr(m, "sparse", False) for p in m.parameters()]
  ids = {id(p) for p in sparse}
  dense = [p for p in net.parameters() if id(p) not in ids]
  lr = config.optimizer.learning_rate
  opts = [
    torch.optim.Adagrad(sparse, lr=config.optimizer.embedding_learning_rate),
    torch.optim.Adagrad(dense, lr=lr, foreach=True),
  ]
  ssl = config.ssl.alpha > 0
  rate = config.ssl.dropout_rate
  mi = jax.numpy.asarray(run.stats.mi) if ssl else None
  k = model.item_spec.num_features
  batches = []
  for s in range(steps):
    p, i = run.next_batches()
    p, i = jax.device_get(p), jax.device_get(i)
    pairs = jax.tree.map(as_tensor, p)
    items = mask = None
    if ssl:
      key = jax.random.key(s)
      mask = as_tensor(
        np.asarray(
          augment.make_mask(key, config.ssl.masking, k, mi=mi, fraction=config.ssl.mask_fraction)
        )
      )
      items = jax.tree.map(as_tensor, i)
    batches.append((pairs, items, mask))
  clip = config.optimizer.grad_clip_norm

  def step(pairs, items, mask):
    if items is not None and rate > 0:  # per-value dropout of the multi-valued features
      item = dict(items["item"])
      for f in model.item_spec.features:
        if f.kind == "multi":
          x = item[f.name]
          item[f.name] = torch.where(torch.rand(x.shape) < rate, -1, x)
      items = dict(items, item=item)
    for o in opts:
      o.zero_grad(set_to_none=True)
    loss = net.loss(pairs, items, mask)
    loss.backward()
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(dense, clip, foreach=True)
    for o in opts:
      o.step()
    return loss

  def go():
    for b in batches:
      loss = step(*b)
      if losses is not None:
        losses.append(float(loss.detach()))
    return float(loss.detach())

  return go, int(sum(p.numel() for p in net.parameters()))


def jax_stepper(run, *, steps: int):
  """``launch/bench.py``'s device-resident JAX step on ``steps`` batches of ``run``'s streams."""
  import jax

  from sslrec.experiments import bench

  batches = bench.device_batches(run, steps)
  state = run.state

  def go():
    nonlocal state
    m = None
    for p, i in batches:
      state, m = run.step_fn(state, p, i, run.step_rng)
    return jax.block_until_ready(m)

  return go


def serve_side(config, side: str, *, steps: int) -> None:
  """A worker: builds one side (``VARIANT,ROWS,jax|torch``), warms it up, prints ``ready
  PARAMS``, then times one repetition per ``go`` line read and prints its seconds."""
  import jax

  from sslrec.experiments import bench

  variant, rows, kind = side.split(",")
  run = bench.variant_run(config, variant, "sparse", int(rows))
  if kind == "jax":
    go = jax_stepper(run, steps=steps)
    params = int(sum(x.size for x in jax.tree.leaves(run.state.params)))
  else:
    torch = _torch()
    torch.set_num_threads(_THREADS.value)
    go, params = torch_stepper(torch, run, steps=steps)
  run.close_input()
  go()
  print(f"ready {params}", flush=True)
  for line in sys.stdin:
    if line.strip() != "go":
      break
    start = time.perf_counter()
    go()
    print(f"{time.perf_counter() - start}", flush=True)


def paired_times(variant: str, rows: int, repeats: int) -> tuple[list, list, int, int]:
  """Seconds per repetition of the JAX and the PyTorch side, each in its own worker process
  (``serve_side``: neither side's idle threads share a process with the other's work), the
  repetitions interleaved so that both sides of a repetition ran under the same machine load."""
  argv = [a for a in sys.argv[1:] if not a.startswith("--side")]
  workers, params = [], []
  for kind in ("jax", "torch"):  # one after the other: neither builds while the other does
    w = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), *argv, f"--side={variant},{rows},{kind}"],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    line = w.stdout.readline().split()
    if not line or line[0] != "ready":
      w.kill()
      _fail(f"the {kind} side of {variant} at {rows:,} rows did not start (its error is above)")
    workers.append(w)
    params.append(int(line[1]))
  times = [[], []]
  for _ in range(repeats):
    for t, w in zip(times, workers, strict=True):
      time.sleep(0.2)  # the other side's threads settle
      w.stdin.write("go\n")
      w.stdin.flush()
      t.append(float(w.stdout.readline()))
  for w in workers:
    w.stdin.close()
    w.wait()
  return times[0], times[1], params[0], params[1]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  for variant in _VARIANTS.value:
    if variant not in SUPPORTED:
      _fail(f"--variants: {variant!r} has no PyTorch twin; allowed: {', '.join(SUPPORTED)}")
  try:
    table_rows = [int(float(r)) for r in _ROWS.value]
  except ValueError:
    _fail(f"--table_rows={','.join(_ROWS.value)}: each must be a number of rows (1e6, 1000000)")
  if min(table_rows, default=0) < 1 or _STEPS.value < 1 or _REPEATS.value < 1 or _THREADS.value < 1:
    _fail("--table_rows, --steps, --repeats and --threads must be >= 1")
  from sslrec.experiments import bench

  given = {a.split("=")[0][len("--config.") :] for a in bench.config_args(sys.argv[1:])}
  sizes = {"data.num_items": _NUM_ITEMS.value, "data.embed_dim": _EMBED_DIM.value}
  config = bench.apply_overrides(_CONFIG.value, {k: v for k, v in sizes.items() if k not in given})
  if config.ssl.encoder_sharing != "all_but_last":
    _fail("the PyTorch twin has ssl.encoder_sharing='all_but_last' only")
  if _SIDE.value:
    serve_side(config, _SIDE.value, steps=_STEPS.value)
    return
  torch = _torch()  # here too: its absence is one line before any worker starts
  records = []
  for variant in _VARIANTS.value:
    for rows in table_rows:
      steps, repeats = _STEPS.value, _REPEATS.value
      jax_t, torch_t, jax_params, torch_params = paired_times(variant, rows, repeats)
      rc = bench.apply_overrides(config.copy_and_resolve_references(), bench.VARIANTS[variant])
      ratios = [b / a for a, b in zip(jax_t, torch_t, strict=True)]
      b = rc.train.batch_size
      jax_sec, torch_sec = statistics.median(jax_t) / steps, statistics.median(torch_t) / steps
      rec = {
        "benchmark": "vs_torch",
        "variant": variant,
        "table_rows": rows,
        "batch_size": b,
        "ssl_batch_size": rc.ssl.batch_size if rc.ssl.alpha > 0 else 0,
        "embed_dim": rc.data.embed_dim,
        "jax_examples_per_sec": b / jax_sec,
        "torch_examples_per_sec": b / torch_sec,
        "jax_vs_torch": statistics.median(ratios),
        "jax_vs_torch_range": [min(ratios), max(ratios)],
        "jax_step_ms": 1e3 * jax_sec,
        "torch_step_ms": 1e3 * torch_sec,
        "jax_params": jax_params,
        "torch_params": torch_params,
        "threads": _THREADS.value,
        "repeats": repeats,
        "torch_version": torch.__version__,
      }
      records.append(rec)
      print(
        f"{variant:9s} rows {rows:>11,}: JAX {rec['jax_step_ms']:7.2f} ms, PyTorch "
        f"{rec['torch_step_ms']:7.2f} ms per step -> JAX {rec['jax_vs_torch']:.2f}x the "
        f"examples/sec (paired repetitions {min(ratios):.2f}-{max(ratios):.2f}x; params "
        f"{jax_params:,} / {torch_params:,})",
        flush=True,
      )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(records, f, indent=1)


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config_file=True))
