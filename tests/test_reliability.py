"""Reliability: exact resume after SIGKILL, preemption signals, corrupt checkpoints, non-finite
steps, unwritable or full workdirs.

The end-to-end tests run ``launch/main.py`` as a subprocess on a small config and share one JAX
compilation cache (the first run compiles, the others load the executables), which keeps them to
seconds each. ``tests/reliability_trials.py`` runs many more kill-and-resume trials.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslrec import cli, step, train
from sslrec.data import sources
from sslrec.run import checkpointing, reliability
from sslrec.run import workdir as workdir_lib
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 24
SMALL = {
  "data.num_items": 512,
  "data.num_queries": 1000,
  "data.num_train_pairs": 4000,
  "data.num_eval_pairs": 200,
  "train.batch_size": 64,
  "ssl.batch_size": 64,
  "train.num_steps": NUM_STEPS,
  "train.log_every": 3,
  "train.checkpoint_every": 5,
  "train.eval_every": 10,
  "eval.max_queries": 200,
}
CHECKPOINT_STEPS = (5, 10, 15, 20)
TIMING = ("examples_per_sec", "steps_per_sec", "step_time_ms")  # wall-clock: may differ


def main_command(workdir, **overrides):
  args = {**SMALL, **overrides}
  return [
    sys.executable,
    "launch/main.py",
    "--config=configs/smoke.py",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in args.items()),
  ]


def main_env(cache, devices=1, **extra):
  """One CPU device: executables loaded from JAX's persistent cache can deadlock in XLA:CPU's
  in-process collectives across fake devices (seen with jax 0.10.2, unrelated to this code)."""
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
    JAX_COMPILATION_CACHE_DIR=cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  env.pop(reliability.KILL_ENV, None)
  env.update(extra)
  return env


def run_main(workdir, cache, env=None, timeout=300, **overrides):
  return subprocess.run(
    main_command(workdir, **overrides),
    cwd=REPO,
    capture_output=True,
    text=True,
    env=main_env(cache, **(env or {})),
    timeout=timeout,
  )


def logged(workdir, name):
  """The records of a .jsonl file without the wall-clock fields."""
  return [
    {k: v for k, v in r.items() if k not in TIMING}
    for r in workdir_lib.read_jsonl(os.path.join(workdir, name))
  ]


def saved_state(workdir, step):
  """The ``state`` item of a checkpoint as numpy arrays (leaves in tree order)."""
  import orbax.checkpoint as ocp

  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = ckptr.restore(path, restore_args=args)
  return jax.tree_util.tree_structure(restored), jax.tree.leaves(restored)


def assert_same_run(reference, workdir, step=NUM_STEPS):
  """Every logged line (but the wall-clock rates) and the final parameters, bitwise."""
  for name in ("metrics.jsonl", "eval.jsonl"):
    a, b = logged(reference, name), logged(workdir, name)
    first = next((x["step"] for x, y in zip(a, b) if x != y), None)
    assert a == b, f"{name} differs (first at step {first}; {len(a)} vs {len(b)} lines)"
  tree_a, leaves_a = saved_state(reference, step)
  tree_b, leaves_b = saved_state(workdir, step)
  assert tree_a == tree_b and len(leaves_a) == len(leaves_b) > 0
  for i, (x, y) in enumerate(zip(leaves_a, leaves_b)):
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), f"leaf {i}"


def files_digest(root):
  """{relative path: bytes} of every file under ``root``."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      p = os.path.join(dirpath, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
  """An uninterrupted run of the small config."""
  wd = str(tmp_path_factory.mktemp("reference") / "run")
  p = run_main(wd, cache)
  assert p.returncode == 0, p.stderr[-3000:]
  assert [r["step"] for r in logged(wd, "metrics.jsonl")] == list(range(3, NUM_STEPS + 1, 3))
  return wd


def _sigterm_after_data_is_built(wd, cache):
  """Runs main.py and sends SIGTERM once its data is built (the signal lands before or during
  the first step after the restored one); returns (returncode, stdout, stderr)."""
  proc = subprocess.Popen(
    main_command(wd),
    cwd=REPO,
    env=main_env(cache),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  head = []
  for line in proc.stdout:
    head.append(line)
    if line.startswith("data:"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  return proc.returncode, "".join(head) + out, err


def test_killed_and_preempted_run_resumes_bitwise_equal(reference, cache, tmp_path):
  """SIGKILL at a random step, SIGTERM, SIGKILL at another random step, SIGKILL during a
  checkpoint save, each followed by the same command: the run ends bitwise equal to the
  uninterrupted one (every logged value and the final parameters)."""
  rng = random.Random(20240507)
  k1, k2 = sorted(rng.sample([s for s in range(2, NUM_STEPS) if s not in CHECKPOINT_STEPS], 2))
  k3 = rng.choice([s for s in CHECKPOINT_STEPS if s > k2] or [NUM_STEPS])
  wd = str(tmp_path / "run")
  ckpts = os.path.join(wd, "checkpoints")

  p = run_main(wd, cache, env={reliability.KILL_ENV: str(k1)})
  assert p.returncode == -signal.SIGKILL, (k1, p.stderr[-3000:])

  code, out, err = _sigterm_after_data_is_built(wd, cache)
  assert code == 0, err[-3000:]
  assert "SIGTERM received" in err and "Traceback" not in err
  lines = [l for l in out.splitlines() if l.startswith("stopped at step")]
  assert len(lines) == 1, out
  stopped = int(lines[0].split()[3])
  assert stopped <= k1 + 1
  assert (
    f"checkpoint saved in {os.path.join(os.path.abspath(wd), 'checkpoints', str(stopped))}. "
    "To resume, run the same command again: python launch/main.py "
    "--config=configs/smoke.py"
  ) in lines[0]
  assert checkpointing.verify(os.path.join(ckpts, str(stopped)))[0] == "ok"

  for kill in (k2, k3):
    p = run_main(wd, cache, env={reliability.KILL_ENV: str(kill)})
    assert p.returncode == -signal.SIGKILL, (kill, p.stderr[-3000:])
  if k3 in CHECKPOINT_STEPS:  # killed while the asynchronous save of that step was in flight
    assert os.path.isdir(os.path.join(ckpts, f"{k3}{checkpointing.TMP_MARK}")), os.listdir(ckpts)
    assert not os.path.exists(os.path.join(ckpts, str(k3)))

  p = run_main(wd, cache)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resumed from checkpoint at step" in p.stdout
  assert_same_run(reference, wd)


def test_sigint_and_second_signal():
  # A shell starts background jobs with SIGINT ignored; the test needs Python's usual handler.
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _check_sigint_and_second_signal()
  finally:
    signal.signal(signal.SIGINT, outer)


def _check_sigint_and_second_signal():
  stop = reliability.StopRequest()
  try:
    assert not stop.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert stop.should_stop(2) and stop.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  finally:
    stop.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _largest_file(step_dir, item="state"):
  paths = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, item)) for n in ns]
  return max(paths, key=os.path.getsize)


def test_corrupt_checkpoints_fall_back_to_the_previous_good_one(reference, cache, tmp_path):
  wd = str(tmp_path / "run")
  shutil.copytree(reference, wd)
  ckpts = os.path.join(wd, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ckpts)) == [15, 20, 24]
  # 24: bytes changed in place (same size: only the seal's CRC sees it).
  path = _largest_file(os.path.join(ckpts, "24"))
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
  open(path, "wb").write(bytes(data))
  # 20: half-written and unsealed: its restore fails.
  os.remove(os.path.join(ckpts, "20", checkpointing.SEAL))
  path = _largest_file(os.path.join(ckpts, "20"))
  os.truncate(path, os.path.getsize(path) // 2)
  p = run_main(wd, cache)
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"checkpoint {os.path.join(ckpts, '24')} is corrupt (state/" in p.stdout
  assert "CRC mismatch" in p.stdout
  assert f"checkpoint {os.path.join(ckpts, '20')} cannot be read" in p.stdout
  assert "resumed from checkpoint at step 15" in p.stdout
  assert sorted(os.listdir(os.path.join(wd, checkpointing.BAD_DIR))) == ["20", "24"]
  assert_same_run(reference, wd)


def test_no_readable_checkpoint_is_a_clear_error_and_nothing_changes(reference, cache, tmp_path):
  wd = str(tmp_path / "run")
  shutil.copytree(reference, wd)
  for at in (15, 20, 24):
    os.truncate(_largest_file(os.path.join(wd, "checkpoints", str(at))), 10)
  before = files_digest(wd)
  p = run_main(wd, cache)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "none of the 3 checkpoints in" in errors[0], p.stderr[-2000:]
  assert "start from scratch" in errors[0]
  assert files_digest(wd) == before


def _poisoned_loss(monkeypatch, sums):
  """Makes the loss (and so every gradient) NaN on the steps whose pair batch's item ids sum to
  one of ``sums``."""
  original = step.loss_fn

  def loss_fn(params, pairs, items, views, rows=None, **kw):
    total, metrics = original(params, pairs, items, views, rows, **kw)
    poison = jnp.isin(pairs["item_id"].sum(), jnp.asarray(sums))
    total = total * jnp.where(poison, jnp.nan, 1.0)
    metrics["loss"] = total
    return total, metrics

  monkeypatch.setattr(step, "loss_fn", loss_fn)


def _small_config(**train_fields):
  c = tiny_config()
  for k, v in SMALL.items():
    section, name = k.split(".")
    c[section][name] = v
  for k, v in train_fields.items():
    c.train[k] = v
  c.mesh.shape = (1,)
  return c


class OneDeviceRun(train.Run):
  """``train.Run`` on the first device only (compiles much faster than on 8 fake devices)."""

  def __init__(self, config, devices=None, dataset=None):
    super().__init__(config, devices=jax.devices()[:1], dataset=dataset)


def test_nonfinite_loss_stops_keeps_last_checkpoint_and_writes_batch_ids(
  monkeypatch, tmp_path, capsys
):
  config = _small_config(num_steps=8, log_every=1, checkpoint_every=2)
  bad_step = 6
  ids = train.batch_ids(sources.load(config), config, bad_step)
  _poisoned_loss(monkeypatch, [int(ids["item_ids"].sum())])
  monkeypatch.setattr(train, "Run", OneDeviceRun)
  wd = str(tmp_path / "run")
  assert cli.run_main(config, wd) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith(
    f"error: non-finite loss or gradient at step {bad_step} (loss nan, loss/main "
  )
  assert "loss/ssl" in err and "grad_norm nan" in err and "checkpoint 4 is the last good one" in err
  report = json.load(open(os.path.join(wd, f"nonfinite_step_{bad_step}.json")))
  assert report["step"] == bad_step and report["metrics"]["loss"] == "nan"
  assert report["item_ids"] == ids["item_ids"].tolist()
  assert report["query_rows"] == ids["query_rows"].tolist()
  assert len(report["ssl_item_ids"]) == config.ssl.batch_size
  assert report["last_good_checkpoint"] == 4
  assert sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints"))) == [2, 4]
  assert [r["step"] for r in workdir_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))] == [
    1,
    2,
    3,
    4,
    5,
  ]


def test_skip_nonfinite_leaves_the_state_unchanged_and_counts(monkeypatch, tmp_path):
  config = _small_config(num_steps=6, log_every=3, checkpoint_every=6, skip_nonfinite=True)
  seen = {}

  class Recording(OneDeviceRun):
    # not under test: saves compiling it
    def evaluate(self, split="valid", params=None, prior_weight=None):
      return {f"recall@{k}": 0.0 for k in config.eval.ks}

    def step(self):
      before = jax.device_get(self.state)
      metrics = super().step()
      seen[int(before.step) + 1] = (
        before,
        jax.device_get(self.state),
        float(jax.device_get(metrics["loss"])),
      )
      return metrics

  config.optimizer.warmup_steps = 0  # every applied step changes the parameters
  dataset = sources.load(config)
  bad = (2, 3)
  _poisoned_loss(
    monkeypatch, [int(train.batch_ids(dataset, config, s)["item_ids"].sum()) for s in bad]
  )
  monkeypatch.setattr(train, "Run", Recording)
  wd = str(tmp_path / "run")
  train.train_and_evaluate(config, wd)
  for at, (before, after, loss) in sorted(seen.items()):
    same = [
      a.tobytes() == b.tobytes()
      for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params))
    ]
    assert int(after.step) == at
    if at in bad:
      assert np.isnan(loss) and all(same), at
      assert all(
        a.tobytes() == b.tobytes()
        for a, b in zip(jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state))
      )
    else:
      assert np.isfinite(loss) and not all(same), at
  m = workdir_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [(r["step"], r["skipped_steps"]) for r in m] == [(3, 2), (6, 2)]
  assert all(np.isfinite(r["loss"]) for r in m)  # means over the applied steps
  assert os.path.exists(os.path.join(wd, "nonfinite_step_2.json"))


def test_unwritable_workdir_is_refused_before_anything_runs(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  assert cli.run_main(tiny_config(), str(blocker / "run")) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: --workdir={blocker / 'run'} is not writable (") and "\n" not in err


def test_full_disk_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1 << 20))
  wd = tmp_path / "run"
  assert cli.run_main(tiny_config(), str(wd)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: --workdir={wd} has 0.00 GiB free") and "\n" not in err
  assert not (wd / "checkpoints").exists()


def test_free_space_against_the_checkpoint_size(tmp_path, monkeypatch):
  free = {"n": 1 << 30}
  monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=free["n"]))
  assert workdir_lib.check_free_space(str(tmp_path), 100 << 20, 3) is None
  assert "less than train.max_checkpoints + 1 = 4" in workdir_lib.check_free_space(
    str(tmp_path), 300 << 20, 3
  )
  with pytest.raises(workdir_lib.WorkdirError, match="a checkpoint of this run takes about 0.59"):
    workdir_lib.check_free_space(str(tmp_path), 600 << 20, 3)


def test_truncate_logs_drops_later_and_cut_lines(tmp_path):
  wd = str(tmp_path)
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.write('{"step": 3, "loss": 1.0}\n{"step": 6, "loss": 0.5}\n{"step": 9, "lo')
  with open(os.path.join(wd, "eval.jsonl"), "w") as f:
    f.write('{"step": 5, "recall@10": 0.1}\n')
  assert [r["step"] for r in workdir_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))] == [3, 6]
  assert workdir_lib.truncate_logs(wd, 5) == 2
  assert open(os.path.join(wd, "metrics.jsonl")).read() == '{"step": 3, "loss": 1.0}\n'
  assert workdir_lib.truncate_logs(wd, 5) == 0


def _child_pid(parent: int, marker: str) -> int:
  """The pid of the child process of ``parent`` whose command line holds ``marker`` (Linux)."""
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        args = f.read().split(b"\0")
    except OSError:
      continue
    if ppid == parent and marker.encode() in args:
      return int(entry)
  raise LookupError(f"no child of {parent} with {marker}")


@pytest.mark.skipif(
  os.environ.get("SSLREC_SLOW_TESTS") != "1",
  reason="two-process cluster (about a minute); set SSLREC_SLOW_TESTS=1",
)
def test_two_processes_agree_on_the_stop_step(cache, tmp_path):
  """SIGTERM to process 1 only: both processes save the same step and exit 0."""
  wd = str(tmp_path / "mp")
  cache = str(tmp_path / "cache")  # a cold one: see main_env
  args = [f"--workdir={wd}", "--config=configs/smoke.py"] + [
    f"--config.{k}={v}" for k, v in {**SMALL, "train.log_every": 1}.items()
  ]
  proc = subprocess.Popen(
    [
      sys.executable,
      "launch/local_cluster.py",
      "--num_processes=2",
      "--devices_per_process=4",
      "--",
      *args,
    ],
    cwd=REPO,
    env=main_env(cache, devices=4),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  out = []
  for line in proc.stdout:
    out.append(line)
    if line.startswith("[0] data:"):
      os.kill(_child_pid(proc.pid, "--process_id=1"), signal.SIGTERM)
  proc.wait(timeout=600)
  text = "".join(out)
  assert proc.returncode == 0, text[-3000:]
  stopped = [l for l in text.splitlines() if "stopped at step" in l]
  assert len(stopped) == 1 and stopped[0].startswith("[0] stopped at step"), text[-3000:]
  step = int(stopped[0].split()[4])
  assert os.listdir(os.path.join(wd, "checkpoints")) == [str(step)] or str(step) in os.listdir(
    os.path.join(wd, "checkpoints")
  )
  assert checkpointing.verify(os.path.join(wd, "checkpoints", str(step)))[0] == "ok"


def test_failed_checkpoint_save_stops_the_run_at_once(tmp_path, capsys, monkeypatch):
  """A disk that fills during a save (orbax raises a RESOURCE_EXHAUSTED ValueError; the same
  run on a real full tmpfs is in the issue's note): one error line naming the last good
  checkpoint, the run stops at that step (not a checkpoint interval later), the failed save's
  folder is gone, a rerun resumes from the named checkpoint."""
  import orbax.checkpoint as ocp

  full = ValueError("RESOURCE_EXHAUSTED: Failed writing: x: No space left [os_error_code='28']")
  real = ocp.CheckpointManager.save

  def save(self, step, *a, **k):
    if "checkpoints" in str(self.directory) and step == 4:
      raise full
    return real(self, step, *a, **k)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  config = tiny_config()
  config.train.num_steps = 8
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  wd = tmp_path / "run"
  assert cli.run_main(config, str(wd)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: saving the checkpoint of step 4") and "\n" not in err, err
  assert "(No space left on device [errno 28])" in err and "last good checkpoint is step 2" in err
  logged = [r["step"] for r in workdir_lib.read_jsonl(str(wd / "metrics.jsonl"))]
  assert max(logged) <= 5  # stopped at the failure, not at the next save
  assert not checkpointing.unfinished_saves(str(wd / "checkpoints"))
  monkeypatch.undo()
  assert cli.run_main(config, str(wd)) == 0
  assert "resumed from checkpoint at step 2" in capsys.readouterr().out
