"""launch/summarize.py: the test table of a sweep reads test lines only, pairs by seed."""

import json
import os
import subprocess
import sys

import pytest

from sslrec.experiments import summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(root, name, valid, test):
  d = root / "runs" / name
  d.mkdir(parents=True)
  lines = [{"step": 10, "split": "valid", "recall@50": valid}]
  t = {"step": 10, "split": "test", "selected_step": 10}
  for key in ("recall@50", "recall@50/head", "recall@50/tail", "ndcg@50"):
    t[key] = test
    t["popularity/" + key] = 0.1
    t["itemknn/" + key] = 0.2
  lines.append(t)
  (d / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_test_lines_means_and_paired_intervals(tmp_path):
  for seed, (b, c) in enumerate([(0.30, 0.32), (0.31, 0.34), (0.29, 0.32)]):
    # validation figures that would rank the variants the other way: never read
    _run(tmp_path, f"baseline__data.train_fraction=1.0__seed={seed}", 0.9, b)
    _run(tmp_path, f"cfm__data.train_fraction=1.0__seed={seed}", 0.1, c)
  text = summary.summarize(str(tmp_path))
  assert "| data.train_fraction=1.0 | baseline | 3 | 0.3000 ± 0.0100 |" in text
  assert "| data.train_fraction=1.0 | cfm | 3 | 0.3267 ± 0.0115 |" in text
  assert "| *popularity* | - | 0.1000 |" in text and "| *itemknn* | - | 0.2000 |" in text
  # paired: differences 0.02, 0.03, 0.03 -> mean 0.0267, t(2) 95% half-width 4.303*0.00577/sqrt(3)
  assert "| cfm | 3 | +0.0267 [+0.0123, +0.0410] |" in text
  assert (tmp_path / "test_summary.md").read_text() == text


def test_no_finished_run_is_one_error_line(tmp_path):
  (tmp_path / "runs").mkdir()
  with pytest.raises(ValueError, match="no run with a test evaluation"):
    summary.summarize(str(tmp_path))
  p = subprocess.run(
    [sys.executable, "launch/summarize.py", f"--workdir={tmp_path}"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr
