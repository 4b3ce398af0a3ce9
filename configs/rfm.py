"""SSL with Random Feature Masking."""

from configs import base


def get_config():
  c = base.get_config()
  c.ssl.masking = "rfm"
  return c
