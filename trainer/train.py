#!/usr/bin/env python
"""Distill a CoDi adapter: ``python trainer/train.py --help`` (or ``accelerate launch trainer/train.py ...``)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.training.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
