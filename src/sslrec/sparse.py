"""Sparse (row-wise) embedding updates: touch only the rows a batch uses.

With a dense optimizer every step reads and writes every row of every table (and its optimizer
state), so the step slows down in proportion to the vocabulary. The sparse path instead:

  1. collects, per table, the row ids the step's batches look up and deduplicates them to a
     static-size set ``uniq [U]`` (``U`` = number of id slots in the batches; unused slots hold an
     out-of-range fill id);
  2. gathers those rows ``rows = table[uniq]  [U, D]`` and rewrites the batches' ids to positions
     in ``uniq``, so the model runs on the small gathered table;
  3. differentiates with respect to the gathered rows (duplicates in the batch sum up, as in the
     dense gradient);
  4. applies a row-wise optimizer to those rows and their optimizer state only, and scatters them
     back in place (the train state is donated, so XLA updates the buffers in place).

Step cost is then O(U * D), independent of the number of rows. Untouched rows and their optimizer
state stay bit-identical.

Tables with fewer than ``optimizer.sparse_min_rows`` rows stay with the dense parameters and their
optax optimizer: a batch touches most of a small table anyway, and deduplicating ids costs a sort.

Optimizers (``optimizer.embedding_optimizer``):
  * ``rowwise_adagrad`` (TPU embedding / FBGEMM style): one accumulator per row,
        acc_r += mean_d(g_rd^2);   w_r -= lr * g_r / (sqrt(acc_r) + eps)
  * ``lazy_adam``: Adam moments per element, updated only for touched rows; bias correction
        uses the global step count (as TF's LazyAdam).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
OPTIMIZERS = ("rowwise_adagrad", "lazy_adam")


def dedupe(ids: Sequence[Array], num_rows: int) -> tuple[Array, list[Array]]:
  """Deduplicates the (>= 0) ids of several arrays that index one table.

  Args:
    ids: int arrays of any shapes; ``-1`` = padding (ignored).
    num_rows: the table's row count; used as the fill id of unused slots (out of range).

  Returns:
    ``(uniq [U], local)``: ``uniq`` sorted unique ids followed by ``num_rows`` fill values
    (``U`` = total number of entries, static); ``local[i]`` has the shape of ``ids[i]`` and holds
    each id's position in ``uniq`` (``-1`` where the id was ``-1``).
  """
  flat = jnp.concatenate([x.reshape(-1) for x in ids]).astype(jnp.int32)
  fill = jnp.int32(num_rows)
  uniq = jnp.unique(jnp.where(flat >= 0, flat, fill), size=flat.shape[0], fill_value=fill)
  local = [jnp.where(x >= 0, jnp.searchsorted(uniq, x).astype(jnp.int32), -1) for x in ids]
  return uniq, local


def gather_rows(table: Array, uniq: Array) -> Array:
  """``table[uniq]`` with zeros for fill ids: ``[U, D]``."""
  return table.at[uniq].get(mode="fill", fill_value=0)


def scatter_rows(table: Array, uniq: Array, rows: Array) -> Array:
  """Writes ``rows`` back at ``uniq``; fill ids are dropped."""
  return table.at[uniq].set(rows.astype(table.dtype), mode="drop")


@dataclasses.dataclass(frozen=True)
class RowwiseAdagrad:
  learning_rate: float
  min_rows: int = 0  # tables with fewer rows stay on the dense optimizer
  initial_accumulator_value: float = 0.1
  eps: float = 1e-8

  def init(self, table: Array) -> dict:
    return {"acc": jnp.full(table.shape[:1], self.initial_accumulator_value, jnp.float32)}

  def update(self, table: Array, state: dict, uniq: Array, grads: Array, count: Array
             ) -> tuple[Array, dict]:
    """Updates the rows ``uniq`` of ``table`` with their gradients ``grads [U, D]``."""
    del count
    acc = state["acc"].at[uniq].get(mode="fill", fill_value=1.0)
    g = grads.astype(jnp.float32)
    acc = acc + jnp.mean(g * g, axis=-1)
    rows = gather_rows(table, uniq).astype(jnp.float32)
    rows = rows - self.learning_rate * g / (jnp.sqrt(acc)[:, None] + self.eps)
    return (scatter_rows(table, uniq, rows),
            {"acc": state["acc"].at[uniq].set(acc, mode="drop")})


@dataclasses.dataclass(frozen=True)
class LazyAdam:
  learning_rate: float
  min_rows: int = 0  # tables with fewer rows stay on the dense optimizer
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def init(self, table: Array) -> dict:
    return {"mu": jnp.zeros(table.shape, jnp.float32), "nu": jnp.zeros(table.shape, jnp.float32)}

  def update(self, table: Array, state: dict, uniq: Array, grads: Array, count: Array
             ) -> tuple[Array, dict]:
    g = grads.astype(jnp.float32)
    mu = self.b1 * state["mu"].at[uniq].get(mode="fill", fill_value=0) + (1 - self.b1) * g
    nu = self.b2 * state["nu"].at[uniq].get(mode="fill", fill_value=0) + (1 - self.b2) * g * g
    t = count.astype(jnp.float32) + 1.0
    mu_hat = mu / (1 - self.b1 ** t)
    nu_hat = nu / (1 - self.b2 ** t)
    rows = gather_rows(table, uniq).astype(jnp.float32)
    rows = rows - self.learning_rate * mu_hat / (jnp.sqrt(nu_hat) + self.eps)
    return (scatter_rows(table, uniq, rows),
            {"mu": state["mu"].at[uniq].set(mu, mode="drop"),
             "nu": state["nu"].at[uniq].set(nu, mode="drop")})


def make_optimizer(name: str, learning_rate: float, min_rows: int = 0):
  if name == "rowwise_adagrad":
    return RowwiseAdagrad(learning_rate, min_rows=min_rows)
  if name == "lazy_adam":
    return LazyAdam(learning_rate, min_rows=min_rows)
  raise ValueError(f"embedding optimizer {name!r}; allowed: {OPTIMIZERS}")


def dense_rowwise_adagrad_reference(table, acc, grads_full, learning_rate, eps=1e-8):
  """Row-wise Adagrad over *every* row with the full gradient (the dense reference the sparse path
  must reproduce on touched rows). Rows with zero gradient keep their value but, unlike the sparse
  path, are still rewritten."""
  acc = acc + jnp.mean(grads_full * grads_full, axis=-1)
  return table - learning_rate * grads_full / (jnp.sqrt(acc)[:, None] + eps), acc
