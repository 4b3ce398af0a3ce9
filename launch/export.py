"""Export a trained run for serving: ``python launch/export.py --workdir=DIR --out=EXPORT_DIR``.

Writes the catalogue's item embeddings, the query tower (jax.export / StableHLO), the feature
schema and vocabularies, and a manifest; see docs/serving.md. ``--step=N`` exports that checkpoint
instead of the latest; an existing non-empty EXPORT_DIR is refused unless ``--overwrite``;
``--ann=scann`` also builds that ANN index and persists it in the export.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

from absl import app, flags, logging  # noqa: E402

from sslrec import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by launch/main.py.")
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
  from configs import base
  from sslrec import export, serving

  try:
    export.export(
      _WORKDIR.value,
      _OUT.value,
      step=_STEP.value,
      overwrite=_OVERWRITE.value,
      defaults=base.get_config(),
      platforms=_PLATFORMS.value,
      ann_backends=_ANN.value,
    )
  except (export.ExportError, serving.ServingError) + cli.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except OSError as e:  # a read-only or full file system, a name too long, ...
    print(f"error: {cli.os_error_line(e)}; nothing was written to --out", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt as e:
    print(f"error: interrupted ({e or 'SIGINT'}); nothing was written to --out", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
