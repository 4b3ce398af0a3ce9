"""The Python API (sslrec.fit / load / Retriever) and what a run writes for TensorBoard, read back
with TensorBoard's own event reader."""

import json

import jax
import numpy as np
import pytest

import sslrec
from sslrec import tracking
from sslrec.errors import ConfigError

OVERRIDES = {
  "train.num_steps": 6,
  "train.log_every": 3,
  "eval.references": ("popularity",),
  "eval.max_queries": 300,
  "data.num_items": 500,
  "data.num_queries": 1500,
  "data.num_train_pairs": 6000,
  "data.num_eval_pairs": 600,
  "ssl.alpha": 0.0,  # a smaller graph to compile: the API, not the method, is under test
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("api") / "run")
  return wd, sslrec.fit("smoke", wd, overrides=OVERRIDES)


def test_fit_returns_the_trained_run_and_load_reads_it_back(fitted):
  wd, run = fitted
  assert run.step == 6 and run.config.train.num_steps == 6
  with open(f"{wd}/eval.jsonl") as f:
    test = [r for r in map(json.loads, f) if r["split"] == "test"][-1]
  assert run.metrics["recall@50"] == pytest.approx(test["recall@50"])
  want = jax.eval_shape(lambda: run.model.init(jax.random.key(0), *_inputs(run)))
  assert jax.tree.structure(want) == jax.tree.structure(run.params)
  again = sslrec.load(wd)
  assert again.step == run.step and again.metrics["recall@50"] == run.metrics["recall@50"]
  for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  assert sslrec.Retriever is sslrec.serving.Retriever


def _inputs(run):
  from sslrec import step as step_lib

  return step_lib.example_inputs(run.dataset)


def test_fit_rejects_an_unknown_field_and_name(tmp_path):
  with pytest.raises(ConfigError, match="train.num_stepz"):
    sslrec.fit("smoke", str(tmp_path / "a"), overrides={"train.num_stepz": 3})
  with pytest.raises(ConfigError, match="shipped ones are .*smoke"):
    sslrec.fit("smok", str(tmp_path / "b"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tensorboard_sees_hparams_config_text_and_json_named_tags(fitted):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  from tensorboard.plugins.hparams import plugin_data_pb2

  wd, _ = fitted
  ea = event_accumulator.EventAccumulator(f"{wd}/tensorboard", size_guidance={"tensors": 0})
  ea.Reload()
  scalars = set(ea.Tags()["scalars"])
  for t in (
    "train/loss",
    "train/learning_rate",
    "train/step_time_ms",
    "valid/recall@50",
    "test/recall@50",
    "valid_best/recall@50",
    "valid_references/popularity/recall@50",
    "test_inputs/pairs",
  ):
    assert t in scalars, t
  assert not any("_50" in t or "eval/eval" in t or t.startswith("eval/") for t in scalars)
  assert not any(t.startswith(("valid/popularity", "train/data/")) for t in scalars)
  (lr,) = {e.value for e in ea.Scalars("train/learning_rate")}
  assert lr == pytest.approx(sslrec.resolve_config("smoke").optimizer.learning_rate)
  content = ea.PluginTagToContent("hparams")
  start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
  assert start.session_start_info.hparams["train.num_steps"].number_value == 6
  assert start.session_start_info.hparams["eval.references"].string_value == '["popularity"]'
  exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
  metrics = {m.name.tag for m in exp.experiment.metric_infos}
  assert {"test/recall@50", "valid_best/recall@50"} <= metrics <= scalars
  assert "_hparams_/session_end_info" in content
  (text,) = ea.Tensors("config/text_summary")
  assert '"num_steps": 6' in text.tensor_proto.string_val[0].decode()


def test_eta_leaves_the_first_step_out_and_counts_evaluations(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(tracking.time, "time", lambda: now[0])
  eta = tracking.Eta(num_steps=100, eval_every=50)
  eta.stepped(1)  # the first step ends at t=100 (its compilation is not counted)
  assert eta.seconds(1) == (None, False)
  now[0] += 9.0  # steps 2..10: 1 s each
  assert eta.seconds(10) == (pytest.approx(90.0), False)  # evaluations not measured yet
  eta.evaluated(5.0)  # one evaluation took 5 s: left out of the step time
  now[0] += 5.0
  seconds, complete = eta.seconds(10)
  assert complete and seconds == pytest.approx(90.0 + 2 * 5.0)  # evaluations at 50 and 100
  assert tracking.format_eta((None, False), str) == "eta after the first steps"


def test_profile_steps_are_checked():
  config = sslrec.resolve_config("smoke", {"train.profile_steps": (3, 2)})
  with pytest.raises(ConfigError, match="train.profile_steps"):
    tracking.profile_window(config)
  assert tracking.profile_window(sslrec.resolve_config("smoke")) is None
  assert tracking.profile_window(
    sslrec.resolve_config("smoke", {"train.profile_steps": (2, 4)})
  ) == (
    2,
    4,
  )
