"""SSL with Correlated Feature Masking (same as base, named for sweeps)."""

from configs import base


def get_config():
  c = base.get_config()
  c.ssl.masking = "cfm"
  return c
