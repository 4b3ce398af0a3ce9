"""launch/bench_torch.py: the plain PyTorch twin of the two-tower (PyTorch is not a dependency)."""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "bench_torch.py")


def test_without_torch_it_is_one_error_line(tmp_path):
  """Where PyTorch is not installed (a package that fails to import stands in for it here), the
  command says so in one line and exits 2, before any measurement."""
  (tmp_path / "torch").mkdir()
  (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  p = subprocess.run(
    [sys.executable, SCRIPT, "--variants=cfm"], capture_output=True, text=True, env=env, cwd=REPO
  )
  assert p.returncode == 2, p.stderr
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: bench_torch needs PyTorch"), p.stderr
  assert "pip install torch" in lines[0]


@pytest.mark.parametrize(
  "args,expect",
  [
    (["--variants=spread_out"], "'spread_out' has no PyTorch twin; allowed: baseline, rfm, cfm"),
    (["--table_rows=many"], "--table_rows=many: each must be a number of rows"),
    (["--steps=0"], "must be >= 1"),
  ],
)
def test_bad_flags_are_one_error_line(args, expect):
  p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
  assert expect in lines[0]


def test_torch_twin_has_the_models_shapes_and_trains():
  """Where PyTorch is installed: the twin's towers have sslrec's widths (every dense layer the
  same shape, every table the same width and rows up to sslrec's padding), and its steps on the
  run's own batches lower the joint loss."""
  torch = pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location("bench_torch", SCRIPT)
  bench_torch = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench_torch)
  from sslrec import train

  config = tiny_config()
  run = train.Run(config)
  net = bench_torch.torch_model(torch, run.model, run.config)
  params = jax.device_get(run.state.params)["params"]
  for tower in ("query", "item"):
    jax_mlp = params[f"{tower}_mlp"]
    torch_layers = [m for m in getattr(net, f"{tower}_trunk") if isinstance(m, torch.nn.Linear)]
    torch_layers.append(getattr(net, f"{tower}_out"))
    names = [k for k in jax_mlp if k.startswith("hidden_")] + ["out"]
    assert len(names) == len(torch_layers)
    for name, layer in zip(names, torch_layers, strict=True):
      assert tuple(layer.weight.shape[::-1]) == jax_mlp[name]["kernel"].shape
    inputs = getattr(net, f"{tower}_input")
    for f in inputs.spec.features:
      if f.kind == "dense":
        continue
      jax_rows, width = params[f"{tower}_input"][f"{f.name}_table"].shape
      torch_rows, torch_width = inputs.tables[f.name].weight.shape
      assert torch_width == width and f.vocab_size + 1 <= torch_rows <= f.vocab_size + 2
      assert jax_rows >= f.vocab_size + 1
  go, count = bench_torch.torch_stepper(torch, run, steps=4, losses=(losses := []))
  run.close_input()
  go(), go()
  assert count == sum(p.numel() for p in net.parameters())
  assert np.isfinite(losses).all() and np.mean(losses[-4:]) < np.mean(losses[:4]), losses
