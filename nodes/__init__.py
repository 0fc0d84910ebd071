"""ComfyUI glue for CoDi (V3 schema): adapter loader, model-sampling patch, CoDi scheduler (SIGMAS), CoDi sampler
(SAMPLER), one-box sample node and condition preprocessors.

Imported only through the pack's root ``__init__.py`` (relative imports): ComfyUI has a top-level module named
``nodes`` too, so nothing may import this package as a top-level ``nodes``.
"""
