"""Training data: dataset specs (flags or a kohya dataset TOML), images and captions, generated conditions, the
dataset with its geometry and batching, and the caches above it.

``errors`` < ``spec``, ``images``, ``conditions`` < ``dataset`` < ``caches``; ``prompts`` reads sample-prompt files.
Imports nothing else of the trainer.
"""
