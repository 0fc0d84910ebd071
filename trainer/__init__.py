"""The CoDi trainer: distills a few-step conditional adapter from a user's Stable Diffusion checkpoint.

Sub-packages, each importing only those listed before it (``tests/test_layering.py`` keeps it so):

    errors       the one user-error type (CodiError), caught once by each entry point
    models       base models: single files, diffusers folders, CoDi base bundles, tokenizers, ldm key tables
    adapters     ControlNet / Control-LoRA adapters, the UNet LoRA, adapter files (save, read, the one loader)
    data         dataset specs (flags, kohya TOML), images, generated conditions, dataset + batching, caches
    evaluation   metrics, scoring an adapter on validation pairs, the quality report and its CLI
    training     flags + TOML, typed settings, the training loop, saving and resuming, optimizers, memory

Entry points: ``trainer/train.py`` and ``trainer/quality_report.py``. The algorithm itself lives in ``ccd_sampler``
(shared with the ComfyUI nodes); ``docs/`` explains the method, the file formats and the decisions.
"""

import logging
import os

# Never reach the network: every model and tokenizer comes from local files. Set before diffusers / transformers are
# imported by anything under this package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# bitsandbytes >= 0.48 logs a warning at import on machines without its optional CPU "kernels" package, although
# its 8-bit optimizers work there; it would greet every run, so only its errors are shown.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
