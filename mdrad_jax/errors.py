"""The project's one error type for user mistakes.

``main.py`` prints a :class:`UserError` on one line (``error: ...``) and exits with status 2; every other
exception keeps its traceback, so a bug deep inside the library is never disguised as bad input.  Raise it
for anything the user can fix: a config value, a missing or malformed file, a workdir in use.  Its message
names the field or file, the value found and what is allowed.  It subclasses ``ValueError`` so that code
catching ``ValueError`` around a config check keeps working.
"""


class UserError(ValueError):
  """A problem with the user's input (config, command line, files), reported without a traceback."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named (or a run needs) does not exist; also a ``FileNotFoundError``."""


class Interrupted(Exception):
  """A run stopped on SIGINT/SIGTERM after checkpointing its last finished step.

  ``main.py`` prints it on one line (``interrupted: ...``) and exits with ``128 + signal number`` (130 for
  SIGINT, 143 for SIGTERM), the status a shell reports for a process ended by that signal.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = int(signum)

  @property
  def exit_code(self) -> int:
    return 128 + self.signum
