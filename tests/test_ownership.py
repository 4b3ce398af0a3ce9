"""One owner per workdir and per export directory: a second run or export is refused in one line
naming the holder, the first is untouched; stale locks are taken over."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import tiny_config

from sslrec import cli, export, train
from sslrec.run import lock, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = """
import sys, time
from sslrec.run import lock
held = lock.acquire(sys.argv[1], "test")
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
  """Another live process holding a lock file (started as the first run would take it)."""
  procs = []

  def start(path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), ROOT]))
    p = subprocess.Popen(
      [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    procs.append(p)
    assert p.stdout.readline().strip() == "held"
    return p

  yield start
  for p in procs:
    p.kill()
    p.wait()


def _digest(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      path = os.path.join(d, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


def test_second_run_on_a_held_workdir_is_refused_in_one_line(tmp_path, holder, capsys):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "keep.txt").write_text("the other run's file")
  p = holder(wd / workdir.LOCK)
  before = _digest(wd)
  rc = cli.run_main(tiny_config(), str(wd))
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.count("\n") == 0 and err.startswith("error: ")
  assert "in use by another process" in err and f"pid {p.pid}" in err
  assert _digest(wd) == before  # nothing written: no config, no checkpoint, no log line


def test_stale_lock_is_taken_over_and_released_clean(tmp_path, capsys):
  wd = tmp_path / "run"
  wd.mkdir()
  dead = {"pid": 999999, "host": "gone", "command": "python launch/main.py", "since": "then"}
  (wd / workdir.LOCK).write_text(json.dumps(dead))
  held = workdir.hold(str(wd))
  assert "took over the stale lock of pid 999999 on gone" in capsys.readouterr().out
  assert json.loads((wd / workdir.LOCK).read_text())["pid"] == os.getpid()
  with pytest.raises(lock.Busy, match=f"pid {os.getpid()}"):  # a second holder, same host
    other = lock.acquire(str(wd / workdir.LOCK), "x")
    other.release()
  held.release()
  assert not (wd / workdir.LOCK).exists()  # a clean release leaves nothing behind
  lock.acquire(str(wd / workdir.LOCK), "x").release()


def test_a_lock_of_a_killed_process_is_free(tmp_path, holder):
  p = holder(tmp_path / "l")
  with pytest.raises(lock.Busy):
    lock.acquire(str(tmp_path / "l"), "x")
  p.kill()
  p.wait()
  held = lock.acquire(str(tmp_path / "l"), "x")  # the kernel dropped it with its process
  assert held.stale and held.stale["pid"] == p.pid
  held.release()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = tiny_config()
  config.train.num_steps = 2
  wd = str(tmp_path_factory.mktemp("own") / "run")
  train.train_and_evaluate(config, wd)
  return wd


def test_second_export_to_the_same_out_is_refused(trained, tmp_path, holder):
  out = tmp_path / "export"
  holder(tmp_path / ".export.lock")
  with pytest.raises(export.ExportError, match="in use by another process"):
    export.export(trained, str(out), log=lambda _: None)
  assert not out.exists() and sorted(os.listdir(tmp_path)) == [".export.lock"]  # the holder's


def test_export_leaves_nothing_behind_when_interrupted(trained, tmp_path):
  """SIGTERM during an export: the temporary directory is removed, ``--out`` never appears; the
  leftovers of a SIGKILLed export are removed by the next export to that ``--out``."""
  out = tmp_path / "export"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), ROOT]))
  cmd = [sys.executable, os.path.join(ROOT, "launch", "export.py"), f"--workdir={trained}"]
  for _ in range(5):  # a trial whose export finished before the signal landed proves nothing
    p = subprocess.Popen(
      [*cmd, f"--out={out}"], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any(
      n.startswith(".export.tmp-") for n in os.listdir(tmp_path)
    ):
      time.sleep(0.002)
    p.terminate()
    _, err = p.communicate(timeout=60)
    if not out.exists():
      break
    shutil.rmtree(out)  # the export was complete before the signal landed: again
  assert p.returncode != 0 and "interrupted" in err and "Traceback" not in err, err
  assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
  # A SIGKILLed export's temporary folder (no handler could run) goes with the next export.
  (tmp_path / ".export.tmp-killed").mkdir()
  (tmp_path / ".export.tmp-killed" / "item_embeddings.npy").write_bytes(b"partial")
  export.export(trained, str(out), log=lambda _: None)
  assert out.is_dir() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_resume_checks_the_checkpoints_own_config_not_only_config_json(tmp_path, capsys):
  config = tiny_config()
  config.train.num_steps = 2
  wd = tmp_path / "run"
  assert cli.run_main(config, str(wd)) == 0
  saved = json.loads((wd / "config.json").read_text())
  saved["ssl"]["alpha"] = 0.25  # edited to match the new request: config.json no longer tells
  (wd / "config.json").write_text(json.dumps(saved))
  config.ssl.alpha = 0.25
  config.train.num_steps = 4
  capsys.readouterr()
  assert cli.run_main(config, str(wd)) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "the config stored in it describes another model" in err, err
  assert "ssl.alpha: 1.0 -> 0.25" in err


def test_resume_on_changed_data_with_the_same_shapes_is_refused(tmp_path, capsys):
  """The files fixture with one country renamed: every shape is the same, the vocabulary is not
  (the rows of the country table would now mean other countries)."""
  from tests.test_files import FIXTURE, _config

  data = tmp_path / "tables"
  shutil.copytree(FIXTURE, data)
  c = _config(data)
  c.train.num_epochs = 0.0
  c.train.num_steps = 2
  c.train.batch_size = 16
  c.ssl.batch_size = 8
  c.eval.ks = (1, 5)
  c.train.select_metric = "recall@5"
  c.train.eval_every_epochs = 0.0
  c.train.eval_every = 2
  wd = tmp_path / "run"
  assert cli.run_main(c, str(wd)) == 0
  users = (data / "users.csv").read_text()
  (data / "users.csv").write_text(users.replace(",US,", ",ZZ,"))
  c.train.num_steps = 4
  capsys.readouterr()
  assert cli.run_main(c, str(wd)) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "the data changed since it was saved (vocabularies:" in err, err
