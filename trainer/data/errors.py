"""What the data layer reports: :class:`DataError` (the run cannot use the data as given) and :class:`DataWarning`
(something the user should know: skipped files, upscaled images, ignored keys)."""

import warnings

from trainer.errors import CodiError


class DataError(CodiError):
    """The training data is missing, unreadable or inconsistent; the message names the files or keys."""


class DataWarning(UserWarning):
    """Something in the training data the user should know about (skipped files, upscaled images, ignored keys)."""


def warn(message: str, stacklevel: int = 2) -> None:
    warnings.warn(message, DataWarning, stacklevel=stacklevel + 1)
