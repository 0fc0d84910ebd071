"""The quality report (``trainer/evaluation``): metric functions on known inputs, the report end to end on the small SD2
model, and the standalone CLI once on a saved adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.evaluation import evaluate as q
from trainer.evaluation import report
from trainer.evaluation.evaluate import EvalPair, evaluate_adapter
from trainer.evaluation.metrics import canny_edge_detector, edge_f1, masked_psnr, psnr, ssim
from trainer.evaluation.report import write_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


# ------------------------------------------------------------------------------------------------ metrics


def test_psnr_identical_is_inf_or_cap_and_known_mse_follows_the_formula():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.isinf(psnr(x, x)).all()
    assert torch.equal(psnr(x, x, cap_db=q.PSNR_CAP_DB), torch.full((2,), q.PSNR_CAP_DB, dtype=torch.float64))
    y = x + 0.1  # MSE exactly 0.01 -> 20 dB (data range 1)
    assert torch.allclose(psnr(y, x), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-9)
    # per image: image 1 with MSE 0.0025 (26.02 dB), data range scales as 20 log10(range)
    y[1] = x[1] + 0.05
    assert psnr(y, x)[1].item() == pytest.approx(10 * math.log10(1 / 0.0025), abs=1e-9)
    assert psnr(y * 255, x * 255, data_range=255.0)[0].item() == pytest.approx(20.0, abs=1e-9)


def test_ssim_identical_is_one_and_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(y, x)
    assert (ours < 0.99).all()
    # the reference definition (Wang et al.'s valid-region Gaussian SSIM), as scikit-image computes it
    theirs = [structural_similarity(a.numpy(), b.numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0) for a, b in zip(y, x)]
    assert ours.tolist() == pytest.approx(theirs, abs=1e-6)


def test_masked_psnr_only_looks_at_masked_pixels():
    g = torch.Generator().manual_seed(2)
    target = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    mask[..., 4:8, 4:12] = 1
    pred = target + 0.1 * mask  # masked MSE 0.01 -> 20 dB
    assert masked_psnr(pred, target, mask)[0].item() == pytest.approx(20.0, abs=1e-9)
    changed = pred + 0.3 * (1 - mask) * torch.rand(pred.shape, generator=g, dtype=torch.float64)
    assert masked_psnr(changed, target, mask)[0].item() == pytest.approx(20.0, abs=1e-9)
    assert psnr(changed, target)[0] < psnr(pred, target)[0]  # the full-image PSNR does see it
    assert math.isnan(masked_psnr(pred, target, torch.zeros_like(mask))[0].item())


def test_edge_f1_identical_disjoint_partial():
    a = torch.zeros(1, 32, 32, dtype=torch.bool)
    a[0, 8, :] = True
    b = torch.zeros_like(a)
    b[0, 24, :] = True
    assert edge_f1(a, a).item() == 1.0
    assert edge_f1(a, b).item() == 0.0
    assert edge_f1(a, b, tolerance=0).item() == 0.0
    shifted = torch.roll(a, 1, dims=1)  # one pixel off: matched within the 1 px tolerance, not exactly
    assert edge_f1(shifted, a).item() == 1.0
    assert edge_f1(shifted, a, tolerance=0).item() == 0.0
    half = a.clone()
    half[0, 8, 16:] = False  # precision 1, recall 1/2 -> F1 2/3
    assert edge_f1(half, a, tolerance=0).item() == pytest.approx(2 / 3)
    empty = torch.zeros_like(a)
    assert edge_f1(empty, empty).item() == 1.0 and edge_f1(empty, a).item() == 0.0


def test_default_baselines():
    g = torch.Generator().manual_seed(3)
    target = torch.rand(3, 16, 16, generator=g)
    low = F.avg_pool2d(target.unsqueeze(0), 4)[0]
    sr = EvalPair(target, q.bicubic_upsample(low, (16, 16)), "", low_res=low)
    assert torch.allclose(q.default_baseline(sr, "sr"), q.bicubic_upsample(low, (16, 16)))
    mask = torch.zeros(1, 16, 16)
    mask[:, :8] = 1
    hint = target * (1 - mask) - mask  # inpaint convention: -1 at masked pixels
    filled = q.default_baseline(EvalPair(target, hint, ""), "inpaint")  # mask derived from hint < 0
    known_mean = target[:, 8:].flatten(1).mean(1)
    assert torch.allclose(filled[:, 8:], target[:, 8:])
    assert torch.allclose(filled[:, :8], known_mean.view(3, 1, 1).expand(3, 8, 16))


# ------------------------------------------------------------------------------------------------ end to end


def photos(n: int) -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee")[:n]:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        side = min(img.size)
        img = img.crop(((img.width - side) // 2, (img.height - side) // 2, (img.width + side) // 2,
                        (img.height + side) // 2)).resize((SIZE, SIZE), Image.LANCZOS)
        out.append(np.asarray(img))
    return out


def to01(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


def sr_pairs(n: int) -> list[EvalPair]:
    pairs = []
    for i, array in enumerate(photos(n)):
        target = to01(array)
        low = F.interpolate(target.unsqueeze(0), scale_factor=0.25, mode="area")[0]
        hint = q.bicubic_upsample(low, (SIZE, SIZE))
        pairs.append(EvalPair(target=target, hint=hint, caption="a photo", low_res=low, name=f"photo{i}"))
    return pairs


@pytest.fixture(scope="module")
def sd2_base(small_sd2v, sd1_tokenizer_dir):
    from trainer.models import load_base_model

    return load_base_model(small_sd2v.path, tokenizer_path=sd1_tokenizer_dir)


@pytest.fixture(scope="module")
def controlnet_adapter(sd2_base):
    from trainer.adapters.controlnet import build_adapter

    torch.manual_seed(0)
    adapter = build_adapter(sd2_base.unet, "controlnet")
    with torch.no_grad():  # zero convs start at 0 (adapter == no-op): give them weights so the hint matters
        cn = adapter.controlnet
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.02)
    return adapter.requires_grad_(False).eval()


def test_report_end_to_end(sd2_base, controlnet_adapter, tmp_path):
    pairs = sr_pairs(3)
    result = evaluate_adapter(sd2_base, controlnet_adapter, pairs, task="sr", steps=(1, 2), reference_steps=4,
                              progress=False, batch_size=2)  # batches of 2 + 1: exercises grouping
    methods = [r.method for r in result.rows]
    assert methods == ["bicubic", "CoDi 1 step", "CoDi 2 steps", "DDIM 4 steps"]
    codi1, codi2, ref = result.row("CoDi 1 step"), result.row("CoDi 2 steps"), result.row("DDIM 4 steps")
    assert (codi1.nfe, codi2.nfe, ref.nfe) == (1, 2, 4)
    assert codi2.timesteps == [980, 480] and ref.timesteps == [980, 720, 460, 200]
    for row in result.rows:
        assert len(row.per_image["psnr"]) == 3 and math.isfinite(row.psnr) and -1 <= row.ssim <= 1
        assert row.task_metric is None
    # the bicubic row is exactly the metrics of the bicubic images
    bic = torch.stack([p.hint for p in pairs])
    assert result.row("bicubic").psnr == pytest.approx(psnr(bic, torch.stack([p.target for p in pairs])).mean().item())
    assert result.row("bicubic").seconds_per_image == 0 and codi1.seconds_per_image > 0

    # deterministic: same seed -> same numbers (same noise per pair); batching does not change the result
    again = evaluate_adapter(sd2_base, controlnet_adapter, pairs[:1], task="sr", steps=(1,), progress=False)
    assert again.row("CoDi 1 step").per_image["psnr"][0] == pytest.approx(codi1.per_image["psnr"][0], abs=1e-4)

    paths = write_report(result, tmp_path / "report", extra_lines=["extra line here"])
    text = paths["report"].read_text()
    print(text)
    assert "| Steps | Method | PSNR (dB) ↑ | SSIM ↑ | NFE | s/img |" in text
    for row in result.rows:
        assert f"| {row.method} | {row.psnr:.2f} | {row.ssim:.4f} |" in text
    assert "| – | bicubic |" in text and "| 4 | DDIM 4 steps |" in text and "extra line here" in text
    for key in ("plot", "grid"):
        assert paths[key].stat().st_size > 1000
        with Image.open(paths[key]) as img:
            img.load()
            size = img.size
        if key == "grid":
            # 3 rows x 6 columns (low-res | bicubic | CoDi 1 | CoDi 2 | DDIM 4 | ground truth), 64 px -> 128 px cells
            expected = (6 * 128 + 5 * report.GRID_GAP, report.GRID_HEADER + 3 * 128 + 2 * report.GRID_GAP)
            assert size == expected == report.grid_size(result)
    metrics = json.loads(paths["metrics"].read_text())
    assert [r["method"] for r in metrics["rows"]] == methods
    assert metrics["settings"]["grid"] == 50 and metrics["machine"]["torch"] == torch.__version__


def test_sr_rows_started_from_the_bicubic_upsample(sd2_base, controlnet_adapter, tmp_path):
    """``hint_start``: the largest step count's grid started from alpha * encode(bicubic) + sigma * noise, only the
    last round(s * steps) timesteps run; equal to ``ccd_sampler.sample``'s img2img done by hand."""
    import ccd_sampler as cs
    from trainer.adapters.controlnet import adapted_unet_output, text_conditioning

    pairs = sr_pairs(1)
    result = evaluate_adapter(sd2_base, controlnet_adapter, pairs, task="sr", steps=(1, 4), hint_start=(0.5,),
                              progress=False)
    row = result.row("CoDi 4, bicubic start 0.5")
    assert (row.kind, row.timesteps, row.nfe) == ("hint_start", [460, 200], 2)
    pair = pairs[0]
    hint = pair.hint[None].float()
    _, h, w = pair.target.shape
    noise = torch.randn((sd2_base.unet.config.in_channels, h // 8, w // 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = cs.sample(lambda z, t, c: adapted_unet_output(sd2_base.unet, controlnet_adapter, z, t, c), noise[None],
                        cs.codi_timesteps(4, grid=50), sd2_base.prediction_type, schedule=sd2_base.noise_schedule(),
                        mode="ode", cond=text_conditioning(sd2_base.encode_text([pair.caption]), hint),
                        init_image=sd2_base.encode_pixels(hint * 2 - 1), strength=0.5)
        expected = (sd2_base.decode_latents(out).float() / 2 + 0.5).clamp(0, 1)[0]
    assert torch.allclose(result.images[row.method][0], expected, atol=1e-4)
    assert len(result.images) == 4 and len(result.targets) == 1  # bicubic, CoDi 1, CoDi 4, the started row
    assert "started from the bicubic upsample" in write_report(result, tmp_path)["report"].read_text()
    with pytest.raises(ValueError, match="needs a hint that is an image of the target"):
        evaluate_adapter(sd2_base, controlnet_adapter, pairs, task="canny", steps=(1,), hint_start=(0.5,))
    with pytest.raises(ValueError, match="start strength must be in"):
        evaluate_adapter(sd2_base, controlnet_adapter, pairs, task="sr", steps=(1,), hint_start=(0.0,))


def test_report_inpaint_and_canny_task_metrics(sd2_base, controlnet_adapter, tmp_path):
    target = sr_pairs(1)[0].target
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 16:48, 16:48] = 1
    inpaint = [EvalPair(target, target * (1 - mask) - mask, "a photo", mask=mask)]
    result = evaluate_adapter(sd2_base, controlnet_adapter, inpaint, task="inpaint", steps=(1,), progress=False)
    fill = result.row("mean fill")
    assert result.task_metric_name == "masked PSNR (dB)"
    assert fill.psnr > fill.task_metric  # outside the hole the mean-fill baseline is exact (capped 100 dB there)
    assert math.isfinite(result.row("CoDi 1 step").task_metric)

    detect, description = canny_edge_detector(low_threshold=50, high_threshold=150)
    edges = detect(target.unsqueeze(0))[0]
    assert edges.any() and not edges.all()
    canny = [EvalPair(target, edges.float().expand(3, SIZE, SIZE), "edges")]
    result = evaluate_adapter(sd2_base, controlnet_adapter, canny, task="canny", steps=(1,), progress=False,
                              edge_kwargs={"low_threshold": 50, "high_threshold": 150, "type": "canny"})
    assert result.task_metric_name == "edge F1" and 0 <= result.row("CoDi 1 step").task_metric <= 1
    assert result.settings["edge_detector"] == description
    from ccd_sampler.hints import canny_hint

    # the same Canny as the hint builder, with the adapter's thresholds
    assert description == "ccd_sampler.hints.canny_hint(low_threshold=50, high_threshold=150)"
    assert torch.equal(edges, canny_hint(target.unsqueeze(0), 50, 150)[0, 0] > 0.5)
    paths = write_report(result, tmp_path)
    assert "edge F1 ↑" in paths["report"].read_text()


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(small_sd2v, sd1_tokenizer_dir, sd2_base, controlnet_adapter, tmp_path, capsys):
    import ccd_sampler as cs
    from trainer.adapters import files as export

    codi = cs.CoDiMetadata(task="sr", adapter_type="controlnet", distill_grid=50, prediction_type="v_prediction",
                           recommended_steps=2, hint_preprocessing={"type": "sr", "scale": 4})
    metadata = export.build_metadata(codi=codi, base_architecture=sd2_base.modelspec_architecture,
                                     adapter_type="controlnet", title="test sr", resolution=SIZE,
                                     prediction_type=sd2_base.prediction_type)
    adapter_path = tmp_path / "codi_sr.safetensors"
    export.save_adapter(adapter_path, controlnet_adapter.export_state_dict(), metadata)

    photos_dir, hints_dir, low_dir = (tmp_path / d for d in ("photos", "hints", "low"))
    for d in (photos_dir, hints_dir, low_dir):
        d.mkdir()
    for pair in sr_pairs(2):
        for folder, image in ((photos_dir, pair.target), (hints_dir, pair.hint), (low_dir, pair.low_res)):
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(folder / f"{pair.name}.png")
        (photos_dir / f"{pair.name}.txt").write_text("a photo")

    out = tmp_path / "report"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "trainer", "quality_report.py"),
           "--pretrained_model_name_or_path", str(small_sd2v.path), "--adapter", str(adapter_path),
           "--tokenizer_path", str(sd1_tokenizer_dir), "--validation_data_dir", str(photos_dir),
           "--conditioning_data_dir", str(hints_dir), "--low_res_data_dir", str(low_dir), "--resolution", str(SIZE),
           "--steps", "1,2", "--hint_start", "0.5", "--no_progress", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CoDi 2 steps" in proc.stdout
    text = (out / "report.md").read_text()
    assert "| 1 | CoDi 1 step |" in text and "| – | bicubic |" in text and "codi_sr.safetensors" in text
    assert "| 2 | CoDi 2, bicubic start 0.5 |" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["adapter_type"] == "controlnet" and metrics["pairs"] == ["photo0", "photo1"]
    with Image.open(out / "grid.png") as img:
        assert img.size == (6 * 128 + 5 * report.GRID_GAP, report.GRID_HEADER + 2 * 128 + report.GRID_GAP)
    assert (out / "quality_vs_steps.png").stat().st_size > 1000

    # a missing adapter file: a one-line error and exit code 2, before the base model is loaded
    from trainer.evaluation.cli import main

    bad = cmd[2:5] + [str(tmp_path / "missing.safetensors")] + cmd[6:]
    assert main(bad) == 2
    assert "codi: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*cmd[2:], "--hint_start", "2"])
    assert "--hint_start takes strengths in (0, 1]" in capsys.readouterr().err
