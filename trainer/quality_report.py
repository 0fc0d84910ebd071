#!/usr/bin/env python
"""Quality report of a trained CoDi adapter: ``python trainer/quality_report.py --help``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
