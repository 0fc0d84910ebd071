"""The trainer's one error type for user mistakes.

Everything a user can fix (a file, a flag, the data, a resume folder) raises a :class:`CodiError` subclass whose
message names the file or flag and says what to do. Each entry point (``train.py``, ``quality_report.py``) catches
``CodiError`` once and prints ``codi: error: <message>`` on one line, without a traceback, and exits with
``exit_code``; anything else is a bug and keeps its traceback.
"""


class CodiError(ValueError):
    """A user error; ``exit_code`` is the process exit status the entry points use for it."""

    exit_code = 2
