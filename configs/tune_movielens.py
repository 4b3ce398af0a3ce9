"""Each variant at its own best on MovieLens: ``launch/tune.py --spec=configs/tune_movielens.py``.

    python launch/tune.py --spec=configs/tune_movielens.py --workdir=runs/tune_ml100k \
        --config.data.path=data/ml-100k --trials=8 --seeds=3

Per variant of configs/movielens.py, a TPE search of the fields that variant has (no ssl.* for
the baseline and spread-out, the spread-out weight only for spread-out) on the validation split,
then its best setting over 3 paired seeds on the test split (docs/tuning.md).
"""

SHARED = (
  "optimizer.learning_rate",
  "optimizer.embedding_learning_rate",
  "loss.temperature",
  "train.num_epochs",
)


def get_tuning():
  return {
    "variants": (
      "configs/movielens.py:baseline",
      "configs/movielens.py:spread_out",
      "configs/movielens.py:rfm",
      "configs/movielens.py:cfm",
    ),  # the first: reference
    "space": {
      "optimizer.learning_rate": ("log", 0.02, 0.5),
      "optimizer.embedding_learning_rate": ("log", 0.02, 2.0),
      "loss.temperature": ("log", 0.02, 0.3),
      "train.num_epochs": ("float", 2, 16),  # an upper bound: early stopping still applies
      "ssl.alpha": ("log", 0.05, 2.0),
      "ssl.temperature": ("log", 0.05, 0.5),
      "reg.spread_out_weight": ("log", 0.01, 3.0),
    },
    "per_variant_space": {
      "configs/movielens.py:baseline": SHARED,
      "configs/movielens.py:spread_out": (*SHARED, "reg.spread_out_weight"),
      "configs/movielens.py:rfm": (*SHARED, "ssl.alpha", "ssl.temperature"),
      "configs/movielens.py:cfm": (*SHARED, "ssl.alpha", "ssl.temperature"),
    },
    "trials": 8,
    "seeds": 3,
    "objective": "recall@50",  # the best validation value over each run's evaluations
    # applied to every run (e.g. {"data.train_fraction": 0.1}); data.path comes from the
    # command line: --config.data.path=DIR
    "fixed": {},
  }
