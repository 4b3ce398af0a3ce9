"""Packaging: shipped configs by name, the package list and console scripts of pyproject.toml,
no import of the checkout's configs/ from src/ or launch/, remote paths' errors."""

import ast
import importlib
import os
import shutil
import subprocess
import sys

import pytest

from sslrec import cli, paths, shipped
from sslrec.errors import ConfigError
from sslrec.run import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_names_resolve_to_the_shipped_files():
  names = shipped.names()
  assert {"base", "smoke", "movielens", "files", "cfm"} <= set(names)
  assert "tune_movielens" not in names  # a tuning spec, no get_config
  assert "paper" in shipped.names("get_sweep")
  assert shipped.resolve("smoke") == os.path.join(ROOT, "configs", "smoke.py")
  assert shipped.resolve("movielens:cfm") == os.path.join(ROOT, "configs", "movielens.py") + ":cfm"
  assert shipped.resolve("configs/base.py") == "configs/base.py"  # a path: as given
  assert shipped.resolve("my/own.py:x") == "my/own.py:x"
  c = shipped.load("movielens:cfm")
  assert c.data.name == "movielens" and c.ssl.alpha > 0


def test_unknown_name_is_one_line_listing_the_names():
  with pytest.raises(ConfigError) as e:
    shipped.resolve("smok")
  msg = str(e.value)
  assert "\n" not in msg and "--config=smok" in msg and "base" in msg and "smoke" in msg
  with pytest.raises(ConfigError, match="unknown variant"):
    shipped.load("movielens:nope")
  argv = cli.resolve_config_flag(["prog", "--config=smoke", "--workdir=w"])
  assert argv[1] == "--config=" + os.path.join(ROOT, "configs", "smoke.py")


def test_installed_layout_loads_by_name(tmp_path):
  """sslrec installed (no checkout): the configs are sslrec.configs and their own
  ``from configs import base`` still works, from an unrelated working directory."""
  site = tmp_path / "site"
  shutil.copytree(os.path.join(ROOT, "src", "sslrec"), site / "sslrec")
  shutil.copytree(os.path.join(ROOT, "configs"), site / "sslrec" / "configs")
  code = (
    "from sslrec import shipped; c = shipped.load('movielens:rfm'); "
    "print(shipped.directory()); print(c.data.name, c.model.output_dim)"
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(site)
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr
  folder, values = out.stdout.splitlines()
  assert folder == str(site / "sslrec" / "configs")
  assert values.startswith("movielens ")


def test_pyproject_lists_every_package_and_console_script():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)
  listed = set(project["tool"]["setuptools"]["packages"])
  found = {
    os.path.relpath(d, os.path.join(ROOT, "src")).replace(os.sep, ".")
    for d, _, files in os.walk(os.path.join(ROOT, "src", "sslrec"))
    if "__init__.py" in files
  }
  assert found | {"sslrec.configs"} == listed
  assert project["tool"]["setuptools"]["package-dir"]["sslrec.configs"] == "configs"
  assert project["project"]["license"] == "Apache-2.0"
  with open(os.path.join(ROOT, "LICENSE")) as f:
    assert "Apache License" in f.read(300)
  scripts = project["project"]["scripts"]
  assert {"sslrec-train", "sslrec-sweep", "sslrec-export", "sslrec-retrieve"} <= set(scripts)
  for name, target in scripts.items():
    module, func = target.split(":")
    spec = importlib.util.find_spec(module)
    if name == "sslrec-serve" and spec is None:
      continue  # the serving branch's module
    with open(spec.origin) as f:  # not imported: each command defines its own absl flags
      defined = {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}
    assert func in defined, name


def test_nothing_imports_the_checkouts_configs():
  for folder in ("src", "launch"):
    for d, _, files in os.walk(os.path.join(ROOT, folder)):
      for name in files:
        if not name.endswith(".py"):
          continue
        with open(os.path.join(d, name)) as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          mods = []
          if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
          elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods = [node.module or ""]
          assert not any(m == "configs" or m.startswith("configs.") for m in mods), (d, name)


def test_remote_path_without_its_client_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  if importlib.util.find_spec("gcsfs") is None:
    with pytest.raises(paths.PathError, match=r"--workdir=gs://bucket/run: .*gcsfs"):
      workdir.prepare("gs://bucket/run", {}, allow_config_change=False)
    assert not os.path.exists("gs:")  # no local folder named after the scheme
  with pytest.raises(paths.PathError, match="unknown filesystem nope://"):
    paths.check("nope://x/y", flag="--workdir")
  assert paths.join("gs://b/x", "checkpoints") == "gs://b/x/checkpoints"
  assert paths.join("rel", "a") == os.path.join("rel", "a")


def test_upload_copies_a_folder_through_epath(tmp_path):
  src = tmp_path / "src"
  (src / "sub").mkdir(parents=True)
  (src / "a.json").write_text("{}")
  (src / "sub" / "b.npy").write_bytes(b"\x00\x01")
  paths.upload(str(src), str(tmp_path / "dst"))
  assert (tmp_path / "dst" / "a.json").read_text() == "{}"
  assert (tmp_path / "dst" / "sub" / "b.npy").read_bytes() == b"\x00\x01"
