"""The configs shipped with sslrec, by name: ``--config=base``, ``--config=movielens:cfm``.

They are the files of the checkout's top-level ``configs/`` folder; an installed sslrec carries the
same files as the package ``sslrec.configs`` (pyproject.toml maps the folder), so the console
scripts and ``sslrec.fit`` find them outside a checkout. A ``--config`` value that names an
existing file (or looks like a path: it ends in ``.py`` or holds a ``/``) is used as given, as
before; anything else is a name, resolved here.

The config files import each other as ``from configs import base``. ``make_importable`` makes that
import work wherever sslrec runs: the checkout's root on ``sys.path`` for a file of a checkout's
``configs/`` folder, else the installed ``sslrec.configs`` registered under the name ``configs``
(only while no other ``configs`` is importable).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from sslrec.errors import ConfigError

# src/sslrec/shipped.py -> the checkout's configs/ (absent in an installed sslrec).
_CHECKOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def directory() -> str:
  """The folder of the shipped configs: the checkout's ``configs/`` when sslrec runs from a
  checkout, else the installed ``sslrec.configs``."""
  if os.path.isfile(os.path.join(_CHECKOUT, "base.py")):
    return os.path.abspath(_CHECKOUT)
  spec = importlib.util.find_spec("sslrec.configs")
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError("no configs are shipped with this sslrec install (sslrec.configs is missing)")
  return os.path.abspath(list(spec.submodule_search_locations)[0])


def names(function: str = "get_config") -> list[str]:
  """The shipped files that define ``function`` (``get_config``: configs; ``get_sweep``: sweep
  specs; ``get_tuning``: tuning specs), by name."""
  out = []
  folder = directory()
  for fname in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(fname)
    if ext != ".py" or stem.startswith("_"):
      continue
    with open(os.path.join(folder, fname), encoding="utf-8") as f:
      if f"def {function}(" in f.read():
        out.append(stem)
  return out


def is_path(value: str) -> bool:
  """Whether a ``--config`` value (before its ``:ARG``) is a file path rather than a name."""
  file = value.split(":", 1)[0]
  return os.path.isfile(file) or file.endswith(".py") or "/" in file or os.sep in file


def resolve(value: str, *, flag: str = "--config", function: str = "get_config") -> str:
  """``value`` as a file path (``PATH[:ARG]``): a path is returned as given, a shipped name
  (``NAME[:ARG]``) becomes its file's path. An unknown name raises ConfigError listing the names.
  """
  if is_path(value):
    return value
  name, sep, arg = value.partition(":")
  known = names(function)
  if name not in known:
    raise ConfigError(
      f"{flag}={value}: no such file, nor a config shipped with sslrec; the shipped ones are "
      f"{', '.join(known)} (NAME or NAME:VARIANT), or give a path to a .py file"
    )
  return os.path.join(directory(), name + ".py") + sep + arg


def make_importable(path: str | None = None) -> None:
  """Makes ``from configs import base`` work for the config file at ``path`` (and for the shipped
  configs in general): see the module docstring."""
  if path is not None:
    folder = os.path.dirname(os.path.abspath(path.split(":", 1)[0]))
    if os.path.basename(folder) == "configs" and os.path.isfile(
      os.path.join(folder, "__init__.py")
    ):
      root = os.path.dirname(folder)
      if os.path.isfile(os.path.join(folder, "base.py")) and root not in sys.path:
        if os.path.basename(root) != "sslrec":  # a checkout (or a copy of its layout)
          sys.path.insert(0, root)
          return
  if "configs" in sys.modules or importlib.util.find_spec("configs") is not None:
    return
  folder = directory()
  if os.path.abspath(folder) == os.path.abspath(_CHECKOUT):
    sys.path.insert(0, os.path.dirname(folder))
  else:
    sys.modules["configs"] = importlib.import_module("sslrec.configs")


def load(value: str, *, flag: str = "--config"):
  """The ConfigDict of ``--config=value`` (a name or ``PATH[:ARG]``), as ml_collections' config
  flag builds it (unlocked; no overrides)."""
  import warnings

  from ml_collections.config_flags import config_flags

  path = resolve(value, flag=flag)
  file, _, arg = path.partition(":")
  if not os.path.isfile(file):
    raise ConfigError(f"{flag}={value}: no such file")
  make_importable(path)
  with warnings.catch_warnings():  # ml_collections loads the file with load_module()
    warnings.simplefilter("ignore", DeprecationWarning)
    module = config_flags._LoadConfigModule("sslrec_config", file)  # pylint: disable=protected-access
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{flag}={value}: {file} has no get_config()")
  try:
    return module.get_config(*([arg] if arg else []))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{flag}={value}: {' '.join(str(e).split())}") from None
