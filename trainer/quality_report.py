#!/usr/bin/env python
"""Quality report of a trained CoDi adapter on validation pairs (standalone; ``train.py --quality_report`` runs the
same code after training).

    python trainer/quality_report.py --pretrained_model_name_or_path model.safetensors \\
        --adapter out/codi.safetensors --validation_data_dir val/photos --conditioning_data_dir val/hints \\
        --resolution 512 --steps 1,2,4 --reference_steps 50 --output_dir report/

Targets and hints are paired by basename (any image extension); captions come from ``<stem><caption_extension>``
(else ``.txt`` / ``.caption``) beside the target; both images are resized (Lanczos) to cover the resolution and
center-cropped. The adapter type, distillation grid, boundary scalings, sampler mode, task and hint preprocessing come
from the adapter file's ``codi.*`` metadata. Inpainting masks: ``--mask_data_dir`` (white = inpaint, same basenames),
else the hint's negative pixels (none in PNG hints). SR: ``--low_res_data_dir`` gives the low-res inputs shown in
the grid's first column and used for the bicubic baseline; without it the baseline is the hint itself (the ``sr``
hint is the bicubic-upsampled low-res image). Writes ``report.md``, ``quality_vs_steps.png``, ``grid.png``,
``metrics.json`` into ``--output_dir``.
"""

from __future__ import annotations

import os
import sys

# Never reach the network: every model and tokenizer comes from local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INPAINT_MASKED_VALUE = -1.0  # ccd_sampler.hints.INPAINT_MASKED_VALUE


class ReportError(ValueError):
    """Bad inputs for the quality report (message is for the user)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="quality_report.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="base checkpoint (single file or folder)")
    p.add_argument("--adapter", required=True, help="the CoDi adapter .safetensors written by the trainer")
    p.add_argument("--unet_lora", default=None,
                   help="the jointly trained UNet LoRA (kohya file); default: <adapter>_unet_lora.safetensors when "
                        "the adapter's metadata says codi.unet_lora=true")
    p.add_argument("--validation_data_dir", required=True, help="ground-truth images")
    p.add_argument("--conditioning_data_dir", required=True, help="hint images, same basenames")
    p.add_argument("--mask_data_dir", default=None, help="inpainting masks (white = inpaint), same basenames")
    p.add_argument("--low_res_data_dir", default=None, help="sr: the low-res inputs, same basenames")
    p.add_argument("--caption_extension", default=".caption")
    p.add_argument("--default_caption", default="")
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--vae", default=None)
    p.add_argument("--v_parameterization", action="store_true", default=None)
    p.add_argument("--resolution", default=None, help="W or W,H (multiples of 8); default: the base's resolution")
    p.add_argument("--steps", default="1,2,4", help="CoDi step counts, comma separated")
    p.add_argument("--reference_steps", type=int, default=None, help="also plain DDIM with the adapter (e.g. 50)")
    p.add_argument("--task", default=None, help="override codi.task from the metadata")
    p.add_argument("--cfg", type=float, default=None, help="default: codi.recommended_cfg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_pairs", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--title", default="CoDi quality report")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    try:
        args.steps = [int(v) for v in str(args.steps).split(",") if v.strip()]
    except ValueError:
        p.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    if not args.steps or min(args.steps) < 1:
        p.error("--steps needs at least one positive step count")
    if args.resolution is not None:
        try:
            parts = [int(v) for v in str(args.resolution).split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2) or any(v % 8 or v < 64 for v in parts):
            p.error(f"--resolution must be W or W,H, multiples of 8 and >= 64, got {args.resolution}")
        args.resolution = (parts[0], parts[-1])
    return args


# ------------------------------------------------------------------------------------------------ data


def _images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def _load(path: Path, mode: str = "RGB"):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError) as exc:
        raise ReportError(f"cannot read image {path}: {exc}") from None


def _fit(img, width: int, height: int, resample=None):
    """Scale to cover ``width x height`` (Lanczos by default), then center-crop."""
    from PIL import Image

    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, resample if resample is not None else Image.LANCZOS)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def _tensor(img):
    import numpy as np
    import torch

    array = np.asarray(img, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _caption(image: Path, extension: str, default: str) -> str:
    for ext in (extension, ".txt", ".caption"):
        path = image.with_suffix(ext)
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
    return default


def load_pairs(args, resolution: tuple[int, int], task: str, sr_scale: int | None = None) -> list:
    import torch
    from PIL import Image

    from trainer.quality import EvalPair

    targets = _images(Path(args.validation_data_dir))
    if not targets:
        raise ReportError(f"--validation_data_dir {args.validation_data_dir} contains no images")
    hints = _images(Path(args.conditioning_data_dir))
    missing = [n for n in targets if n not in hints]
    if missing:
        raise ReportError(f"{len(missing)} of {len(targets)} validation images have no hint in "
                          f"{args.conditioning_data_dir}: {', '.join(missing[:10])}")
    masks = _images(Path(args.mask_data_dir)) if args.mask_data_dir else {}
    low = _images(Path(args.low_res_data_dir)) if args.low_res_data_dir else {}
    width, height = resolution
    pairs = []
    for stem, path in list(targets.items())[:args.max_pairs]:
        target = _tensor(_fit(_load(path), width, height))
        hint = _tensor(_fit(_load(hints[stem]), width, height))
        mask = None
        if args.mask_data_dir:
            if stem not in masks:
                raise ReportError(f"no mask for {stem} in {args.mask_data_dir}")
            mask = (_tensor(_fit(_load(masks[stem], "L"), width, height, Image.NEAREST)) > 0.5).float()
            if task == "inpaint":  # the inpaint hint convention: -1 at masked pixels (a PNG cannot store it)
                hint = torch.where(mask.expand_as(hint) > 0.5, torch.full_like(hint, INPAINT_MASKED_VALUE), hint)
        low_res = None
        if stem in low:
            img = _load(low[stem])
            factor = max(1, round(width / img.width)) if sr_scale is None else sr_scale
            low_res = _tensor(_fit(img, max(1, width // factor), max(1, height // factor), Image.BICUBIC))
        elif args.low_res_data_dir:
            raise ReportError(f"no low-res image for {stem} in {args.low_res_data_dir}")
        pairs.append(EvalPair(target=target, hint=hint, caption=_caption(path, args.caption_extension,
                                                                         args.default_caption),
                              mask=mask, low_res=low_res, name=stem))
    return pairs


# ------------------------------------------------------------------------------------------------ models


def load_adapter(base, adapter_path, unet_lora_path=None):
    """``(adapter, codi_metadata, unet_lora_or_None)`` from an adapter file written by the trainer."""
    import ccd_sampler as cs
    from trainer.adapters import build_adapter
    from trainer.export import load_adapter_file

    tensors, metadata = load_adapter_file(adapter_path)
    codi = cs.CoDiMetadata.from_metadata(metadata)
    kwargs = {}
    if codi.adapter_type == "control-lora":
        ranks = {int(t.shape[0]) for k, t in tensors.items() if k.endswith(".down")}
        if len(ranks) != 1:
            raise ReportError(f"{adapter_path}: cannot infer the Control-LoRA rank from its '.down' factors "
                              f"(ranks found: {sorted(ranks)})")
        # export folds alpha/rank into `up`, load_exported divides it back out: alpha = rank loads it exactly
        kwargs = {"network_dim": ranks.pop(), "network_alpha": None}
    # the hint CNN's channels as saved (a pixel-space mini base may use a narrower one than ComfyUI's 16,32,96,256)
    hint_channels = tuple(int(tensors[k].shape[0]) for k in sorted(
        (k for k in tensors if k.startswith("input_hint_block.") and k.endswith(".weight")),
        key=lambda k: int(k.split(".")[1]))[:-1:2])
    if hint_channels:
        kwargs["conditioning_embedding_out_channels"] = hint_channels
    adapter = build_adapter(base.unet, codi.adapter_type, hint_downscale=base.latent_downscale, **kwargs)
    adapter.load_exported(tensors)
    adapter.requires_grad_(False).eval()

    lora = None
    if unet_lora_path is None and codi.unet_lora:
        guess = Path(adapter_path).with_name(Path(adapter_path).stem + "_unet_lora.safetensors")
        if guess.is_file():
            unet_lora_path = guess
        else:
            print(f"codi: warning: the adapter was trained with a UNet LoRA but {guess} is missing (give it with "
                  "--unet_lora); evaluating without it", file=sys.stderr)
    if unet_lora_path is not None:
        from trainer.lora import add_unet_lora

        lora_tensors, _ = load_adapter_file(unet_lora_path)
        downs = {k: t for k, t in lora_tensors.items() if k.endswith(".lora_down.weight")}
        if not downs:
            raise ReportError(f"{unet_lora_path}: no kohya lora_down weights")
        key = next(iter(downs))
        rank = int(downs[key].shape[0])
        alpha_t = lora_tensors.get(key[:-len(".lora_down.weight")] + ".alpha")
        lora = add_unet_lora(base.unet, rank, float(alpha_t) if alpha_t is not None else None)
        lora.load_kohya_state_dict(lora_tensors)
        for p in lora.parameters():
            p.requires_grad_(False)
    return adapter, codi, lora


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import ccd_sampler as cs
    from trainer.checkpoints import CheckpointError, load_base_model
    from trainer.quality import evaluate_adapter, write_report

    try:
        from ccd_sampler.metadata import read_safetensors_header

        # fail fast (before loading the base) on a missing file or one without CoDi metadata
        cs.CoDiMetadata.from_metadata(read_safetensors_header(args.adapter)[1])
        base = load_base_model(args.pretrained_model_name_or_path, v_parameterization=args.v_parameterization,
                               vae_path=args.vae, tokenizer_path=args.tokenizer_path)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        adapter, codi, _lora = load_adapter(base, args.adapter, args.unet_lora)
        for module in [base.unet, base.vae, adapter, *base.text_encoders]:
            if module is not None:
                module.to(device)
        if codi.prediction_type != base.prediction_type:
            print(f"codi: warning: the adapter was trained for {codi.prediction_type} but the base model predicts "
                  f"{base.prediction_type}", file=sys.stderr)
        task = args.task or codi.task
        resolution = args.resolution or (base.default_resolution, base.default_resolution)
        scale = codi.hint_preprocessing.get("scale")
        pairs = load_pairs(args, resolution, task, int(scale) if isinstance(scale, (int, float)) else None)
        edge_kwargs = {k: v for k, v in codi.hint_preprocessing.items() if k != "type"}
        result = evaluate_adapter(
            base, adapter, pairs, task=task, steps=args.steps, grid=codi.distill_grid,
            sampler_mode=codi.sampler_mode, boundary=codi.boundary, sigma_data=codi.sigma_data,
            timestep_scaling=codi.timestep_scaling, seed=args.seed,
            cfg=args.cfg if args.cfg is not None else codi.recommended_cfg, reference_steps=args.reference_steps,
            device=device, progress=not args.no_progress, batch_size=args.batch_size, edge_kwargs=edge_kwargs)
        result.settings["adapter_file"] = os.path.basename(str(args.adapter))
        paths = write_report(result, args.output_dir, title=args.title, extra_lines=[
            f"Adapter `{os.path.basename(str(args.adapter))}` on `{os.path.basename(str(args.pretrained_model_name_or_path))}`"
            f"; validation images `{args.validation_data_dir}`, hints `{args.conditioning_data_dir}`."])
    except (ReportError, CheckpointError, cs.MetadataError, ValueError) as exc:
        print(f"codi: error: {exc}", file=sys.stderr, flush=True)
        return 2
    for row in result.rows:
        task_metric = "" if row.task_metric is None else f"  {result.task_metric_name} {row.task_metric:.4f}"
        print(f"codi: {row.method:>16}: PSNR {row.psnr:6.2f} dB  SSIM {row.ssim:.4f}{task_metric}  NFE {row.nfe:g}  "
              f"{row.seconds_per_image:.3f} s/img")
    print(f"codi: wrote {', '.join(str(p) for p in paths.values())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
