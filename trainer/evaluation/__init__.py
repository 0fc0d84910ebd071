"""Evaluation of a trained adapter: ``metrics`` (PSNR, SSIM, edge F1) < ``evaluate`` (sampling validation pairs,
baselines, scores) < ``report`` (report.md, plot, grid, metrics.json) < ``cli`` (``quality_report.py``).
Imports ``trainer.models``, ``trainer.adapters`` and ``trainer.data``; nothing of the training loop."""
