"""Command-line entry point: ``python main.py --config=configs/NAME.py[:args] --workdir=DIR``.

Only flags live here; the work is in the library (``mdrad_jax.train``, ``mdrad_jax.evaluation``,
``mdrad_jax.quickstart``) so that it can be imported and tested.  ``config.job`` selects what runs:
'train' (standard, adversarial or distillation training, by ``config.method.name``), 'evaluate'
(robustness evaluation of a checkpoint) or 'quickstart' (the end-to-end demo).  Any config field can be
overridden, e.g. ``--config.optim.lr=0.05``; a misspelt field is an error.

Exit status: 0 done; 2 bad input (a flag, a config value, a file, a workdir in use), reported on one
``error: ...`` line; 128 + the signal number when SIGINT/SIGTERM stopped a run after checkpointing (one
``interrupted: ...`` line).  Any other exception is a bug and keeps its traceback.  See docs/failures.md.
"""

import ast
import os
import sys

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mdrad_jax import errors
from mdrad_jax import runtime

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints, results.")
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:args]).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _flag_error_text(e: Exception) -> str:
  syntax = e if isinstance(e, SyntaxError) else getattr(e, "__cause__", None) or getattr(e, "__context__", None)
  if isinstance(syntax, SyntaxError):  # a config file that does not parse
    return f"config file {syntax.filename} line {syntax.lineno}: {syntax.msg}"
  text = str(e)
  if text[:1] in "'\"" and text[-1:] == text[:1]:  # a KeyError's repr: unquote it
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
  if "Traceback" in text:  # an exception inside the config file: keep its last line
    text = text.strip().splitlines()[-1]
  return text


def _unloadable_config(argv) -> str:
  path = next((a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))), "")
  path = path.split(":", 1)[0]
  return f"config file {path}: {'cannot be read' if os.path.exists(path) else 'no such file'}"


def cli(argv, stderr=None) -> int:
  """Runs the command line ``argv`` (``argv[0]`` is the program) and returns the exit status.

  ``main.py`` is ``sys.exit(cli(sys.argv))``; tests call it in-process with their own ``argv``.
  """
  stderr = sys.stderr if stderr is None else stderr
  FLAGS.unparse_flags()
  for name in [n for n in FLAGS if n.startswith("config.")]:  # override flags a previous call defined
    delattr(FLAGS, name)
  saved_argv, sys.argv = sys.argv, list(argv)  # config_flags reads the --config.* overrides from sys.argv
  try:
    rest = FLAGS(list(argv))
  except (flags.Error, SyntaxError, AttributeError, KeyError, ValueError, TypeError) as e:
    print(f"error: bad command line: {_one_line(_flag_error_text(e))}", file=stderr)
    return 2
  except OSError:  # a --config.* override of a config file that could not be loaded
    print(f"error: bad command line: {_unloadable_config(argv)}", file=stderr)
    return 2
  finally:
    sys.argv = saved_argv
  if len(rest) > 1:
    print(f"error: bad command line: unexpected arguments: {' '.join(rest[1:])}", file=stderr)
    return 2
  config = FLAGS.config
  if not isinstance(config, ml_collections.ConfigDict):
    error = getattr(config, "_error", None)  # config_flags' stand-in for a file it could not load
    if error is not None:
      print(f"error: bad command line: {_unloadable_config(argv)}", file=stderr)
    else:
      print(
        f"error: bad command line: get_config() of the --config file returned "
        f"{type(config).__name__}, expected an ml_collections.ConfigDict",
        file=stderr,
      )
    return 2
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  runtime.configure_compilation_cache()
  try:
    runtime.run(config, _WORKDIR.value)
  except errors.UserError as e:
    print(f"error: {_one_line(e)}", file=stderr, flush=True)
    return 2
  except errors.Interrupted as e:
    print(f"interrupted: {_one_line(e)}", file=stderr, flush=True)
    return e.exit_code
  return 0


if __name__ == "__main__":
  runtime.configure_xla()
  app.define_help_flags()
  sys.exit(cli(sys.argv))
