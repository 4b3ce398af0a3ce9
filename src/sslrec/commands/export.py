"""Export a trained run for serving: ``sslrec-export --workdir=DIR --out=EXPORT_DIR`` (or
``python launch/export.py ...`` in a checkout).

Writes the catalogue's item embeddings, the query tower (jax.export / StableHLO), the feature
schema and vocabularies, and a manifest; see docs/serving.md. ``--step=N`` exports that checkpoint
instead of the latest; an existing non-empty EXPORT_DIR is refused unless ``--overwrite``.
"""

import sys

from absl import app, flags, logging

from sslrec import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by sslrec-train.")
_OUT = flags.DEFINE_string("out", None, "Export directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export in --out.")
_PLATFORMS = flags.DEFINE_list(
  "platforms", ["cpu", "cuda", "tpu"], "Platforms the query tower is lowered for."
)
_ANN = flags.DEFINE_list(
  "ann", [], "ANN indexes to build and persist in the export (auto, scann, faiss): docs/serving.md."
)
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # orbax warns that the read-only checkpoint is read-only
  cli.interrupt_on_sigterm()
  import tempfile

  from sslrec import export, paths, serving, shipped

  try:
    if paths.is_remote(_WORKDIR.value):
      raise paths.PathError(
        f"--workdir={_WORKDIR.value}: export reads a local run directory; copy it here first "
        "(e.g. gsutil -m cp -r)"
      )
    out = _OUT.value
    remote = paths.is_remote(out)
    if remote:  # written locally, then copied through etils.epath
      target = paths.check(out, flag="--out")
      if target.exists() and any(target.iterdir()) and not _OVERWRITE.value:
        raise export.ExportError(f"--out={out} is not empty; pass --overwrite to replace it")
      tmp = tempfile.TemporaryDirectory(prefix="sslrec_export_")
      out = tmp.name
    export.export(
      _WORKDIR.value,
      out,
      step=_STEP.value,
      overwrite=_OVERWRITE.value or remote,
      defaults=shipped.load("base"),
      platforms=_PLATFORMS.value,
      ann_backends=_ANN.value,
    )
    if remote:
      paths.upload(out, _OUT.value)
      tmp.cleanup()
      print(f"copied the export to {_OUT.value}", flush=True)
  except (export.ExportError, serving.ServingError) + cli.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except OSError as e:  # a read-only or full file system, a name too long, ...
    print(f"error: {cli.os_error_line(e)}; nothing was written to --out", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt as e:
    print(f"error: interrupted ({e or 'SIGINT'}); nothing was written to --out", file=sys.stderr)
    sys.exit(130)


def run():
  """The ``sslrec-export`` console script."""
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
