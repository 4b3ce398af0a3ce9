"""launch/sweep.py: run directories, skip / resume on re-run, results tables, failures, bad input.

Real runs are smoke-size with 5 steps and no SSL branch (cheaper to compile); the report's
arithmetic and plots are checked on fabricated finished runs (no training).
"""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from sslrec.experiments import execute, plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
  "--config.train.num_steps=5",
  "--config.train.log_every=5",
  "--config.ssl.alpha=0",
  "--config.train.checkpoint_every=4",
  "--config.data.num_items=500",
  "--config.data.num_queries=1000",
  "--config.data.num_train_pairs=5000",
  "--config.data.num_eval_pairs=300",
  "--config.train.batch_size=64",
  "--config.ssl.batch_size=64",
]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device: the runs compile faster
  return env


def _sweep(*args, timeout=240):
  return subprocess.run(
    [sys.executable, "launch/sweep.py", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=_env(),
    timeout=timeout,
  )


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  wd = tmp_path_factory.mktemp("sweep")
  p = _sweep(
    "--config=configs/smoke.py",
    f"--workdir={wd}",
    "--grid",
    "loss.temperature=0.05,0.1",
    "--seeds=2",
    "--parallel=2",
    "--plots=false",
    *TINY,
  )
  return wd, p


NAMES = [f"smoke__loss.temperature={t}__seed={s}" for t in ("0.05", "0.1") for s in (0, 1)]


def test_sweep_runs_every_point_in_its_own_directory(tiny_sweep):
  wd, p = tiny_sweep
  assert p.returncode == 0, p.stdout + p.stderr
  assert sorted(os.listdir(wd / "runs")) == sorted(NAMES)
  for name in NAMES:
    rd = wd / "runs" / name
    log = (rd / "log.txt").read_text()
    assert log.startswith("$ ") and "-m sslrec.commands.train" in log.splitlines()[0]
    assert json.loads((rd / "config.json").read_text())["loss"]["temperature"] == float(
      name.split("temperature=")[1].split("__")[0]
    )
    assert (rd / "eval.jsonl").exists()
  assert "4/4 done, 0 running, 0 left, 0 failed" in p.stdout
  first_done = next(ln for ln in p.stdout.splitlines() if ln.startswith("done "))
  assert ", eta " in first_done  # runs left after the first: their time at its duration


def test_results_tables(tiny_sweep):
  wd, _ = tiny_sweep
  rows = _read_csv(wd / "results.csv")
  assert [r["run"] for r in rows] == NAMES
  assert all(r["status"] == "ok" and r["step"] == "5" for r in rows)
  summary = _read_csv(wd / "summary.csv")
  assert [(s["variant"], s["loss.temperature"], s["n"]) for s in summary] == [
    ("smoke", "0.05", "2"),
    ("smoke", "0.1", "2"),
  ]
  for s in summary:
    xs = [
      float(r["recall@50/tail"]) for r in rows if r["loss.temperature"] == s["loss.temperature"]
    ]
    mean = sum(xs) / 2
    assert float(s["recall@50/tail_mean"]) == pytest.approx(mean, abs=1e-6)
    assert float(s["recall@50/tail_std"]) == pytest.approx(
      math.sqrt(sum((x - mean) ** 2 for x in xs)), abs=1e-6
    )
  md = (wd / "results.md").read_text()
  assert "| variant | loss.temperature | n | R@10 | R@10/head | R@10/tail | R@50 |" in md
  assert "4 runs: 4 finished, 0 failed" in md
  assert " ± " in md


def test_rerun_skips_finished_and_resumes_interrupted(tiny_sweep):
  wd, _ = tiny_sweep
  # Interrupt one run before its last checkpoint: drop that checkpoint and the final evaluation.
  victim = wd / "runs" / NAMES[3]
  shutil.rmtree(victim / "checkpoints" / "5")
  (victim / "eval.jsonl").write_text("")
  p = _sweep(
    "--config=configs/smoke.py",
    f"--workdir={wd}",
    "--grid",
    "loss.temperature=0.05,0.1",
    "--seeds=2",
    "--plots=false",
    *TINY,
  )
  assert p.returncode == 0, p.stdout + p.stderr
  assert "(3 already finished, 1 to run" in p.stdout
  assert [ln for ln in p.stdout.splitlines() if ln.startswith("start")] == [
    f"start  {NAMES[3]} | 3/4 done, 1 running, 0 left, 0 failed, 0m00s"
  ]
  assert "resumed from checkpoint at step 4" in (victim / "log.txt").read_text()
  lines = [json.loads(line) for line in (victim / "eval.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in lines] == [(5, "valid"), (5, "test")]


def test_failed_run_is_reported_and_others_finish(tmp_path):
  # 100000 pairs per batch passes config validation but not the data check inside the run.
  p = _sweep(
    "--config=configs/smoke.py",
    f"--workdir={tmp_path}",
    "--grid",
    "train.batch_size=64,100000",
    "--parallel=2",
    "--plots=false",
    *[a for a in TINY if "train.batch_size" not in a],
  )
  assert p.returncode == 1, p.stdout + p.stderr
  assert "FAILED smoke__train.batch_size=100000__seed=0 (exit 2): error: " in p.stdout
  rows = {r["train.batch_size"]: r for r in _read_csv(tmp_path / "results.csv")}
  assert rows["64"]["status"] == "ok" and rows["64"]["recall@50"]
  assert rows["100000"]["status"] == "failed" and not rows["100000"]["recall@50"]
  assert "config.train.batch_size=100000" in rows["100000"]["error"]
  md = (tmp_path / "results.md").read_text()
  assert "1 failed" in md and "## Failed runs" in md and "config.train.batch_size=100000" in md


@pytest.mark.parametrize(
  "args,expect",
  [
    (
      ["--grid", "ssl.alhpa=0,1"],
      "error: --grid ssl.alhpa: no such config field 'ssl.alhpa' (did you mean 'ssl.alpha'?)",
    ),
    (
      ["--grid", "ssl.alpha=0,abc"],
      "error: --grid ssl.alpha=abc: could not convert string to float: 'abc'",
    ),
    (["--grid", "train.num_steps=5.5"], "error: --grid train.num_steps=5.5: invalid literal"),
    (
      ["--grid", "ssl.masking=rfm,random"],
      "error: --grid ssl.masking=random (configs/smoke.py): "
      "config.ssl.masking='random' is invalid; allowed: one of",
    ),
    (["--grid", "ssl.alpha="], "error: --grid ssl.alpha=: empty value list"),
    ([], "error: empty grid: nothing to sweep"),
    (
      ["--variants=configs/smoke.py,configs/nope.py", "--grid", "ssl.alpha=0"],
      "error: variant configs/nope.py: no such config file",
    ),
    (
      ["--grid", "ssl.alpha=0,1", "--config.ssl.alhpa=1"],
      "error: --config.ssl.alhpa: no such config field",
    ),
  ],
)
def test_bad_input_one_line_before_any_run(tmp_path, args, expect):
  wd = tmp_path / "sweep"
  if not any(a.startswith("--variants") for a in args):
    args = ["--config=configs/smoke.py", *args]
  p = _sweep(f"--workdir={wd}", *args, timeout=60)
  assert p.returncode == 2, p.stdout + p.stderr
  assert "Traceback" not in p.stderr
  assert p.stderr.strip().splitlines() == [p.stderr.strip()]
  assert p.stderr.startswith(expect), p.stderr
  assert not wd.exists()


def test_run_names_are_readable_safe_and_order_free():
  assert (
    plan.run_name("rfm", [("ssl.temperature", 0.05), ("ssl.alpha", 0.1)], 2)
    == "rfm__ssl.alpha=0.1__ssl.temperature=0.05__seed=2"
  )
  odd = plan.run_name("x", [("data.path", "/tmp/a b")], 0)
  assert odd.startswith("x__data.path=_tmp_a_b__seed=0-") and "/" not in odd
  assert odd != plan.run_name("x", [("data.path", "/tmp/a_b")], 0)
  assert plan.split_values("0,(64,32),'a,b'") == ["0", "(64,32)", "'a,b'"]


def _fabricate(wd, seeds=2):
  """A planned sweep whose runs look finished, with known tail Recall@50 values."""
  s = plan.plan(
    variants=["configs/baseline.py", "configs/cfm.py"],
    grid=["ssl.alpha=0.1,1.0", "ssl.temperature=0.05,0.2", "data.train_fraction=1.0,0.1"],
    seeds=seeds,
    overrides=["--config.train.num_steps=7"],
  )
  for i, run in enumerate(s.runs):
    rd = plan.run_dir(str(wd), run)
    os.makedirs(rd)
    rec = {"step": 7, "split": "test", "selected_step": 7}
    for k in (10, 50, 100):
      for part in ("", "/head", "/tail"):
        rec[f"recall@{k}{part}"] = 0.01 * (i % 7) + k / 1000
    for d in range(10):
      rec[f"recall@100/decile_{d}"] = 0.5 / (d + 1)
    with open(os.path.join(rd, "eval.jsonl"), "w") as f:
      f.write(json.dumps({"step": 3, "split": "valid", "recall@50": 0.0}) + "\n")
      f.write(json.dumps(rec) + "\n")
    with open(os.path.join(rd, "metrics.jsonl"), "w") as f:
      for step in (3, 7):
        f.write(json.dumps({"step": step, "loss": 5.0 - step / 10}) + "\n")
  return s


def test_report_mean_and_std_over_seeds(tmp_path):
  s = _fabricate(tmp_path, seeds=3)
  out = execute.write_results(s, str(tmp_path), draw=False)
  assert len(out["summary"]) == 16
  first = out["summary"][0]
  xs = [0.01 * (i % 7) + 0.05 for i in range(3)]  # the first point's three seeds
  assert first["n"] == 3 and first["seeds"] == [0, 1, 2]
  assert first["mean"]["recall@50/tail"] == pytest.approx(sum(xs) / 3)
  assert first["std"]["recall@50/tail"] == pytest.approx(0.01)  # sample std of 0, .01, .02
  md = (tmp_path / "results.md").read_text()
  assert "| baseline | 0.1 | 0.05 | 1.0 | 3 | 0.0200 ± 0.0100 |" in md


def test_plots(tmp_path):
  pytest.importorskip("matplotlib")
  s = _fabricate(tmp_path)
  out = execute.write_results(s, str(tmp_path))
  from PIL import Image

  names = sorted(os.path.basename(p) for p in out["plots"])
  assert names == [
    "heatmap_alpha_tau.png",
    "learning_curves.png",
    "paired_differences.png",
    "recall_by_decile.png",
    "recall_head_tail.png",
    "recall_vs_train_fraction.png",
  ]
  for p in out["plots"]:
    assert os.path.getsize(p) > 1000
    with Image.open(p) as im:
      assert round(im.info["dpi"][0]) == 150, p
  md = (tmp_path / "results.md").read_text()
  assert "recall_head_tail.png" in md and "paired_differences.png" in md


def test_points_that_cannot_differ_run_once(tmp_path):
  """ssl.temperature does nothing at ssl.alpha=0: one run per seed there, shared with a note."""
  s = plan.plan(
    variants=["configs/smoke.py"],
    grid=["ssl.alpha=0,0.5", "ssl.temperature=0.05,0.2"],
    seeds=2,
  )
  assert len(s.runs) == 8
  shared = [r for r in s.runs if r.same_as is not None]
  assert len(shared) == 2  # alpha=0, tau=0.2, seeds 0 and 1
  for r in shared:
    (twin,) = [x for x in s.runs if x.name == r.same_as]
    assert dict(r.values)["ssl.alpha"] == 0 and twin.seed == r.seed
    assert dict(twin.values)["ssl.temperature"] == 0.05
    assert plan.run_dir("W", r) == plan.run_dir("W", twin)
  assert len(s.notes) == 1 and "ssl.temperature" in s.notes[0] and "ssl.alpha=0" in s.notes[0]
  alone = plan.plan(variants=["configs/smoke.py"], grid=["ssl.temperature=0.05,0.2"])
  assert all(r.same_as is None for r in alone.runs)  # alpha=1 (smoke's): every point runs
  named = plan.plan(variants=["smoke", "cfm"], grid=["ssl.temperature=0.05,0.2"])
  assert [v.label for v in named.variants] == ["smoke", "cfm"]


def test_ctrl_c_lets_the_running_run_save_then_stops(tmp_path):
  """A terminal Ctrl-C signals the sweep's whole process group: the run (in a session of its own)
  receives exactly one SIGTERM from the sweep, saves a checkpoint and stops; a re-run resumes."""
  import signal
  import time

  wd = tmp_path / "sweep"
  args = [
    "--config=configs/smoke.py",
    f"--workdir={wd}",
    "--grid",
    "loss.temperature=0.1",
    "--plots=false",
    *[a for a in TINY if "num_steps" not in a and "checkpoint_every" not in a],
    "--config.train.num_steps=100000",
    "--config.train.checkpoint_every=100000",
  ]
  p = subprocess.Popen(
    [sys.executable, "launch/sweep.py", *args],
    cwd=REPO,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  log = wd / "runs" / "smoke__loss.temperature=0.1__seed=0" / "log.txt"
  deadline = time.time() + 180
  while time.time() < deadline and "step 5/" not in (log.read_text() if log.exists() else ""):
    time.sleep(0.5)
  os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
  out, _ = p.communicate(timeout=240)
  assert p.returncode == 130, out
  text = log.read_text()
  assert "stopped at step" in text and "checkpoint saved in" in text, text[-2000:]
  assert text.count("received") == 1 and "Traceback" not in text  # one signal, not two
  assert "asking 1 running runs to save a checkpoint and stop" in out


def test_spec_that_cannot_load_is_one_line(tmp_path):
  for text, expect in [
    ("def get_sweep(:\n  return 1\n", ":1: syntax error"),
    ("import nope_module\n", "cannot load it (ModuleNotFoundError"),
    ("def get_sweep():\n  return [1]\n", "get_sweep() failed (TypeError: it returned a list"),
    ("def get_sweep():\n  return {'grid': 3}\n", "its 'grid' is not a dict"),
  ]:
    spec = tmp_path / "spec.py"
    spec.write_text(text)
    with pytest.raises(plan.SweepError, match=None) as e:
      plan.load_spec(str(spec))
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
