"""launch/tune.py: the search reads validation lines only, results come from test lines over
paired seeds, resume, failed trials, bad input.

One real tuning (2 tiny variants x 2 trials, 2 seeds, 20 steps, no SSL branch) checks the whole
path through launch/main.py; the search logic (selection, failures, resume, reproducibility) runs
on a fake main.py that writes eval.jsonl in milliseconds.
"""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("optuna")

from sslrec.experiments import report, tune  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "launch", "main.py")


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device: the runs compile faster
  return env


def _write(path, text):
  path.write_text(textwrap.dedent(text))
  return str(path)


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _tune(spec, workdir, main=MAIN, **kw):
  out, err = io.StringIO(), io.StringIO()
  rc = tune.run_command(
    spec=spec,
    workdir=str(workdir),
    main_script=main,
    out=out,
    err=err,
    env=kw.pop("env", _env()),
    **kw,
  )
  return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------
# Reading a run: only validation lines choose; the test line is the result.


def _eval_lines(rd, lines):
  os.makedirs(rd, exist_ok=True)
  with open(os.path.join(rd, "eval.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in lines))


def test_best_valid_reads_only_validation_lines(tmp_path):
  _eval_lines(
    tmp_path,
    [
      {"step": 10, "split": "valid", "recall@50": 0.1, "ndcg@50": 0.9},
      {"step": 20, "split": "valid", "recall@50": 0.3},
      {"step": 30, "split": "valid", "recall@50": float("nan")},
      {"step": 30, "recall@50": 0.95},  # unlabelled: not a validation line
      {"step": 30, "split": "test", "selected_step": 20, "recall@50": 0.99},
    ],
  )
  records = tune.read_evals(str(tmp_path))
  assert tune.best_valid(records, "recall@50") == (0.3, 20)
  assert tune.best_valid(records, "map@10") is None
  assert tune.test_record(records)["recall@50"] == 0.99
  assert tune.read_evals(str(tmp_path / "absent")) == []


def test_paired_interval():
  mean, ci = report.t_interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2 dof) = 4.3027
  assert mean == 2.0 and ci == pytest.approx((2 - 4.302653 / 3**0.5, 2 + 4.302653 / 3**0.5))
  assert report.t_interval([0.25]) == (0.25, None)
  assert tune._interval_cell(0.25, None) == "+0.2500 [n/a]"


# A fake main.py: valid recall@50 peaks at learning_rate 0.1; the test line says the opposite (the
# search must not see it); learning_rate > FAIL_ABOVE fails like a real run (an error: line, 2).
FAKE_MAIN = """
import json, math, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
wd = args["workdir"]
os.makedirs(wd, exist_ok=True)
with open(os.environ["CALLS"], "a") as f:
  f.write(wd + "\\n")
lr = float(args.get("config.optimizer.learning_rate", 0.2))
seed = int(args.get("config.seed", 0))
if lr > float(os.environ.get("FAIL_ABOVE", "1e9")):
  print("error: fake failure: learning rate too high", file=sys.stderr)
  sys.exit(2)
v = 0.5 - abs(math.log(lr / 0.1)) / 10 + 0.01 * seed
rec = lambda split, x, **kw: {"step": 20, "split": split, **kw, "recall@50": x,
    "recall@50/head": x, "recall@50/tail": x / 2, "ndcg@50": x / 3, "popularity/recall@50": 0.2,
    "popularity/recall@50/head": 0.4, "popularity/recall@50/tail": 0.0, "popularity/ndcg@50": 0.1}
with open(os.path.join(wd, "eval.jsonl"), "a") as f:
  f.write(json.dumps(dict(rec("valid", v - 0.1), step=10)) + "\\n")
  f.write(json.dumps(rec("valid", v)) + "\\n")
  f.write(json.dumps(rec("test", 1.0 - v, selected_step=20)) + "\\n")
"""

FAKE_SPEC = """
def get_tuning():
  return {{"variants": {{"a": "configs/smoke.py", "b": "configs/baseline.py"}},
          "space": {{"optimizer.learning_rate": ("log", 0.01, 1.0),
                    "loss.temperature": ("log", 0.02, 0.3)}},
          "trials": {trials}, "seeds": 2, "startup_trials": 2}}
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
  main = _write(tmp_path / "fake_main.py", FAKE_MAIN)
  spec = _write(tmp_path / "spec.py", FAKE_SPEC.format(trials=4))
  monkeypatch.setenv("CALLS", str(tmp_path / "calls.txt"))
  return tmp_path, main, spec


def _calls(tmp_path):
  path = tmp_path / "calls.txt"
  return path.read_text().split() if path.exists() else []


def test_search_chooses_by_validation_and_reports_test_lines(fake):
  tmp_path, main, spec = fake
  wd = tmp_path / "tune"
  rc, out, err = _tune(spec, wd, main=main, env=dict(os.environ))
  assert rc == 0, out + err
  trials = [r for r in _read_csv(wd / "trials.csv") if r["variant"] == "a"]
  assert len(trials) == 4 and all(r["state"] == "complete" for r in trials)
  best = max(trials, key=lambda r: float(r["valid_recall@50"]))
  worst_valid = min(trials, key=lambda r: float(r["valid_recall@50"]))  # the best test line
  rows = {r["variant"]: r for r in _read_csv(wd / "results.csv")}
  assert rows["a"]["best_trial"] == best["trial"] != worst_valid["trial"]
  assert float(rows["a"]["valid_recall@50"]) == pytest.approx(float(best["valid_recall@50"]))
  # the test figures are the seeds' test lines: 1 - valid(seed), seed 0 being the trial's run
  v0 = float(best["valid_recall@50"])
  assert float(rows["a"]["recall@50_mean"]) == pytest.approx(1 - v0 - 0.005, abs=1e-5)
  assert os.readlink(wd / "a" / "best_seed0") == f"trial_{best['trial']}"
  assert (wd / "a" / "best_seed1" / "eval.jsonl").exists()
  assert rows["popularity"]["kind"] == "reference"


def test_failed_trial_is_reported_and_search_continues(fake, monkeypatch):
  tmp_path, main, spec = fake
  monkeypatch.setenv("FAIL_ABOVE", "0.2")
  wd = tmp_path / "tune"
  rc, out, _ = _tune(spec, wd, main=main, env=dict(os.environ))
  trials = _read_csv(wd / "trials.csv")
  failed = [r for r in trials if r["state"] == "fail"]
  assert failed, "the sampled learning rates should include some > 0.2"
  assert all(r["error"] == "error: fake failure: learning rate too high" for r in failed)
  assert len([r for r in trials if r["variant"] == "a"]) == 4  # the search went on
  assert "FAILED (exit 2): error: fake failure: learning rate too high" in out
  assert "marked failed; the search continues" in out
  assert "## Failures" in (wd / "results.md").read_text()
  assert rc == 0  # failed trials are part of a search; every variant has a best


def test_resume_runs_only_what_is_missing_and_is_reproducible(fake):
  tmp_path, main, _ = fake
  spec2 = _write(tmp_path / "spec2.py", FAKE_SPEC.format(trials=2))
  wd = tmp_path / "tune"
  assert _tune(spec2, wd, main=main, env=dict(os.environ))[0] == 0
  first = _calls(tmp_path)
  assert len(first) == 2 * (2 + 1)  # 2 variants x (2 trials + seed 1)
  rc, out, _ = _tune(spec2, wd, main=main, env=dict(os.environ))
  assert rc == 0 and _calls(tmp_path) == first, out  # nothing rerun
  assert "2 of 2 trials finished" in out
  # a larger budget runs only the new trials; an interrupted trial (left RUNNING) resumes
  tuning = tune.make_tuning(tune.load_spec(spec2), spec2)
  study = tune.open_study(tuning, tuning.variants[0], str(wd), create=True)
  study.ask({p.key: p.distribution() for p in tuning.variants[0].params})  # trial 2, RUNNING
  rc, out, _ = _tune(spec2, wd, main=main, trials=3, env=dict(os.environ))
  assert rc == 0, out
  new = _calls(tmp_path)[len(first) :]
  assert "a: 2 of 3 trials finished (0 failed), 1 to resume, 0 to sample" in out
  assert sorted(os.path.relpath(p, wd) for p in new if "trial_" in p) == [
    os.path.join("a", "trial_2"),
    os.path.join("b", "trial_2"),
  ]
  # the same spec in another directory samples the same points (seeded per trial number)
  wd2 = tmp_path / "again"
  assert _tune(spec2, wd2, main=main, trials=3, env=dict(os.environ))[0] == 0
  key = lambda path: [
    (r["variant"], r["trial"], r["optimizer.learning_rate"])
    for r in _read_csv(path / "trials.csv")
    if r["variant"] == "b"
  ]
  assert key(wd) == key(wd2)


# ----------------------------------------------------------------------------------------------
# One real tuning through launch/main.py.

REAL_SPEC = """
from configs import smoke


def get_config(variant="plain"):
  c = smoke.get_config()
  c.ssl.alpha = 0.0
  c.data.num_items, c.data.num_queries = 500, 1000
  c.data.num_train_pairs, c.data.num_eval_pairs = 5000, 300
  c.train.batch_size = c.ssl.batch_size = 64
  c.train.num_steps, c.train.eval_every, c.train.log_every = 20, 10, 10
  c.train.checkpoint_every = 20
  c.optimizer.warmup_steps = 5
  c.eval.ks = (10, 50)
  if variant == "spread":
    c.reg.spread_out_weight = 0.1
  return c


def get_tuning():
  return {"variants": ("plain", "spread"),
          "space": {"optimizer.learning_rate": ("log", 0.05, 0.5),
                    "reg.spread_out_weight": ("log", 0.01, 1.0)},
          "per_variant_space": {"plain": ["optimizer.learning_rate"]},
          "trials": 1, "seeds": 2, "objective": "recall@50"}  # 2 trials: the fake main's tests
"""


@pytest.fixture(scope="module")
def real(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tune_real")
  spec = _write(tmp / "spec.py", REAL_SPEC)
  wd = tmp / "tune"
  rc, out, err = _tune(spec, wd)
  return spec, wd, rc, out, err


def test_real_tuning_writes_results_with_paired_differences(real):
  _, wd, rc, out, err = real
  assert rc == 0, out + err
  for v in ("plain", "spread"):
    assert sorted(os.listdir(wd / v)) == [
      "best.json",
      "best_seed0",
      "best_seed1",
      "study.db",
      "trial_0",
    ]
  rows = {r["variant"]: r for r in _read_csv(wd / "results.csv")}
  assert rows["plain"]["reg.spread_out_weight"] == "" and rows["spread"]["reg.spread_out_weight"]
  assert rows["spread"]["n_seeds"] == "2"
  for m in ("recall@50", "recall@50/head", "recall@50/tail", "ndcg@50"):
    assert rows["spread"][f"{m}_mean"] and rows["spread"][f"{m}_std"]
    low, high = (
      float(rows["spread"][f"delta_{m}_ci95_low"]),
      float(rows["spread"][f"delta_{m}_ci95_high"]),
    )
    assert low <= float(rows["spread"][f"delta_{m}_mean"]) <= high
    assert rows["plain"][f"delta_{m}_mean"] == ""  # the reference
  assert {"popularity", "itemknn"} <= set(rows)
  # the table's figures are the seeds' TEST lines
  runs = [r for r in _read_csv(wd / "runs.csv") if r["variant"] == "spread"]
  tests = [tune.test_record(tune.read_evals(os.path.join(wd, r["run"]))) for r in runs]
  assert all(t["split"] == "test" for t in tests)
  mean = sum(t["recall@50"] for t in tests) / 2
  assert float(rows["spread"]["recall@50_mean"]) == pytest.approx(mean, abs=1e-6)
  md = (wd / "results.md").read_text()
  assert "## Paired differences to `plain` (same seed)" in md
  assert "| variant | n | ΔR@50 | ΔR@50/head | ΔR@50/tail | ΔN@50 |" in md
  assert "## Chosen hyperparameters" in md and "popularity (reference)" in md
  cfg = json.loads((wd / "spread" / "best_seed1" / "config.json").read_text())
  assert cfg["seed"] == 1 and cfg["train"]["select_metric"] == "recall@50"


def test_real_tuning_rerun_reruns_nothing(real):
  spec, wd, rc, _, _ = real
  assert rc == 0
  logs = {
    p: os.path.getsize(p)
    for v in ("plain", "spread")
    for p in (wd / v / "trial_0" / "log.txt", wd / v / "best_seed1" / "log.txt")
  }
  rc, out, err = _tune(spec, wd)
  assert rc == 0, out + err
  assert " start" not in out and "plain: 1 of 1 trials finished" in out
  assert {p: os.path.getsize(p) for p in logs} == logs


# ----------------------------------------------------------------------------------------------
# Bad input: one error line, exit 2, nothing run.

GOOD_SPACE = '{"optimizer.learning_rate": ("log", 0.02, 0.5)}'


@pytest.mark.parametrize(
  "space, kw, expect",
  [
    (
      '{"optimizer.learnig_rate": ("log", 0.02, 0.5)}',
      {},
      "space optimizer.learnig_rate: no such config field 'optimizer.learnig_rate' "
      "(did you mean 'optimizer.learning_rate'?)",
    ),
    ('{"ssl.alpha": ("uniform", 0, 1)}', {}, "kind 'uniform' is not one of"),
    ('{"ssl.alpha": ("float", 1.0, 0.5)}', {}, "low 1.0 >= high 0.5"),
    ('{"ssl.alpha": ("log", 0.0, 1.0)}', {}, "needs low > 0"),
    ('{"ssl.alpha": ("float", 0.1)}', {}, "expected ('float', LOW, HIGH)"),
    ('{"train.num_steps": ("float", 10, 20)}', {}, "an integer field"),
    ('{"ssl.dropout_rate": ("float", 0.1, 1.5)}', {}, "space ssl.dropout_rate=1.5"),
    (GOOD_SPACE, {"objective": "accuracy"}, "objective 'accuracy': not a validation metric"),
    (GOOD_SPACE, {"objective": "recall@7"}, "objective 'recall@7': not a validation metric"),
    (GOOD_SPACE, {"trials": 0}, "--trials=0: must be an integer >= 1"),
    (GOOD_SPACE, {"seeds": 0}, "--seeds=0: must be an integer >= 1"),
    (GOOD_SPACE, {"overrides": ["--config.ssl.alhpa=1"]}, "did you mean 'ssl.alpha'?"),
    (GOOD_SPACE, {"overrides": ["--config.seed=3"]}, "the tuner sets config.seed"),
  ],
)
def test_bad_input_one_line_before_any_run(tmp_path, space, kw, expect):
  spec = _write(
    tmp_path / "spec.py",
    f"""
      def get_tuning():
        return {{"variants": ("configs/smoke.py",), "space": {space}}}
      """,
  )
  rc, out, err = _tune(spec, tmp_path / "wd", main="/nonexistent/main.py", **kw)
  assert rc == 2 and out == ""
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert expect in err
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize(
  "body, expect",
  [
    (None, "no such file"),
    ("raise RuntimeError('broken spec')", "the file raised RuntimeError: broken spec"),
    (
      "def get_tuning():\n  raise ValueError('no data here')",
      "get_tuning() raised ValueError: no data here",
    ),
    (
      "def get_tuning():\n  return {'variants': ('configs/smoke.py',), 'trails': 3}",
      "unknown field 'trails' (did you mean 'trials'?)",
    ),
  ],
)
def test_bad_spec_file(tmp_path, body, expect):
  spec = tmp_path / "spec.py"
  if body is not None:
    spec.write_text(body + "\n")
  rc, out, err = _tune(str(spec), tmp_path / "wd", main="/nonexistent/main.py")
  assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert expect in err


def test_launcher_bad_input(tmp_path):
  for args, expect in [
    (["--spec=configs/nope.py"], "error: --spec=configs/nope.py: no such file"),
    (["--spec=configs/tune_movielens.py", "--trials=0"], "error: --trials=0: must be"),
  ]:
    p = subprocess.run(
      [sys.executable, "launch/tune.py", f"--workdir={tmp_path}/wd", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      env=_env(),
      timeout=120,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith(expect), p.stderr
  assert not (tmp_path / "wd").exists()
