"""Many more reliability trials than the test suite runs (minutes to hours; not a pytest file).

    python tests/reliability_trials.py resume --trials=20 [--devices=1] [--seed=0]
    python tests/reliability_trials.py hostile --examples=2000 [--train=20]

``resume``: an uninterrupted reference run of a small config, then ``--trials`` runs, each
interrupted 1 to 3 times before it is run to the end with the same command. An interruption is a
SIGKILL at a random step (the test hook), a SIGKILL right after a checkpoint save was started (an
asynchronous save in flight), a SIGKILL or a SIGTERM from outside at a random moment. Each trial
is compared with the reference: every logged value but the wall-clock rates, and the final
parameters, bitwise. Prints one line per trial and a summary.

``hostile``: the property tests of tests/test_hostile.py with ``--examples`` examples each (counts
by kind from hypothesis), then ``--train`` random config overrides that the checks accept, each
trained end to end by launch/main.py (exit 0, or one error line; never a traceback or a hang).
"""

import argparse
import collections
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TRIAL = {
  "data.num_items": 512,
  "data.num_queries": 1000,
  "data.num_train_pairs": 4000,
  "data.num_eval_pairs": 200,
  "train.batch_size": 64,
  "ssl.batch_size": 64,
  "train.num_steps": 120,
  "train.log_every": 7,
  "train.checkpoint_every": 10,
  "train.eval_every": 40,
  "eval.max_queries": 200,
}


def _env(cache, devices, **extra):
  from sslrec.run import reliability

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
  )
  if cache:  # see tests/test_reliability.py: only with one device
    env.update(
      JAX_COMPILATION_CACHE_DIR=cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  env.pop(reliability.KILL_ENV, None)
  env.update(extra)
  return env


def _cmd(workdir, extra=()):
  return [
    sys.executable,
    "launch/main.py",
    "--config=configs/smoke.py",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in TRIAL.items()),
    *extra,
  ]


def _external(workdir, env, sig, delay):
  """Runs main.py and sends ``sig`` ``delay`` seconds after its data is built."""
  proc = subprocess.Popen(
    _cmd(workdir), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  for line in proc.stdout:
    if line.startswith("data:"):
      break
  time.sleep(delay)
  if proc.poll() is None:
    proc.send_signal(sig)
  proc.communicate(timeout=600)
  return proc.returncode


def resume_trials(args):
  from tests import test_reliability as t

  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix="sslrec_trials_")
  cache = os.path.join(root, "cache") if args.devices == 1 else None
  t.NUM_STEPS = TRIAL["train.num_steps"]
  reference = os.path.join(root, "reference")
  p = subprocess.run(
    _cmd(reference),
    cwd=REPO,
    env=_env(cache, args.devices),
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  n = TRIAL["train.num_steps"]
  ckpt_steps = [s for s in range(1, n) if s % TRIAL["train.checkpoint_every"] == 0]
  kinds, equal, total = collections.Counter(), 0, 0
  for trial in range(args.trials):
    wd = os.path.join(root, f"trial{trial}")
    done = []
    low = 1
    for _ in range(rng.randint(1, 3)):
      kind = rng.choice(["kill_step", "kill_save", "kill_external", "term_external"])
      env = _env(cache, args.devices)
      if kind == "kill_step":
        step = rng.randint(low, n - 1)
        env[t.reliability.KILL_ENV] = str(step)
        code = subprocess.run(
          _cmd(wd), cwd=REPO, env=env, capture_output=True, timeout=1200
        ).returncode
        low = step + 1
      elif kind == "kill_save":
        later = [s for s in ckpt_steps if s >= low]
        if not later:
          continue
        step = rng.choice(later)
        env[t.reliability.KILL_ENV] = str(step)
        code = subprocess.run(
          _cmd(wd), cwd=REPO, env=env, capture_output=True, timeout=1200
        ).returncode
        low = step + 1
      else:
        sig = signal.SIGKILL if kind == "kill_external" else signal.SIGTERM
        step = round(rng.uniform(0, 3), 2)  # seconds after the data is built
        code = _external(wd, env, sig, step)
      kinds[kind] += 1
      done.append(f"{kind}@{step}:{code}")
      if low >= n:
        break
    p = subprocess.run(
      _cmd(wd),
      cwd=REPO,
      env=_env(cache, args.devices),
      capture_output=True,
      text=True,
      timeout=1200,
    )
    ok = p.returncode == 0
    if ok:
      try:
        t.assert_same_run(reference, wd, n)
      except AssertionError as e:
        ok = False
        done.append(f"DIFFERENT: {e}")
    else:
      done.append(f"final exit {p.returncode}: {p.stderr[-500:]}")
    total += 1
    equal += ok
    print(
      f"trial {trial}: {'bitwise equal' if ok else 'NOT EQUAL'} | " + ", ".join(done), flush=True
    )
    shutil.rmtree(wd, ignore_errors=True)
  print(
    f"\n{equal} of {total} trials ended bitwise equal to the uninterrupted run; "
    f"interruptions: {dict(kinds)} ({sum(kinds.values())}); devices: {args.devices}"
  )
  shutil.rmtree(root, ignore_errors=True)
  return 0 if equal == total else 1


EDGE_VALUES = [
  "0",
  "1",
  "2",
  "-1",
  "3",
  "7",
  "1e-9",
  "0.999999",
  "1e6",
  "2147483647",
  "5e-324",
  "(1,)",
  "(1, 2)",
  "()",
  "(2,)",
  "('data',)",
  "''",
  "'x'",
  "True",
  "False",
  "'adam'",
  "'rfm'",
  "'none'",
  "'train'",
  "'bfloat16'",
  "'sparse'",
  "'lazy_adam'",
  "'all'",
  "'cfm_ids_random'",
  "'user'",
  "'item'",
  "'error'",
]


def hostile(args):
  env = dict(os.environ, SSLREC_HOSTILE_EXAMPLES=str(args.examples), JAX_PLATFORMS="cpu")
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "tests/test_hostile.py",
      "-p",
      "no:logging",
      "--hypothesis-show-statistics",
      "-q",
    ],
    cwd=REPO,
    env=env,
    text=True,
    capture_output=True,
  )
  print("\n".join(l for l in p.stdout.splitlines() if not l.startswith("WARNING")))
  code = p.returncode
  if not args.train:
    return code
  from tests import test_hostile as th

  rng = random.Random(args.seed)
  outcomes = collections.Counter()
  root = tempfile.mkdtemp(prefix="sslrec_hostile_")
  tried = set()
  while sum(outcomes.values()) < args.train:
    field, value = rng.choice(th.FIELDS), rng.choice(EDGE_VALUES)
    if (field, value) in tried or field in ("train.num_steps",):
      continue
    if field.startswith("data.") and value in ("2147483647", "1e6"):
      continue  # a legitimately huge synthetic dataset: minutes and gigabytes, not a hostile case
    tried.add((field, value))
    try:
      kind = th.check_override(field, value)
    except AssertionError as e:
      print(f"--config.{field}={value}: CHECKS FAILED: {e}")
      outcomes["checks failed"] += 1
      continue
    if kind != "accepted":
      continue
    wd = os.path.join(root, f"run{len(tried)}")
    cmd = _cmd(wd, ["--config.train.num_steps=3", f"--config.{field}={value}"])
    try:
      p = subprocess.run(
        cmd, cwd=REPO, env=_env(None, 1), capture_output=True, text=True, timeout=600
      )
    except subprocess.TimeoutExpired:
      outcomes["HANG (600 s)"] += 1
      print(f"--config.{field}={value}: HANG")
      continue
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    if p.returncode == 0:
      result = "trained"
    elif len(errors) == 1 and "Traceback" not in p.stderr:
      result = "refused in one line"
    else:
      result = "CRASHED"
    outcomes[result] += 1
    shown = errors[0] if errors else p.stderr.strip().splitlines()[-1:] or ""
    print(f"--config.{field}={value}: {result} (exit {p.returncode}) {shown}", flush=True)
    shutil.rmtree(wd, ignore_errors=True)
  print(f"\ntrained end to end: {dict(outcomes)}")
  shutil.rmtree(root, ignore_errors=True)
  return code or int(any(k in outcomes for k in ("CRASHED", "HANG (600 s)", "checks failed")))


def main():
  logging.getLogger("absl").setLevel(logging.ERROR)
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = parser.add_subparsers(dest="mode", required=True)
  r = sub.add_parser("resume")
  r.add_argument("--trials", type=int, default=10)
  r.add_argument("--devices", type=int, default=1)
  r.add_argument("--seed", type=int, default=0)
  h = sub.add_parser("hostile")
  h.add_argument("--examples", type=int, default=1000)
  h.add_argument("--train", type=int, default=0)
  h.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  sys.exit(resume_trials(args) if args.mode == "resume" else hostile(args))


if __name__ == "__main__":
  main()
