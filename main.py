"""Command-line entry point: ``python main.py --config=configs/NAME.py[:args] --workdir=DIR``.

Only flags live here; the work is in the library (``mdrad_jax.train``, ``mdrad_jax.evaluation``,
``mdrad_jax.quickstart``) so that it can be imported and tested.  ``config.job`` selects what runs:
'train' (standard, adversarial or distillation training, by ``config.method.name``), 'evaluate'
(robustness evaluation of a checkpoint) or 'quickstart' (the end-to-end demo).  Any config field can be
overridden, e.g. ``--config.optim.lr=0.05``; a misspelt field is an error.
"""
import ast
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mdrad_jax import runtime

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints, results.")
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:args]).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
  """Parses flags; a bad flag or config override is reported on one line (exit code 2)."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    text = str(e)
    if text[:1] in "'\"" and text[-1:] == text[:1]:  # a KeyError's repr: unquote it
      try:
        text = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        pass
    if "Traceback" in text:  # an exception inside the config file: keep its last line
      text = text.strip().splitlines()[-1]
    msg = " ".join(text.split())
    print(f"error: bad command line: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  runtime.configure_compilation_cache()
  try:
    runtime.run(FLAGS.config, _WORKDIR.value)
  except runtime.USER_ERRORS as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  runtime.configure_xla()
  app.run(main, flags_parser=_parse_flags)
