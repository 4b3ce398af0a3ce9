"""The negatives' options side by side (issue 15): ``configs/negatives.py:OPTION`` or
``configs/negatives.py:DATA.OPTION`` with DATA ``movielens`` (``--config.data.path=DIR``).

OPTION: ``counts`` (logQ from static D_train counts, in-batch negatives: the default), ``streaming``
(logQ learnt online, sslrec/frequency.py), ``mixed`` (the D_item batch as extra negatives),
``corrected`` (the RecSys 2025 corrected logQ). Each is the default SSL model (CFM) with that one
change, so a sweep pairs them by seed:

    python launch/sweep.py --spec=configs/negatives.py --workdir=runs/negatives
    python launch/summarize.py --workdir=runs/negatives --reference=counts
"""

import importlib

OPTIONS = {
  "counts": {},
  "streaming": {"logq_source": "streaming"},
  "mixed": {"mixed_negatives": True},
  "corrected": {"logq_mode": "corrected"},
}
DATA = ("base", "movielens")


def get_config(arg: str = "counts"):
  data, _, option = arg.rpartition(".")
  data = data or "base"
  if option not in OPTIONS or data not in DATA:
    raise ValueError(
      f"configs/negatives.py:{arg}: expected OPTION or DATA.OPTION, OPTION one of "
      f"{tuple(OPTIONS)}, DATA one of {DATA}"
    )
  c = importlib.import_module(f"configs.{data}").get_config()
  for field, value in OPTIONS[option].items():
    c.loss[field] = value
  return c


def get_sweep():
  """Read by ``launch/sweep.py --spec=configs/negatives.py``; flags given there replace these."""
  return {"variants": tuple(OPTIONS), "seeds": 3}
