"""Writing ``.safetensors`` files so that a failing disk is an ordinary :class:`OSError`.

``safetensors.torch.save_file`` reports a full disk, a missing folder or a read-only folder as its own
``SafetensorError`` with the operating system's error inside the message; the trainer's callers (rescue saves, the
latent cache's read-only fallback) handle ``OSError``, so the error is translated here, once.
"""

from __future__ import annotations

import errno
import os
import re

_OS_ERROR = re.compile(r"os error (\d+)")


def write_safetensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> None:
    """``save_file(tensors, path, metadata)``; an I/O failure raises ``OSError(errno, strerror, path)``."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, os.fspath(path), metadata=metadata)
    except OSError:
        raise
    except Exception as exc:
        match = _OS_ERROR.search(str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code) if code in errno.errorcode else str(exc), os.fspath(path)) from None
