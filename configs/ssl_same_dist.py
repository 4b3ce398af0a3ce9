"""SSL (CFM) with SSL items drawn from D_train's item marginal instead of uniformly (ablation)."""

from configs import base


def get_config():
  c = base.get_config()
  c.ssl.item_sampling = "train"
  return c
