"""Baseline + spread-out regularisation on D_item embeddings (the paper's baseline to beat)."""

from configs import base


def get_config():
  c = base.get_config()
  c.ssl.alpha = 0.0
  c.reg.spread_out_weight = 1.0
  return c
