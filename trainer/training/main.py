"""``python trainer/train.py``: parse the flags, then train; a user error ends in one line, not a traceback.

Only the flag parser is imported up front, so ``--help`` and ``--output_config`` answer without loading torch,
diffusers or transformers.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from trainer.errors import CodiError
from trainer.training.config import parse_args, to_toml


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.output_config is not None:
        path = Path(args.output_config or Path(args.output_dir) / f"{args.output_name}.toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_toml(args))
        print(f"codi: wrote the effective configuration to {path}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from trainer.training.loop import train  # torch, diffusers and accelerate load from here on
    from trainer.training.settings import Settings

    try:
        train(Settings.from_args(args))
    except CodiError as exc:
        print(f"codi: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C while the libraries load, before the run's own handler is installed
        print("codi: interrupted before training started: nothing was written", file=sys.stderr, flush=True)
        return 130
    return 0
