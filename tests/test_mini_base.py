"""The miniature reproduction's base: the pretraining script writes a pixel-space "base bundle"
(``trainer/models/bundle.py``) that ``load_base_model`` loads and the trainer distills adapters from; the script resumes
exactly. Tiny step counts, real photos (scikit-image / scikit-learn), CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "mini"))

import pretrain_base  # noqa: E402

TINY = ["--batch_size", "2", "--num_samples", "2", "--sample_steps", "2", "--no_progress", "--seed", "1"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mini") / "base"
    pretrain_base.main(["--steps", "3", "--out", str(out), *TINY])
    return out


@pytest.fixture(scope="module")
def photos64(tmp_path_factory) -> Path:
    from skimage import data

    root = tmp_path_factory.mktemp("photos64")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((64, 64), Image.LANCZOS).save(root / f"{name}.png")
    return root


def test_bundle_files_and_split(bundle):
    manifest = json.loads((bundle / "codi_base.json").read_text())
    assert manifest["format"] == "codi-base-bundle" and manifest["version"] == 1
    assert manifest["vae"] is None and manifest["text_encoder"] is None
    assert manifest["scheduler"] == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                     "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": False}
    split = json.loads((bundle / "split.json").read_text())
    assert split["train"] and split["test"] and not set(split["train"]) & set(split["test"])
    # the stereo pair is one group: both views on the same side of the split
    assert ("motorcycle_left" in split["test"]) == ("motorcycle_right" in split["test"])
    log = json.loads((bundle / "pretrain_log.json").read_text())
    assert log["seed"] == 1 and log["steps"] == 3 and len(log["losses"]) == 3
    weights = bundle / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 20e6 and log["weights_bytes"] == weights.stat().st_size
    assert Image.open(bundle / "samples.png").size[0] > 64


def test_fine_tune_to_v_prediction_zero_terminal_snr_and_unit_variance(bundle, tmp_path):
    """``--init_from`` continues from a bundle's UNet; the new bundle records v-prediction, the rescaled schedule and
    the data scale, and the trainer's base model and schedule follow them (alpha = 0 at t = 999)."""
    import ccd_sampler as cs
    from trainer.models import load_base_model

    out = tmp_path / "v_zsnr"
    pretrain_base.main(["--steps", "1", "--out", str(out), "--init_from", str(bundle), "--prediction_type",
                        "v_prediction", "--zero_terminal_snr", "--data_scale", "2.0", "--save_dtype", "float16",
                        "--modelspec_architecture", "codi-mini-pixel-v2", *TINY])
    base = load_base_model(out)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (out / weights).stat().st_size < 0.55 * (bundle / weights).stat().st_size  # stored in float16 ...
    assert base.unet.dtype == torch.float32 and base.modelspec_architecture == "codi-mini-pixel-v2"  # ... read as fp32
    assert base.prediction_type == "v_prediction" and base.vae_scaling_factor == 2.0
    assert base.scheduler["rescale_betas_zero_snr"] is True
    schedule = cs.NoiseSchedule.from_config(base.scheduler)
    assert schedule.zero_terminal_snr and float(schedule.alpha_sigma(999)[0]) == 0.0
    # decoding a pixel-space bundle undoes the data scale
    assert torch.equal(base.decode_latents(torch.full((1, 3, 8, 8), 2.0)), torch.ones(1, 3, 8, 8))
    log = json.loads((out / "pretrain_log.json").read_text())
    assert (log["prediction_type"], log["zero_terminal_snr"], log["data_scale"], log["init_from"]) == \
        ("v_prediction", True, 2.0, "base")
    with pytest.raises(SystemExit):  # epsilon cannot predict anything at alpha = 0
        pretrain_base.main(["--steps", "1", "--out", str(tmp_path / "bad"), "--zero_terminal_snr", *TINY])


def test_load_base_model_reads_the_bundle(bundle):
    from trainer.models import load_base_model, model_hash

    base = load_base_model(bundle)
    assert (base.architecture, base.prediction_type, base.modelspec_architecture) == \
        ("mini-pixel", "epsilon", "codi-mini-pixel-v1")
    assert base.vae is None and base.text_encoders == [] and base.default_resolution == 64
    assert base.latent_downscale == 1 and base.vae_scaling_factor == 1.0
    assert base.unet.config.in_channels == 3 and not base.unet.training
    text = base.encode_text(["a photo", "another"])
    assert text["encoder_hidden_states"].shape == (2, 1, 8) and not text["encoder_hidden_states"].any()
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(base.decode_latents(pixels), pixels)
    assert len(model_hash(bundle)) == 64


def test_pixel_space_encode_and_cache_are_identity():
    from trainer.data.caches import encode_latents, vae_moments

    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(encode_latents(None, pixels, [0, 1], seed=3, scaling_factor=1.0), pixels)
    mean, std = vae_moments(None, pixels)
    assert torch.equal(mean, pixels) and not std.any()


@pytest.mark.parametrize("channels", [(16, 32, 96, 256), (16, 32)])
def test_pixel_space_adapter_keeps_the_hint_resolution(bundle, channels):
    from trainer.adapters.controlnet import adapted_unet_output, build_adapter
    from trainer.models import load_base_model

    base = load_base_model(bundle)
    adapter = build_adapter(base.unet, "controlnet", hint_downscale=base.latent_downscale,
                            conditioning_embedding_out_channels=channels)
    z, hint = torch.randn(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    cond = {"encoder_hidden_states": base.encode_text([""])["encoder_hidden_states"], "hint": hint}
    t = torch.tensor([500])
    with torch.no_grad():  # zero convs: base + adapter == base at init
        assert torch.equal(adapted_unet_output(base.unet, adapter, z, t, cond),
                           adapted_unet_output(base.unet, None, z, t, cond))
    with pytest.raises(ValueError, match="1x the latent size"):
        adapter(z, t, cond["encoder_hidden_states"], torch.rand(1, 3, 512, 512))
    fresh = build_adapter(base.unet, "controlnet", hint_downscale=1, conditioning_embedding_out_channels=channels)
    fresh.load_exported(adapter.export_state_dict())
    with pytest.raises(ValueError, match="power of two"):
        build_adapter(base.unet, "controlnet", hint_downscale=3)


def test_trainer_distills_an_sr_adapter_from_the_bundle(bundle, photos64, tmp_path):
    from trainer.training.main import main as train_main

    out = tmp_path / "out"
    code = train_main(["--pretrained_model_name_or_path", str(bundle), "--train_data_dir", str(photos64),
                       "--task", "sr", "--sr_scale", "4", "--resolution", "64", "--validation_split", "0.25",
                       "--max_train_steps", "2", "--train_batch_size", "2", "--adapter_type", "controlnet",
                       "--cache_latents", "--quality_report", "--quality_report_steps", "1,2",
                       "--quality_reference_steps", "2", "--quality_hint_start", "0.5", "--output_dir", str(out),
                       "--output_name", "sr", "--save_precision", "float", "--seed", "5"])
    assert code == 0
    with safe_open(str(out / "sr.safetensors"), "pt") as fh:
        metadata = fh.metadata()
        assert "input_hint_block.0.weight" in fh.keys()
    assert metadata["modelspec.architecture"] == "codi-mini-pixel-v1/codi-controlnet"
    assert metadata["codi.task"] == "sr" and metadata["ss_steps"] == "2"
    report = (out / "sr-report" / "report.md").read_text()
    assert "CoDi 1 step" in report and "DDIM 2 steps" in report and "bicubic" in report
    assert "| CoDi 2, bicubic start 0.5 |" in report
    metrics = json.loads((out / "sr-report" / "metrics.json").read_text())
    assert metrics


@pytest.mark.parametrize("flags, message", [
    (["--task", "sr", "--quality_hint_start", "1.5"], "--quality_hint_start takes strengths in (0, 1]"),
    (["--task", "sr", "--quality_hint_start", "half"], "--quality_hint_start takes strengths in (0, 1]"),
    (["--task", "inpaint", "--quality_hint_start", "0.5"], "it needs --task sr")])
def test_quality_hint_start_flag_is_checked(flags, message, capsys):
    from trainer.training.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "model.safetensors", *flags])
    assert message in capsys.readouterr().err


def test_pretraining_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight" / "base", tmp_path / "resumed" / "base"
    pretrain_base.main(["--steps", "4", "--out", str(straight), *TINY])
    pretrain_base.main(["--steps", "2", "--out", str(resumed), *TINY])
    log = pretrain_base.main(["--steps", "4", "--out", str(resumed), "--resume", *TINY])
    assert log["steps"] == 4 and len(log["losses"]) == 4
    a = torch.load(straight.with_name("base-state") / "last.pt", weights_only=True)
    b = torch.load(resumed.with_name("base-state") / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["unet"]:
        assert torch.allclose(a["unet"][key], b["unet"][key], atol=1e-6, rtol=0), key
    weights = "unet/diffusion_pytorch_model.safetensors"
    ema_a, ema_b = load_file(str(straight / weights)), load_file(str(resumed / weights))
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-6)


def test_baseline_objectives_diffusion_then_teacher_distillation(bundle, photos64, tmp_path, capsys):
    """The benchmark's baselines train through the same trainer: ``--loss diffusion`` (a plain ControlNet fine-tune,
    recorded as codi.objective = diffusion), then LCM-style distillation of it (``--init_adapter`` +
    ``--teacher_adapter`` + ``--ode_model teacher``). With lr 0 the second run's output must be the first's weights
    exactly, which shows --init_adapter loaded them into the adapter and its EMA."""
    from trainer.adapters.files import load_adapter_file
    from trainer.training.main import main as train_main

    common = ["--pretrained_model_name_or_path", str(bundle), "--train_data_dir", str(photos64), "--task", "sr",
              "--resolution", "64", "--max_train_steps", "2", "--train_batch_size", "2", "--adapter_type",
              "controlnet", "--conditioning_embedding_channels", "16,32", "--output_dir", str(tmp_path),
              "--save_precision", "float", "--seed", "3"]
    assert train_main([*common, "--loss", "diffusion", "--output_name", "cn"]) == 0
    cn_tensors, cn_meta = load_adapter_file(tmp_path / "cn.safetensors")
    assert cn_meta["codi.objective"] == "diffusion"
    assert any(t.abs().sum() > 0 for k, t in cn_tensors.items() if "zero_convs" in k or "middle_block_out" in k)

    teacher = ["--init_adapter", str(tmp_path / "cn.safetensors"), "--teacher_adapter",
               str(tmp_path / "cn.safetensors"), "--ode_model", "teacher", "--guidance_weight", "0"]
    assert train_main([*common, *teacher, "--learning_rate", "0", "--output_name", "lcm0"]) == 0
    same, meta = load_adapter_file(tmp_path / "lcm0.safetensors")
    assert meta["codi.objective"] == "codi"
    assert same.keys() == cn_tensors.keys() and all(torch.equal(same[k], cn_tensors[k]) for k in same)
    assert train_main([*common, *teacher, "--learning_rate", "1e-3", "--output_name", "lcm"]) == 0
    moved, _ = load_adapter_file(tmp_path / "lcm.safetensors")
    assert any(not torch.equal(moved[k], cn_tensors[k]) for k in moved)

    with pytest.raises(SystemExit):
        train_main([*common, "--ode_model", "teacher", "--output_name", "x"])
    assert "--ode_model teacher needs --teacher_adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main([*common, "--init_adapter", str(tmp_path / "missing.safetensors"), "--output_name", "x"])
    assert "no such file" in capsys.readouterr().err
    # an adapter of another shape (default hint CNN widths) is refused with the flag and the file named
    assert train_main([*common, "--init_adapter", str(tmp_path / "cn.safetensors"),
                       "--conditioning_embedding_channels", "16,32,96,256", "--output_name", "x"]) == 2
    assert "--init_adapter" in capsys.readouterr().err


def test_dry_run_on_the_pixel_space_bundle(bundle, capsys):
    """--dry_run probes activations with hints at the latent size times the base's downscale (1 here, not SD's 8)."""
    from trainer.training.main import main as train_main

    assert train_main(["--pretrained_model_name_or_path", str(bundle), "--dry_run", "--resolution", "64",
                       "--adapter_type", "controlnet", "--conditioning_embedding_channels", "16,32",
                       "--train_batch_size", "2"]) == 0
    out = capsys.readouterr().out
    assert "predicted memory" in out and "activations (estimate)" in out
