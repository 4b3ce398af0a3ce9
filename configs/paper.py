"""The paper's comparison as a sweep: seven variants x train_fraction {1.0, 0.1} x 3 seeds.

    python launch/sweep.py --spec=configs/paper.py --workdir=runs/paper

One variant alone: ``python launch/main.py --config=configs/paper.py:ssl_rfm --workdir=...``.
The variants (Yao et al. 2021, tables 2-5), each built from the existing variant configs:

  baseline            two-tower, batch softmax + logQ, no regulariser  (configs/baseline.py)
  spread_out          baseline + spread-out regulariser on D_item      (configs/spread_out.py)
  ssl_rfm             + SSL, Random Feature Masking                    (configs/rfm.py)
  ssl_cfm             + SSL, Correlated Feature Masking                (configs/cfm.py)
  ssl_cfm_no_dropout  SSL-CFM without multi-value dropout (ablation)
  ssl_cfm_train_items SSL-CFM with SSL items drawn from D_train (ablation; configs/ssl_same_dist.py)
  ssl_cfm_ids_random  SSL-CFM with item_id out of the MI ranking (docs/method.md; not in the paper)
"""

from configs import baseline, cfm, rfm, spread_out, ssl_same_dist

VARIANTS = {
  "baseline": baseline.get_config,
  "spread_out": spread_out.get_config,
  "ssl_rfm": rfm.get_config,
  "ssl_cfm": cfm.get_config,
  "ssl_cfm_no_dropout": cfm.get_config,
  "ssl_cfm_train_items": ssl_same_dist.get_config,
  "ssl_cfm_ids_random": cfm.get_config,
}


def get_config(variant: str = "ssl_cfm"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/paper.py:{variant}: unknown variant; one of {list(VARIANTS)}")
  c = VARIANTS[variant]()
  if variant == "ssl_cfm_no_dropout":
    c.ssl.dropout_rate = 0.0
  if variant == "ssl_cfm_ids_random":
    c.ssl.masking = "cfm_ids_random"
  return c


def get_sweep():
  """Read by ``launch/sweep.py --spec=configs/paper.py``; flags given there replace these."""
  return {
    "variants": tuple(VARIANTS),  # arguments of get_config above
    "grid": {"data.train_fraction": (1.0, 0.1)},
    "seeds": 3,
  }
