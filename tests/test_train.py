"""End-to-end training: learning, resume equivalence, workdir safety."""

import json
import os

import numpy as np
import pytest

from sslrec import train
from sslrec.run import workdir as workdir_lib


def _metrics(wd):
  return {r["step"]: r for r in workdir_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))}


def test_short_run_learns_and_beats_popularity(config, tmp_path):
  config.train.num_steps = 300
  config.train.log_every = 50
  config.train.eval_every = 300
  config.train.checkpoint_every = 300
  wd = str(tmp_path / "run")
  result = train.train_and_evaluate(config, wd)
  m = _metrics(wd)
  assert m[300]["loss/main"] < 0.8 * m[50]["loss/main"]
  assert m[300]["loss/ssl"] < m[50]["loss/ssl"]
  assert result["recall@50"] > 1.5 * result["popularity/recall@50"]
  assert result["recall@50/tail"] > 0.1  # popularity's tail recall is 0 by construction
  assert result["popularity/recall@50/tail"] == 0.0
  # Outputs other tools read.
  evals = workdir_lib.read_jsonl(os.path.join(wd, "eval.jsonl"))
  assert evals[-1]["step"] == 300 and "recall@10/head" in evals[-1]
  assert json.load(open(os.path.join(wd, "config.json")))["ssl"]["masking"] == "cfm"
  assert os.listdir(os.path.join(wd, "tensorboard"))
  assert os.path.isdir(os.path.join(wd, "checkpoints", "300"))


def test_resume_matches_uninterrupted(config, tmp_path):
  """On the 8-device mesh, with SSL (CFM) and spread-out both on; the bitwise kill-and-resume
  trials on one device are in tests/test_reliability.py."""
  config.ssl.masking = "cfm"
  config.reg.spread_out_weight = 0.1
  config.train.num_steps = 16
  config.train.log_every = 1
  config.train.checkpoint_every = 8
  # The warmup is capped at 10% of a run (step.warmup_steps), so a run whose length changes
  # while the cap binds follows another schedule; without warmup the length changes nothing.
  config.optimizer.warmup_steps = 0
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)

  resumed = str(tmp_path / "resumed")
  config.train.num_steps = 8  # run length may change: same model, continues
  train.train_and_evaluate(config, resumed)
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["8"]
  config.train.num_steps = 16
  train.train_and_evaluate(config, resumed)

  a, b = _metrics(straight), _metrics(resumed)
  for step in range(9, 17):
    for key in ("loss", "loss/main", "loss/ssl", "grad_norm"):
      if key in a[step]:
        np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, err_msg=f"{key}@{step}")


def test_workdir_with_other_model_is_refused_and_kept(config, tmp_path):
  config.train.num_steps = 4
  config.train.log_every = 2
  wd = str(tmp_path / "run")
  train.train_and_evaluate(config, wd)
  before = {p: os.path.getmtime(os.path.join(wd, p)) for p in ("config.json", "checkpoints")}
  ckpts = sorted(os.listdir(os.path.join(wd, "checkpoints")))

  config.ssl.alpha = 0.3
  with pytest.raises(workdir_lib.WorkdirError, match=r"ssl.alpha: 1.0 -> 0.3"):
    train.train_and_evaluate(config, wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ckpts
  assert {p: os.path.getmtime(os.path.join(wd, p)) for p in before} == before
  assert json.load(open(os.path.join(wd, "config.json")))["ssl"]["alpha"] == 1.0

  # With the explicit flag the run continues with the new config; old config is kept aside.
  config.train.num_steps = 6
  train.train_and_evaluate(config, wd, allow_config_change=True)
  assert json.load(open(os.path.join(wd, "config.json")))["ssl"]["alpha"] == 0.3
  assert any(p.startswith("config.") and p != "config.json" for p in os.listdir(wd))
  assert "6" in os.listdir(os.path.join(wd, "checkpoints"))


def test_data_error_leaves_no_config_behind(config, tmp_path):
  """A run that fails on its data leaves no config.json that a corrected rerun would be held to."""
  from sslrec import cli

  config.train.num_steps = 2
  config.data.name = "movielens"
  config.data.path = str(tmp_path / "no_such_dir")
  wd = str(tmp_path / "run")
  assert cli.run_main(config, wd) == 2
  assert not os.path.exists(os.path.join(wd, "config.json"))
  os.makedirs(config.data.path)
  with open(os.path.join(config.data.path, "u.data"), "w") as f:
    f.write("1\t1\t5\t10\n")
  assert cli.run_main(config, wd) == 2  # still bad (no u.item): still nothing written
  assert not os.path.exists(os.path.join(wd, "config.json"))
