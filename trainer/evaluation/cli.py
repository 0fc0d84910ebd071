"""``python trainer/quality_report.py``: the quality report of a trained adapter on validation pairs from folders
(``train.py --quality_report`` runs the same evaluation after training).

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

import argparse
import os
import sys
from pathlib import Path

from trainer.errors import CodiError
from trainer.evaluation.options import parse_strengths


class ReportError(CodiError):
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
    p.add_argument("--hint_start", default=None,
                   help="sr: also start the largest --steps from the bicubic upsample at these strengths (e.g. 0.5: "
                        "the last half of the steps, from alpha * bicubic + sigma * noise)")
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
    args.hint_start = parse_strengths(p, "--hint_start", args.hint_start)
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
    from trainer.data.images import images_in

    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder")
    return {p.stem: p for p in images_in(folder)}


def load_pairs(args, resolution: tuple[int, int], task: str, sr_scale: int | None = None) -> list:
    import torch
    from PIL import Image

    from ccd_sampler.hints import INPAINT_MASKED_VALUE
    from trainer.data.images import load_rgb, read_caption, resize_center_crop, to_tensor01
    from trainer.evaluation.evaluate import EvalPair

    width, height = resolution

    def fitted(path, size=resolution, mode="RGB", resample=Image.LANCZOS):
        return to_tensor01(resize_center_crop(load_rgb(path, mode), *size, resample))

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
    pairs = []
    for stem, path in list(targets.items())[:args.max_pairs]:
        target = fitted(path)
        hint = fitted(hints[stem])
        mask = None
        if args.mask_data_dir:
            if stem not in masks:
                raise ReportError(f"no mask for {stem} in {args.mask_data_dir}")
            mask = (fitted(masks[stem], mode="L", resample=Image.NEAREST) > 0.5).float()
            if task == "inpaint":  # the inpaint hint convention: -1 at masked pixels (a PNG cannot store it)
                hint = torch.where(mask.expand_as(hint) > 0.5, torch.full_like(hint, INPAINT_MASKED_VALUE), hint)
        low_res = None
        if stem in low:
            factor = max(1, round(width / load_rgb(low[stem]).width)) if sr_scale is None else sr_scale
            low_res = fitted(low[stem], (max(1, width // factor), max(1, height // factor)), resample=Image.BICUBIC)
        elif args.low_res_data_dir:
            raise ReportError(f"no low-res image for {stem} in {args.low_res_data_dir}")
        pairs.append(EvalPair(target=target, hint=hint, caption=read_caption(path, args.caption_extension,
                                                                             args.default_caption),
                              mask=mask, low_res=low_res, name=stem))
    return pairs


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result, paths = evaluate(args)
    except CodiError as exc:
        print(f"codi: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    for row in result.rows:
        task_metric = "" if row.task_metric is None else f"  {result.task_metric_name} {row.task_metric:.4f}"
        print(f"codi: {row.method:>16}: PSNR {row.psnr:6.2f} dB  SSIM {row.ssim:.4f}{task_metric}  NFE {row.nfe:g}  "
              f"{row.seconds_per_image:.3f} s/img")
    print(f"codi: wrote {', '.join(str(p) for p in paths.values())}", flush=True)
    return 0


def evaluate(args):
    """Load, score and write the report: ``(QualityResult, {"report", "plot", "grid", "metrics"} -> path)``."""
    import torch

    import ccd_sampler as cs
    from trainer.adapters.files import AdapterFileError, load_adapter
    from trainer.evaluation.evaluate import evaluate_adapter
    from trainer.evaluation.report import write_report
    from trainer.models import load_base_model

    try:  # fail fast (before loading the base) on a missing file or one without CoDi metadata
        cs.CoDiMetadata.from_metadata(cs.read_safetensors_header(args.adapter)[1])
    except ValueError as exc:
        raise AdapterFileError(f"--adapter {exc}") from None
    base = load_base_model(args.pretrained_model_name_or_path, v_parameterization=args.v_parameterization,
                           vae_path=args.vae, tokenizer_path=args.tokenizer_path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_adapter(base, args.adapter, unet_lora=args.unet_lora, flag="--adapter")
    adapter, codi = loaded.adapter, loaded.codi
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
    try:
        result = evaluate_adapter(
            base, adapter, pairs, task=task, steps=args.steps, grid=codi.distill_grid,
            sampler_mode=codi.sampler_mode, boundary=codi.boundary, sigma_data=codi.sigma_data,
            timestep_scaling=codi.timestep_scaling, seed=args.seed,
            cfg=args.cfg if args.cfg is not None else codi.recommended_cfg, reference_steps=args.reference_steps,
            device=device, progress=not args.no_progress, batch_size=args.batch_size, edge_kwargs=edge_kwargs,
            hint_start=args.hint_start)
    except ValueError as exc:  # pairs or settings the evaluation cannot use
        raise ReportError(str(exc)) from None
    result.settings["adapter_file"] = os.path.basename(str(args.adapter))
    paths = write_report(result, args.output_dir, title=args.title, extra_lines=[
        f"Adapter `{os.path.basename(str(args.adapter))}` on "
        f"`{os.path.basename(str(args.pretrained_model_name_or_path))}`; validation images "
        f"`{args.validation_data_dir}`, hints `{args.conditioning_data_dir}`."])
    return result, paths
