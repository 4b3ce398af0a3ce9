"""Two-tower baseline: no SSL, no regulariser."""

from configs import base


def get_config():
  c = base.get_config()
  c.ssl.alpha = 0.0
  return c
