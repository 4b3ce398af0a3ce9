"""Smoke-size config: trains in seconds on a laptop CPU (tests and quick checks of a setup)."""

from configs import base


def get_config():
  c = base.get_config()
  c.data.num_items = 2000
  c.data.num_queries = 6000
  c.data.num_train_pairs = 40_000
  c.data.num_eval_pairs = 2000
  c.data.embed_dim = 16
  c.data.num_threads = 1
  c.model.query_hidden = (64,)
  c.model.item_hidden = (64,)
  c.model.output_dim = 32
  c.train.batch_size = 128
  c.ssl.batch_size = 128
  c.train.num_steps = 60
  c.train.log_every = 20
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.optimizer.warmup_steps = 10
  return c
