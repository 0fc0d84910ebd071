"""The quality report's files: ``report.md`` (a Markdown table and what each row means), ``quality_vs_steps.png``,
``grid.png`` (labelled image grid) and ``metrics.json`` (every number, per image too)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from trainer.evaluation.evaluate import QualityResult

GRID_MIN_CELL = 128       # cells are upscaled (nearest, integer factor) until at least this wide
GRID_GAP = 2              # pixels between cells
GRID_HEADER = 16          # height of the text header row


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown_table(result: QualityResult) -> str:
    task_col = result.task_metric_name
    head = ["Steps", "Method", "PSNR (dB) ↑", "SSIM ↑"] + ([f"{task_col} ↑"] if task_col else []) + ["NFE", "s/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---"] + ["---:"] * (len(head) - 2)) + "|"]
    for r in result.rows:
        cells = ["–" if r.steps is None else str(r.steps), r.method, _fmt(r.psnr, 2), _fmt(r.ssim, 4)]
        if task_col:
            cells.append(_fmt(r.task_metric, 2 if result.task == "inpaint" else 4))
        cells += [_fmt(r.nfe, 0) if r.nfe else "0", _fmt(r.seconds_per_image, 3) if r.kind != "baseline" else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell_size(image: torch.Tensor) -> tuple[int, int]:
    """``(width, height)`` of a grid cell for images like ``image``: upscaled by the smallest integer factor that makes
    it at least :data:`GRID_MIN_CELL` wide."""
    h, w = image.shape[-2:]
    factor = max(1, math.ceil(GRID_MIN_CELL / w))
    return w * factor, h * factor


def grid_cell_size(result: QualityResult) -> tuple[int, int]:
    """``(width, height)`` of one cell of ``grid.png`` (from the first pair's size)."""
    return _cell_size(result.grid_images[0][0])


def _grid_size(cell: tuple[int, int], cols: int, rows: int, header_lines: int = 1) -> tuple[int, int]:
    cw, ch = cell
    return cols * cw + (cols - 1) * GRID_GAP, GRID_HEADER * header_lines + rows * ch + (rows - 1) * GRID_GAP


def grid_size(result: QualityResult) -> tuple[int, int]:
    """``(width, height)`` of ``grid.png``."""
    return _grid_size(grid_cell_size(result), len(result.grid_columns), len(result.grid_images))


def _to_pil(image: torch.Tensor, size):
    from PIL import Image

    array = (image.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    pil = Image.fromarray(array)
    return pil if pil.size == tuple(size) else pil.resize(tuple(size), Image.NEAREST)


def _label_lines(draw, font, label: str, width: int, lines: int) -> list[str]:
    """``label`` word-wrapped into at most ``lines`` lines of ``width`` pixels (the last one cut to fit)."""
    out, words = [], label.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and len(out) < lines - 1 and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        if len(out) == lines - 1 and words:
            line = " ".join([line, *words])
            words = []
        while len(line) > 1 and draw.textlength(line, font=font) > width:
            line = line[:-1]
        out.append(line)
    return out


def write_image_grid(labels: Sequence[str], rows: Sequence[Sequence[torch.Tensor]], path, header_lines: int = 1
                     ) -> Path:
    """A labelled grid PNG: ``rows[r][c]`` (``[3, H, W]`` in [0, 1], all of one size) under the column ``labels``,
    cells upscaled (nearest) to at least :data:`GRID_MIN_CELL` wide; labels wrap over ``header_lines`` lines."""
    from PIL import Image, ImageDraw, ImageFont

    cw, ch = cell = _cell_size(rows[0][0])
    canvas = Image.new("RGB", _grid_size(cell, len(labels), len(rows), header_lines), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, label in enumerate(labels):
        for k, line in enumerate(_label_lines(draw, font, label, cw - 4, header_lines)):
            draw.text((c * (cw + GRID_GAP) + 2, 2 + k * GRID_HEADER), line, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = GRID_HEADER * header_lines + r * (ch + GRID_GAP)
        for c, image in enumerate(row):
            canvas.paste(_to_pil(image, (cw, ch)), (c * (cw + GRID_GAP), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_grid(result: QualityResult, path) -> Path:
    return write_image_grid(result.grid_columns, result.grid_images, path)


def write_plot(result: QualityResult, path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    codi = [r for r in result.rows if r.kind == "codi"]
    extra = [r for r in result.rows if r.kind != "codi"]
    metrics = [("psnr", "PSNR (dB)"), ("ssim", "SSIM")]
    if result.task_metric_name:
        metrics.append(("task_metric", result.task_metric_name))
    fig = Figure(figsize=(4.2 * len(metrics), 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(metrics))
    styles = {"baseline": ("tab:gray", "--"), "reference": ("tab:red", ":"), "hint_start": ("tab:green", "-.")}
    xs = [r.steps for r in codi]
    for ax, (key, name) in zip(axes, metrics):
        ax.plot(xs, [getattr(r, key) for r in codi], "o-", color="tab:blue", label="CoDi")
        for r in extra:
            value = getattr(r, key)
            if value is not None and math.isfinite(value):
                colour, style = styles[r.kind]
                ax.axhline(value, color=colour, linestyle=style, label=r.method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result.task}: quality vs steps ({result.settings['num_pairs']} pairs)", fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path


def write_report(result: QualityResult, out_dir, *, title: str = "CoDi quality report",
                 extra_lines: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``quality_vs_steps.png``, ``grid.png`` and ``metrics.json`` into ``out_dir``; returns
    ``{"report", "plot", "grid", "metrics"}`` -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"plot": write_plot(result, out / "quality_vs_steps.png"), "grid": write_grid(result, out / "grid.png")}
    s, m = result.settings, result.machine
    metrics = result.to_dict()
    metrics["files"] = {"report": "report.md", "plot": paths["plot"].name, "grid": paths["grid"].name}
    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    machine = m["device"] + (f" ({m['gpu']})" if "gpu" in m else f" ({m['cpu']}, {m['torch_threads']} torch threads)")
    lines = [
        f"# {title}", "",
        f"Task **{result.task}**, {s['num_pairs']} validation pairs at {', '.join(s['resolution'])}; "
        f"adapter `{s['adapter_type']}` on a {s['architecture']} base ({s['prediction_type']}).", "",
        markdown_table(result), "",
        f"- CoDi rows: `codi_timesteps(steps, grid={s['grid']})`, sampler `{s['sampler_mode']}`, boundary scalings "
        f"{'on' if s['boundary'] else 'off'} (sigma_data {s['sigma_data']}, timestep scaling {s['timestep_scaling']}), "
        f"cfg {s['cfg']}, the same noise per pair for every row (seed {s['seed']} + pair index).",
    ]
    ref = next((r for r in result.rows if r.kind == "reference"), None)
    if ref is not None:
        ts = ref.timesteps
        shown = ", ".join(map(str, ts)) if len(ts) <= 6 else f"{ts[0]}, {ts[1]}, {ts[2]}, …, {ts[-1]}"
        lines.append(f"- {ref.method}: the same adapter sampled with plain DDIM (ODE, no boundary scalings) at "
                     f"timesteps {shown}.")
    for r in (r for r in result.rows if r.kind == "hint_start"):
        lines.append(f"- {r.method}: the same {r.steps}-step grid started from the bicubic upsample instead of "
                     f"noise (img2img: alpha·bicubic + sigma·noise at the first of the last round(strength × "
                     f"{r.steps}) grid timesteps: t = {', '.join(map(str, r.timesteps))}).")
    lines.append(f"- {s['baseline']}: the trivial baseline (no network). PSNR/SSIM on [0, 1] images (data range 1), "
                 f"averaged per image; per-image PSNR capped at {s['psnr_cap_db']:.0f} dB. SSIM: 11×11 Gaussian "
                 "window, σ 1.5.")
    if result.task == "canny":
        lines.append(f"- Edge F1: edges of output and ground truth by {s['edge_detector']}, tolerance "
                     f"{s['edge_tolerance_px']} px.")
    if result.task == "inpaint":
        lines.append("- Masked PSNR: PSNR over the pixels to inpaint (mask = 1) only.")
    lines += [f"- NFE: UNet+adapter evaluations per image; s/img: wall time per image for sampling + VAE decode "
              f"(batches of up to {s['batch_size']}, {s['dtype']}, after an untimed warm-up).",
              f"- Machine: {machine}; torch {m['torch']}, Python {m['python']}, {m['platform']}.", "",
              "![quality vs steps](quality_vs_steps.png)", "",
              f"![grid]({paths['grid'].name})", "",
              "Grid rows: " + ", ".join(result.pair_names[:len(result.grid_images)]) + "; columns: "
              + " | ".join(result.grid_columns) + "."]
    if extra_lines:
        lines += ["", *extra_lines]
    paths["report"] = out / "report.md"
    paths["report"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {k: paths[k] for k in ("report", "plot", "grid", "metrics")}
