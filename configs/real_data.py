"""The training recipe every real-data config shares (configs/movielens.py, bookcrossing.py,
files.py): a length in epochs of D_train, validation twice an epoch with early stopping, and the
popularity prior's weight chosen on validation. Chosen on ML-100k *validation* (docs/results.md
§0, "How the recipe was chosen"); the same fields are then used unchanged on every dataset.
"""

import ml_collections


def apply(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  # At most 16 epochs; the checkpoint is selected on validation and the run stops once validation
  # has not improved for 5 evaluations (2.5 epochs).
  c.train.num_epochs = 16.0
  c.train.eval_every_epochs = 0.5
  c.train.early_stopping_patience = 5
  c.train.checkpoint_every = 1000
  # Periodic validations rank with the prior at weight 0.5 (src/sslrec/prior.py); at the end its
  # weight is chosen among these on validation with the selected checkpoint (0 = no prior).
  c.eval.popularity_prior = 0.5
  c.eval.popularity_prior_candidates = (0.0, 0.5, 1.0, 2.0)
  return c
