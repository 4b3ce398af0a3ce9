"""Running a planned sweep: one ``launch/main.py`` subprocess per run, ``parallel`` at a time.

Each run is ``python launch/main.py --config=VARIANT --workdir=DIR/runs/NAME --config.KEY=VALUE
...`` with its output in ``DIR/runs/NAME/log.txt``. A run whose ``eval.jsonl`` holds its final step
is skipped; an interrupted one is relaunched and resumes from its checkpoints. A failed run does
not stop the others; the report lists it with the last lines of its log. ``run_command`` is the
whole command (plan, run, report) that ``launch/sweep.py`` calls.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import sslrec
from sslrec.experiments import plan, plots, report

# ----------------------------------------------------------------------------------------------
# Running.


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def _set_aside_stale_config(rd: str) -> str | None:
  """An earlier attempt that failed before its first checkpoint left only its config.json;
  that file would make main.py refuse the run if the config schema moved on since. With
  nothing to resume, it is renamed (kept) so the run starts fresh. Returns the new name."""
  path = os.path.join(rd, "config.json")
  ckpt = os.path.join(rd, "checkpoints")
  has_ckpt = os.path.isdir(ckpt) and any(e.isdigit() for e in os.listdir(ckpt))
  if not os.path.exists(path) or has_ckpt:
    return None
  new = f"config.{int(time.time())}.json"
  os.replace(path, os.path.join(rd, new))
  return new


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _last_step_line(path: str) -> str:
  tail = plan.log_tail(path, 20).splitlines()
  steps = [ln for ln in tail if ln.startswith("step ")]
  return steps[-1].split(" | ")[0] if steps else "starting"


def start_run(
  variant_path: str,
  rd: str,
  flags: Sequence[str],
  *,
  main_script: str | Sequence[str],
  python: str = sys.executable,
  env: dict | None = None,
) -> tuple[subprocess.Popen, Any]:
  """Starts ``python main_script --config=variant_path --workdir=rd *flags`` with its output
  appended to ``rd/log.txt`` (the command line first); returns the process and the open log file
  (the caller closes it). ``main_script``: a script's path, or the arguments that follow
  ``python`` (``("-m", "sslrec.commands.train")``). A stale config.json with no checkpoint to
  resume is set aside first."""
  os.makedirs(rd, exist_ok=True)
  script = [main_script] if isinstance(main_script, str) else list(main_script)
  cmd = [python, *script, f"--config={variant_path}", f"--workdir={rd}", *flags]
  log = open(os.path.join(rd, "log.txt"), "a")
  stale = _set_aside_stale_config(rd)
  if stale:
    log.write(f"(no checkpoint to resume: the earlier attempt's config is now {stale})\n")
  log.write("$ " + shlex.join(cmd) + "\n")
  log.flush()
  # A session of its own: a Ctrl-C at the terminal reaches the sweep only, which forwards one
  # SIGTERM (the run saves a checkpoint and stops); a second signal would stop it unsaved.
  proc = subprocess.Popen(
    cmd,
    stdout=log,
    stderr=subprocess.STDOUT,
    env=env,
    stdin=subprocess.DEVNULL,
    start_new_session=True,
  )
  return proc, log


STOP_WAIT_S = 600.0  # how long an interrupted sweep waits for its runs to save and stop


def last_step_line(path: str) -> str:
  """The newest ``step N/M`` progress line of a run's log.txt ('starting' if none)."""
  return _last_step_line(path)


def execute(
  sweep: plan.Sweep,
  workdir: str,
  *,
  main_script: str,
  parallel: int = 1,
  python: str = sys.executable,
  env: dict | None = None,
  status_every: float = 60.0,
  out=sys.stdout,
) -> dict[str, dict]:
  """Runs every unfinished run of ``sweep`` (``parallel`` at a time); returns the outcome of
  each run by name: ``{'status': 'done' | 'skipped' | 'failed', 'returncode', 'seconds'}``.

  Prints a progress line on every start, finish and failure, and a status line of the running
  runs every ``status_every`` seconds.
  """

  def say(msg):
    try:
      print(msg, file=out, flush=True)
    except (BrokenPipeError, ValueError):  # a closed pipe must not orphan the runs
      pass

  outcomes: dict[str, dict] = {}
  todo = []
  for run in sweep.runs:
    if run.same_as is not None:  # shares an equivalent run's results (plan.NO_EFFECT)
      outcomes[run.name] = {"status": "same", "returncode": 0, "seconds": 0.0}
    elif plan.final_eval(workdir, run) is not None:
      outcomes[run.name] = {"status": "skipped", "returncode": 0, "seconds": 0.0}
    else:
      todo.append(run)
  total = len(sweep.runs)
  same = sum(o["status"] == "same" for o in outcomes.values())
  say(
    f"sweep: {total} runs in {workdir}/runs ({total - len(todo) - same} already finished, "
    f"{len(todo)} to run, {parallel} at a time"
    + (f", {same} sharing an equivalent run's result" if same else "")
    + ")"
  )
  for note in sweep.notes:
    say(f"note: {note}")
  running: dict[str, tuple[subprocess.Popen, plan.RunSpec, float, Any]] = {}
  failed = 0
  t0 = time.time()
  last_status = time.time()

  def progress() -> str:
    done = sum(o["status"] != "failed" for o in outcomes.values())
    left = total - len(outcomes) - len(running)
    timed = [o["seconds"] for o in outcomes.values() if o["status"] in ("done", "failed")]
    eta = ""
    if timed and (left or running):  # the runs still to finish at the mean run time so far
      per_run = sum(timed) / len(timed)
      in_flight = sum(max(per_run - (time.time() - r[2]), 0.0) for r in running.values())
      eta = f", eta {_fmt_time((left * per_run + in_flight) / max(parallel, 1))}"
    return (
      f"{done}/{total} done, {len(running)} running, {left} left, {failed} failed, "
      f"{_fmt_time(time.time() - t0)}{eta}"
    )

  queue = list(todo)
  previous = signal.getsignal(signal.SIGTERM)
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    while queue or running:
      while queue and len(running) < max(parallel, 1):
        run = queue.pop(0)
        proc, log = start_run(
          run.variant.path,
          plan.run_dir(workdir, run),
          run.flags,
          main_script=main_script,
          python=python,
          env=env,
        )
        running[run.name] = (proc, run, time.time(), log)
        say(f"start  {run.name} | {progress()}")
      time.sleep(0.2)
      for name, (proc, run, started, log) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        log.close()
        del running[name]
        seconds = time.time() - started
        ok = rc == 0 and plan.final_eval(workdir, run) is not None
        outcomes[name] = {
          "status": "done" if ok else "failed",
          "returncode": rc,
          "seconds": seconds,
        }
        if ok:
          say(f"done   {name} ({_fmt_time(seconds)}) | {progress()}")
        else:
          failed += 1
          last = plan.log_tail(os.path.join(plan.run_dir(workdir, run), "log.txt"), 1)
          if rc == 0:
            last = "no test evaluation in eval.jsonl"
          say(f"FAILED {name} (exit {rc}): {last} | {progress()}")
      if running and time.time() - last_status >= status_every:
        last_status = time.time()
        for name, (_, run, started, _) in running.items():
          line = _last_step_line(os.path.join(plan.run_dir(workdir, run), "log.txt"))
          say(f"  ...  {name}: {line} ({_fmt_time(time.time() - started)})")
  except KeyboardInterrupt:
    say(
      f"interrupted: asking {len(running)} running runs to save a checkpoint and stop "
      "(interrupt again to stop them at once, unsaved)"
    )
    for proc, _, _, _ in running.values():
      proc.terminate()  # once: the run saves at its next step boundary
    deadline = time.time() + STOP_WAIT_S
    try:
      for proc, _, _, _ in running.values():
        try:
          proc.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
          proc.kill()
    except KeyboardInterrupt:
      for proc, _, _, _ in running.values():
        proc.kill()
      say(
        "interrupted again: the running runs were killed (they resume from their last checkpoint)"
      )
    for proc, _, _, log in running.values():
      proc.wait()
      log.close()
    say(f"interrupted; {len(running)} running runs stopped (re-run the same command to resume)")
    raise
  finally:
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, previous)
  say(f"sweep finished: {progress()}")
  return outcomes


# ----------------------------------------------------------------------------------------------
# The results: tables (report) and figures (plots).


def write_results(
  sweep: plan.Sweep,
  workdir: str,
  outcomes: dict | None = None,
  *,
  command: str = "",
  draw: bool = True,
  reference: str | None = None,
  out=None,
) -> dict[str, Any]:
  """Gathers, writes results.csv / summary.csv / results.md and (if possible) the plots.

  ``reference``: the variant label the paired-differences table compares to (default: the
  first variant)."""
  records = report.gather(sweep, workdir, outcomes)
  summary = report.summarize(records)
  results_csv, summary_csv = report.write_csv(sweep, records, summary, workdir)
  plot_paths, note = [], ""
  if draw:
    try:
      plot_paths = plots.plot(sweep, summary, workdir, records=records, reference=reference)
    except ImportError:
      note = "matplotlib is not installed: no plots (pip install matplotlib)"
  md = report.write_markdown(
    sweep, records, summary, workdir, command=command, plots=plot_paths, reference=reference
  )
  if out is not None:
    print(
      f"results: {results_csv}, {summary_csv}, {md}"
      + (f", {len(plot_paths)} plots" if plot_paths else "")
      + (f"; {note}" if note else ""),
      file=out,
      flush=True,
    )
  return {"records": records, "summary": summary, "plots": plot_paths, "markdown": md}


# ----------------------------------------------------------------------------------------------
# The command (launch/sweep.py parses the flags and calls this).


def run_command(
  *,
  workdir: str,
  config: str | None = None,
  variants: Sequence[str] = (),
  spec: str | None = None,
  grid: Sequence[str] = (),
  seeds: int | None = None,
  parallel: int = 1,
  overrides: Sequence[str] = (),
  main_script: str | Sequence[str],
  command: str = "",
  draw: bool = True,
  reference: str | None = None,
  out=sys.stdout,
  err=sys.stderr,
) -> int:
  """Plans (validating everything), runs and reports a sweep; returns the exit code: 0 when
  every run finished, 1 when some failed, 2 on bad input (one ``error:`` line, nothing run)."""
  try:
    if not workdir:
      raise plan.SweepError("--workdir is required")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise plan.SweepError(f"--workdir={workdir} exists and is not a directory")
    if not isinstance(parallel, int) or parallel < 1:
      raise plan.SweepError(f"--parallel={parallel}: must be an integer >= 1")
    if spec:
      spec = plan.resolve_name(spec, flag="--spec", function="get_sweep")
    spec_args = plan.load_spec(spec) if spec else {"variants": [], "grid": [], "seeds": 1}
    if config:
      config = plan.resolve_name(config)
      if not os.path.isfile(config.split(":", 1)[0]):
        raise plan.SweepError(
          f"--config={config}: no such file (a path, or a shipped config's name such as base)"
        )
    variants = [plan.resolve_name(v, flag="--variants") for v in variants if v.strip()]
    chosen = ([config] if config else []) + [v for v in variants if v != config]
    chosen = chosen or spec_args["variants"]
    grid_keys = {g.partition("=")[0].strip() for g in grid}
    merged_grid = [g for g in spec_args["grid"] if g.partition("=")[0] not in grid_keys]
    sweep = plan.plan(
      variants=chosen,
      grid=[*merged_grid, *grid],
      seeds=spec_args["seeds"] if seeds is None else seeds,
      overrides=overrides,
    )
    labels = [v.label for v in sweep.variants]
    if reference is not None and reference not in labels:
      raise plan.SweepError(
        f"--reference={reference}: not a variant of this sweep; one of {labels}"
      )
  except plan.SweepError as e:
    print(f"error: {e}", file=err, flush=True)
    return 2
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep_command.txt"), "a") as f:
    f.write(command + "\n")
  env = dict(os.environ)
  # Each run imports this process's sslrec (a checkout's src/ or the installed package).
  here = os.path.dirname(os.path.dirname(os.path.abspath(sslrec.__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
  try:
    outcomes = execute(sweep, workdir, main_script=main_script, parallel=parallel, env=env, out=out)
  except KeyboardInterrupt:
    write_results(sweep, workdir, None, command=command, draw=draw, reference=reference, out=out)
    return 130
  write_results(sweep, workdir, outcomes, command=command, draw=draw, reference=reference, out=out)
  return 1 if any(o["status"] == "failed" for o in outcomes.values()) else 0
