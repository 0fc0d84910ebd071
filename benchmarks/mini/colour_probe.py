#!/usr/bin/env python
"""Where do the miniature benchmark's errors come from? A diagnostic of ``repro.py``'s trained SR adapters.

    .venv/bin/python benchmarks/mini/colour_probe.py      # after repro.py; ~2 minutes on 2 CPU cores

For the 4-step sampler of each SR model (the base alone, ControlNet with DDIM, PE-CoDi and CoDi + UNet LoRA with the
CoDi sampler), on the first ``--crops`` held-out crops with the evaluation's own conditions and starting noise:

* the split of the mean squared error into the per-image **mean colour** error (the squared difference of the
  per-channel means of output and target) and the rest (structure and texture): MSE = colour + rest exactly;
* the correlation, over images and channels (each channel centred), of the output's mean colour with the mean colour
  of the **starting noise** and with that of the **target**.

Stable Diffusion's schedule ends at alpha_980 = 0.068, so at the first step the per-channel mean of the noise
(std 1/64 for a 64x64 image) is as large as the signal's own mean colour (0.068 x ~0.3): a model that has not learned
to take the colour from the condition paints the colour that the noise implies. Each model also runs the same steps
from ``z_980 = alpha_980 * bicubic + sigma_980 * noise`` (img2img at strength 1), the kind of ``z_980`` training shows
it (``alpha x + sigma eps``), with the bicubic upsample standing in for ``x``. Writes
``benchmarks/results/mini_repro_colour_probe.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import repro  # noqa: E402

MODELS = (("base alone (DDIM)", None, "ode", False), ("ControlNet (DDIM)", "sr_controlnet", "ode", False),
          ("PE-CoDi", "sr_pe_codi", "ode", True), ("CoDi + UNet LoRA", "sr_codi_lora", "ode", True))


def colour_statistics(images, targets, noises) -> dict:
    """MSE split into mean-colour and rest (images in [0, 1], [N, 3, H, W]), and correlations of the output's
    per-channel mean with the noise's and the target's."""
    import torch

    out_mean, tgt_mean, noise_mean = (x.mean(dim=(2, 3)) for x in (images, targets, noises))
    mse = ((images - targets) ** 2).mean()
    colour = ((out_mean - tgt_mean) ** 2).mean()

    def corr(a, b):
        a, b = a - a.mean(0), b - b.mean(0)  # centre each channel over the images
        return float((a * b).sum() / (a.norm() * b.norm()))

    channels = range(out_mean.shape[1])
    return {"mse": float(mse), "mean_colour_mse": float(colour), "rest_mse": float(mse - colour),
            "colour_share": float(colour / mse), "corr_with_noise_mean": corr(out_mean, noise_mean),
            "corr_with_target_mean": corr(out_mean, tgt_mean),
            "corr_with_noise_mean_per_channel": [corr(out_mean[:, c], noise_mean[:, c]) for c in channels],
            "corr_with_target_mean_per_channel": [corr(out_mean[:, c], tgt_mean[:, c]) for c in channels],
            "output_mean_colour_std": float(out_mean.std(0).mean()),
            "target_mean_colour_std": float(tgt_mean.std(0).mean()), "psnr": float(-10 * torch.log10(mse))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=HERE / "work")
    p.add_argument("--out", type=Path, default=HERE.parents[1] / "benchmarks" / "results" /
                   "mini_repro_colour_probe.json")
    p.add_argument("--crops", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)

    import torch

    test_dir = args.work / "data" / "test"
    if not test_dir.is_dir():
        raise SystemExit(f"colour_probe: {test_dir} is missing: run benchmarks/mini/repro.py first")
    pairs = repro.evaluation_pairs("sr", test_dir, args.seed)[:args.crops]
    targets = torch.stack([p.target.float() for p in pairs])
    noises = repro.starting_noise(args.seed, range(len(pairs)))  # what repro.generate starts each crop from
    results = {"crops": len(pairs), "steps": args.steps, "models": {}}
    bicubic = torch.stack(repro.baseline_images(pairs, "sr"))
    results["models"]["bicubic"] = colour_statistics(bicubic, targets, noises)
    for label, run, mode, boundary in MODELS:
        models = repro.load_run(args.work, run)
        if models is None:
            continue
        base, adapter = models
        plan = {"steps": args.steps, "mode": mode, "boundary": boundary}
        images, _, _ = repro.generate(base, adapter, pairs, plan, args.seed, 64)
        results["models"][label] = colour_statistics(torch.stack(images), targets, noises)
        # the same steps from z_980 = alpha_980 * bicubic + sigma_980 * noise (img2img at strength 1): what training
        # shows the model at t = 980 (alpha x + sigma eps), with the bicubic upsample standing in for x
        images, _, _ = repro.generate(base, adapter, pairs, {**plan, "img2img_strength": 1.0}, args.seed, 64)
        results["models"][f"{label}, start alpha*bicubic + sigma*noise"] = colour_statistics(
            torch.stack(images), targets, noises)
    lines = ["| model | PSNR | MSE | mean-colour share of MSE | corr(output colour, noise colour) | "
             "corr(output colour, target colour) | std of output colour |", "|---|---|---|---|---|---|---|"]
    for label, r in results["models"].items():
        lines.append(f"| {label} | {r['psnr']:.2f} | {r['mse']:.4f} | {r['colour_share']:.0%} | "
                     f"{r['corr_with_noise_mean']:.2f} | {r['corr_with_target_mean']:.2f} | "
                     f"{r['output_mean_colour_std']:.3f} |")
    results["table"] = "\n".join(lines)
    args.out.write_text(json.dumps(results, indent=1))
    print(results["table"])
    print(f"colour_probe: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
