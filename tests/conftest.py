"""Test setup: 8 fake CPU devices (set before jax is imported) and small configs."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from configs import smoke  # noqa: E402


def tiny_config():
  """A smoke-size config (configs/smoke.py): trains in seconds on 2 CPU cores."""
  return smoke.get_config()


@pytest.fixture
def config():
  return tiny_config()
