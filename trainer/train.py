#!/usr/bin/env python
"""Distill a CoDi adapter: ``python trainer/train.py --help`` (or ``accelerate launch trainer/train.py ...``)."""

import os
import sys

# Never reach the network: every model and tokenizer comes from local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.loop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
