"""sslrec: two-tower retrieval with self-supervised item-feature regularisation (JAX/Flax).

The Python API (``sslrec.api``; imported on first use, so ``import sslrec`` stays light):

* ``sslrec.fit(config, workdir)``: train and evaluate (``config``: a ConfigDict, a shipped
  config's name such as ``"smoke"`` or ``"movielens:cfm"``, or a file path); returns a
  ``TrainedRun`` (``.params`` of the selected checkpoint, ``.metrics`` its test metrics);
* ``sslrec.load(workdir)``: the same ``TrainedRun`` from a finished run's workdir;
* ``sslrec.Retriever``: top-K items of an export (``sslrec-export``), ``Retriever.load(DIR)``.
"""

__version__ = "0.1.0"

__all__ = ["fit", "load", "resolve_config", "TrainedRun", "Retriever"]


def __getattr__(name):
  if name in ("fit", "load", "resolve_config", "TrainedRun"):
    from sslrec import api

    return getattr(api, name)
  if name == "Retriever":
    from sslrec.serving import Retriever

    return Retriever
  raise AttributeError(f"module 'sslrec' has no attribute {name!r}")
