"""Does the masking strategy matter? The embedded mechanism dataset (src/sslrec/data/mechanism.py).

    python launch/sweep.py --spec=configs/mechanism.py --workdir=runs/mechanism
    python launch/summarize.py --workdir=runs/mechanism --reference=none

``configs/mechanism.py:MASKING`` is SSL with that masking (``oracle``, ``cfm``, ``rfm``,
``anti_cfm``, ``none``; ``baseline``: no SSL) on the mechanism data: two groups of four item
features sharing one relevance latent, a private nuisance per group copied into its features, tail
items with values of their own. ``data.seed=-1``: each sweep seed is also a data seed, so the
variants are paired on five generated datasets. The grid's ``data.nuisance_values`` is the
nuisance strength: 1 = none (CFM has nothing to close), 64.
"""

from configs import base

MASKINGS = ("oracle", "cfm", "rfm", "anti_cfm", "none")
VARIANTS = ("baseline", *MASKINGS)


def get_config(variant: str = "cfm"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/mechanism.py:{variant}: unknown variant; one of {VARIANTS}")
  c = base.get_config()
  c.data.name = "mechanism"
  c.data.seed = -1  # the data follows seed: paired data seeds
  c.data.num_items = 8000
  c.data.num_queries = 20_000
  c.data.num_train_pairs = 200_000
  c.data.num_eval_pairs = 10_000
  c.data.feature_noise = 0.2
  c.data.nuisance_values = 64
  c.train.num_steps = 1000  # validation is level from step 500 on
  c.train.eval_every = 250
  c.train.checkpoint_every = 1000
  c.eval.references = ("popularity",)  # no histories here: itemknn would equal popularity
  if variant == "baseline":
    c.ssl.alpha = 0.0
  else:
    c.ssl.masking = variant
    c.ssl.dropout_rate = 0.0  # single-valued features only: the views differ by the mask alone
  return c


def get_sweep():
  """Read by ``launch/sweep.py --spec=configs/mechanism.py``; flags given there replace these."""
  return {
    "variants": VARIANTS,
    "grid": {"data.nuisance_values": (1, 64)},
    "seeds": 5,
  }
