"""Bad config values stop the run before training with one clear line and a non-zero exit."""

import os
import subprocess
import sys

import pytest

from sslrec import cli, configuration
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "field,value,expect",
  [
    ("ssl.alpha", -0.1, "config.ssl.alpha=-0.1 is invalid; allowed: a number >= 0"),
    ("ssl.temperature", 0.0, "config.ssl.temperature=0.0 is invalid; allowed: a number > 0"),
    ("loss.temperature", -1.0, "config.loss.temperature=-1.0"),
    (
      "ssl.masking",
      "random",
      "config.ssl.masking='random' is invalid; allowed: one of "
      "('cfm', 'rfm', 'none', 'cfm_ids_random', 'anti_cfm', 'oracle')",
    ),
    ("ssl.mi_estimator", "exact", "config.ssl.mi_estimator='exact' is invalid; allowed: one of"),
    ("data.nuisance_values", 0, "config.data.nuisance_values=0 is invalid; allowed: an integer"),
    ("data.seed", -2, "config.data.seed=-2 is invalid; allowed: an integer in [0, 2**31), or -1"),
    (
      "ssl.dropout_rate",
      1.0,
      "config.ssl.dropout_rate=1.0 is invalid; allowed: a number in [0, 1)",
    ),
    ("ssl.item_sampling", "pop", "config.ssl.item_sampling='pop'"),
    ("optimizer.name", "sgd", "config.optimizer.name='sgd'"),
    ("eval.popularity_prior", -1.0, "config.eval.popularity_prior=-1.0 is invalid"),
    ("model.query_feature_dropout", 1.0, "config.model.query_feature_dropout=1.0 is invalid"),
    ("eval.head_fraction", 1.5, "config.eval.head_fraction=1.5"),
    ("train.num_steps", 0, "config.train.num_steps=0"),
    ("mesh.shape", (3,), "config.mesh.shape=(3,) needs 3 devices; 8 are available"),
    (
      "train.batch_size",
      100,
      "config.train.batch_size=100 is not divisible by the mesh's 'data' axis",
    ),
  ],
)
def test_invalid_values_one_clear_line(tmp_path, capsys, field, value, expect):
  config = tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  wd = tmp_path / "run"
  assert cli.run_main(config, str(wd)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and expect in err, err
  assert "\n" not in err
  assert not (wd / "checkpoints").exists()


def test_batch_larger_than_corpus(tmp_path, capsys):
  config = tiny_config()
  config.train.batch_size = 80_000
  assert cli.run_main(config, str(tmp_path / "run")) == 2
  err = capsys.readouterr().err
  assert "config.train.batch_size=80000" in err and "number of training pairs (" in err


def test_ssl_batch_larger_than_catalogue(tmp_path, capsys):
  config = tiny_config()
  config.ssl.batch_size = 4096
  assert cli.run_main(config, str(tmp_path / "run")) == 2
  assert "config.ssl.batch_size=4096" in capsys.readouterr().err


def test_missing_field_is_named():
  config = tiny_config()
  del config.ssl["alpha"]
  with pytest.raises(configuration.ConfigError, match="'ssl.alpha' is missing"):
    configuration.validate(config)


def test_diff_ignores_run_length_fields():
  a = configuration.to_dict(tiny_config())
  c = tiny_config()
  c.train.num_steps = 10_000
  c.train.eval_every = 7
  assert configuration.diff_model_fields(a, configuration.to_dict(c)) == []
  c.ssl.temperature = 0.2
  assert configuration.diff_model_fields(a, configuration.to_dict(c)) == [
    "ssl.temperature: 0.1 -> 0.2"
  ]


def _main(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "launch/main.py", "--config=configs/base.py", *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )


def test_command_line_error_exit_code_and_no_traceback(tmp_path):
  p = _main(f"--workdir={tmp_path / 'run'}", "--config.ssl.alpha=-1")
  assert p.returncode != 0
  assert "Traceback" not in p.stderr
  lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert lines == [
    "error: config.ssl.alpha=-1.0 is invalid; allowed: a number >= 0 (0 turns SSL off)"
  ]
  assert not (tmp_path / "run").exists()


def _unused_unknown_field(tmp_path):
  p = _main(f"--workdir={tmp_path / 'run'}", "--config.ssl.alhpa=0.3")
  assert p.returncode != 0
  assert "alhpa" in p.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "args,expect",
  [
    (
      ["--config.ssl.alhpa=0.3"],
      "error: --config.ssl.alhpa: no such config field (did you mean 'alpha'?)",
    ),
    (
      ["--config.sssl.alpha=1"],
      "error: --config.sssl.alpha: no such config field (did you mean 'ssl'?)",
    ),
    (
      ["--config.ssl.alpha=abc"],
      "error: --config.ssl.alpha=abc: could not convert string to float",
    ),
  ],
)
def test_command_line_bad_flags(tmp_path, args, expect):
  p = _main(f"--workdir={tmp_path / 'run'}", *args)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.startswith(expect), p.stderr
  assert not (tmp_path / "run").exists()


def test_command_line_missing_config_file(tmp_path):
  p = subprocess.run(
    [sys.executable, "launch/main.py", "--config=configs/nope.py", f"--workdir={tmp_path}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.startswith("error: --config=configs/nope.py: no such file")
