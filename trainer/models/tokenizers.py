"""CLIP tokenizers from local files only: a diffusers folder's ``tokenizer/``, ``--tokenizer_path``, or ComfyUI's
``comfy/sd1_tokenizer`` when the trainer runs inside (or beside) a ComfyUI tree. Nothing is downloaded."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from trainer.models.base import TEXT_ENCODING, TOKEN_LENGTH, CheckpointError


def find_comfyui_tokenizer_dir(search_from: Iterable[os.PathLike | str] = ()) -> Path | None:
    """ComfyUI's ``comfy/sd1_tokenizer``: under ``$CODI_COMFYUI_DIR``, else in a folder above any of
    ``search_from`` (e.g. the checkpoint path inside ``ComfyUI/models/checkpoints``) or above the cwd."""
    candidates: list[Path] = []
    env = os.environ.get("CODI_COMFYUI_DIR")
    if env:
        candidates.append(Path(env).expanduser())
    for start in [*search_from, os.getcwd()]:
        start = Path(start).expanduser().resolve()
        candidates.extend([start, *start.parents])
    for folder in candidates:
        tokenizer = folder / "comfy" / "sd1_tokenizer"
        if (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file():
            return tokenizer
    return None


def is_tokenizer_dir(folder) -> bool:
    """A CLIP BPE tokenizer folder: ``vocab.json`` + ``merges.txt`` (Hub / ComfyUI), or the ``tokenizer.json`` that
    transformers 5 ``save_pretrained`` writes instead."""
    folder = Path(folder)
    return ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or \
        (folder / "tokenizer.json").is_file()


def load_clip_tokenizer(folder, *, pad_token: str | None = None):
    """A ``transformers.CLIPTokenizer`` from a folder holding ``vocab.json`` + ``merges.txt`` (note: in transformers
    5 ``CLIPTokenizer(vocab_file=..., merges_file=...)`` builds a broken tokenizer; ``from_pretrained`` works)."""
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad_token} if pad_token else {}
    tokenizer = CLIPTokenizer.from_pretrained(os.fspath(folder), local_files_only=True, **kwargs)
    tokenizer.model_max_length = TOKEN_LENGTH
    return tokenizer


def load_tokenizers(architecture: str, *, tokenizer_path=None, search_from: Iterable = ()) -> list:
    """The tokenizer(s) an architecture needs, from ``--tokenizer_path`` or ComfyUI's ``comfy/sd1_tokenizer``."""
    folder = Path(tokenizer_path) if tokenizer_path else find_comfyui_tokenizer_dir(search_from)
    if folder is None or not is_tokenizer_dir(folder):
        where = f"`{tokenizer_path}` has no vocab.json + merges.txt (or tokenizer.json)" if tokenizer_path else (
            "no `comfy/sd1_tokenizer` was found above " + ", ".join(f"`{p}`" for p in [*search_from, os.getcwd()])
            + (f" or in CODI_COMFYUI_DIR=`{os.environ['CODI_COMFYUI_DIR']}`" if os.environ.get("CODI_COMFYUI_DIR")
               else ""))
        raise CheckpointError(
            f"no CLIP tokenizer found ({where}). Provide one of: (1) --tokenizer_path <folder with vocab.json and "
            "merges.txt>, (2) a diffusers model folder (it has tokenizer/), or (3) run inside a ComfyUI tree or set "
            "CODI_COMFYUI_DIR to a ComfyUI folder (its comfy/sd1_tokenizer is used). Nothing is downloaded.")
    return [load_clip_tokenizer(folder, pad_token=spec["pad"]) for spec in TEXT_ENCODING[architecture]]
