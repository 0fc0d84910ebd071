"""The paths GPU users take, run on the CPU: half-precision training with samples and the quality report, SDXL's size
conditioning, a VAE that overflows in half precision, the shared timestep across processes, SD2 v-prediction and
zero-terminal-SNR checkpoints, clip skip, and the refusal of half-precision master weights. Each test failed before
the fix it pins down."""

from __future__ import annotations

import json

import pytest
import torch

import ccd_sampler as cs
from trainer.training.main import main as train_main
from trainer_helpers import base_args, read_adapter


def _prompts(tmp_path, gray_pairs) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text(f"a photo --cn {gray_pairs / 'conditions' / 'coffee.png'} --s 2 --d 5\n")
    return str(path)


@pytest.mark.parametrize("precision,adapter", [("bf16", "controlnet"), ("bf16", "control-lora"),
                                               ("fp16", "control-lora")])
def test_half_precision_training_with_samples_and_quality_report(precision, adapter, micro_sd15, gray_pairs, tmp_path,
                                                                 sd1_tokenizer_dir, capsys):
    """Under --mixed_precision the frozen base is half precision and the EMA adapter float32: the samples and the
    report must run under autocast (samples used to stop the run with "mat1 and mat2 must have the same dtype"); the
    Control-LoRA mixes both inside one module, which needs autocast on every device (fp16 on a CPU too)."""
    code = train_main(base_args(micro_sd15.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--adapter_type", adapter,
                                "--network_dim", "4", "--mixed_precision", precision, "--max_train_steps", "2",
                                "--sample_prompts", _prompts(tmp_path, gray_pairs), "--sample_every_n_steps", "1",
                                "--validation_split", "0.25", "--quality_report", "--quality_report_steps", "1"))
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "sample").iterdir()) == [
        "adapter_step00000001_00.png", "adapter_step00000002_00.png"]
    metrics = json.loads((tmp_path / "adapter-report" / "metrics.json").read_text())
    assert metrics["settings"]["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    tensors, _ = read_adapter(tmp_path / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_half_precision_master_weights_are_refused(micro_sd15, gray_pairs, tmp_path, sd1_tokenizer_dir, capsys):
    """In bf16 0.03 + 1e-5 == 0.03: --full_bf16 would lose every small update, so it stops with the reason."""
    assert torch.tensor(0.03, dtype=torch.bfloat16) + 1e-5 == torch.tensor(0.03, dtype=torch.bfloat16)
    for flag, precision in (("--full_bf16", "bf16"), ("--full_fp16", "fp16")):
        with pytest.raises(SystemExit) as exc:
            train_main(base_args(micro_sd15.path, gray_pairs, tmp_path, sd1_tokenizer_dir, flag,
                                 "--mixed_precision", precision))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and f"--mixed_precision {precision} alone" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:4 of 4 images are smaller:trainer.data.errors.DataWarning")
def test_sdxl_size_conditioning_follows_each_batch(small_sdxl, gray_pairs, tmp_path, sd1_tokenizer_dir):
    """SDXL's time ids are (original h, w, crop top, left, target h, w) of each sample, as kohya passes them, not
    the default 1024s: recorded from the UNet's own input during a run with buckets at another resolution."""
    from trainer.training import networks

    seen = []
    original = networks.adapted_unet_output

    def recording(unet, adapter, sample, timestep, cond):
        seen.append(cond["added_cond_kwargs"]["time_ids"].detach().clone())
        return original(unet, adapter, sample, timestep, cond)

    networks.adapted_unet_output = recording
    try:
        code = train_main(base_args(small_sdxl.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--max_train_steps", "1",
                                    "--resolution", "64,80", "--adapter_type", "control-lora", "--network_dim", "4"))
    finally:
        networks.adapted_unet_output = original
    assert code == 0 and seen
    # 64x64 photos covered at 80x80 and centre-cropped to 64 wide x 80 high: crop left 8
    assert all(torch.equal(ids, torch.tensor([[64.0, 64.0, 0.0, 8.0, 80.0, 64.0]], dtype=ids.dtype)) for ids in seen)


def test_dataset_size_conditioning_values(gray_pairs, tmp_path):
    from PIL import Image

    from trainer.data.dataset import build_datasets
    from trainer.data.spec import DataSettings

    folder = tmp_path / "wide"
    folder.mkdir()
    Image.open(gray_pairs / "images" / "coffee.png").resize((128, 64)).save(folder / "coffee.png")
    settings = DataSettings(train_data_dir=str(folder), task="gray", resolution=(64, 64), flip_aug=True, seed=1)
    dataset, _ = build_datasets(settings, (64, 64))
    by_flip = {}
    for epoch in range(8):
        sample = dataset.get(0, epoch)
        by_flip[sample["flip"]] = sample["size_cond"].tolist()
    # the 128x64 image is covered at 128x64 and centre-cropped to 64x64 (left 32); a flip mirrors the crop
    assert by_flip == {False: [64, 128, 0, 32, 64, 64], True: [64, 128, 0, 32, 64, 64]}


def test_vae_overflow_is_named(micro_sd15, gray_pairs, tmp_path, sd1_tokenizer_dir, capsys, monkeypatch):
    """Latents that come out of the VAE non-finite stop the run with a message that names the VAE and the flag, not
    the generic non-finite-loss advice."""
    from trainer.training import loop

    monkeypatch.setattr(loop, "encode_latents", lambda vae, pixels, *a: torch.full((pixels.shape[0], 4, 8, 8),
                                                                                     float("inf")))
    code = train_main(base_args(micro_sd15.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--max_train_steps", "1"))
    err = capsys.readouterr().err
    assert code == 3 and "--no_half_vae" in err and "VAE encoded" in err and "Traceback" not in err


def test_vae_stays_float32_where_its_config_asks(micro_sd15, gray_pairs, tmp_path, sd1_tokenizer_dir):
    from trainer.training.networks import build_networks
    from trainer.training.settings import AdapterSettings, ModelSettings

    model = ModelSettings(str(micro_sd15.path), tokenizer_path=str(sd1_tokenizer_dir))
    nets = build_networks(model, AdapterSettings(adapter_type="control-lora", network_dim=4), torch.device("cpu"),
                          torch.bfloat16)
    assert nets.base.vae.config.force_upcast and nets.base.vae.dtype == torch.float32
    assert nets.base.unet.dtype == torch.bfloat16


def test_shared_timestep_is_the_same_on_every_rank():
    """Each process seeds its noise by its rank, but one t per batch must be one t for all processes: the loss
    draws t from a generator every rank seeds alike."""
    from trainer.training.loop import step_generators

    config = cs.CoDiLossConfig()
    x = torch.zeros(2, 4)

    def model(z, t, c):
        return torch.zeros_like(z)

    draws = []
    for rank in (0, 1):
        generator, timestep_generator = step_generators(seed=3, micro_step=11, rank=rank)
        _, diag = cs.codi_loss(model, model, x, None, config, generator=generator,
                               timestep_generator=timestep_generator)
        noise = torch.randn(4, generator=step_generators(seed=3, micro_step=11, rank=rank)[0])
        draws.append((diag["t"], noise))
    assert draws[0][0] == draws[1][0], "the same t on both ranks"
    assert not torch.equal(draws[0][1], draws[1][1]), "but each rank its own noise"
    ts = {tuple(cs.codi_loss(model, model, x, None, config, generator=g, timestep_generator=tg)[1]["t"])
          for g, tg in (step_generators(seed=3, micro_step=m, rank=0) for m in range(20))}
    assert len(ts) > 5


def test_sd2_v_prediction_from_the_weights():
    """An SD2 file without any marker: the spread of the decoder LayerNorm bias ComfyUI looks at decides, and the
    reason is reported."""
    from trainer.models.single_file import SD2_V_PROBE_KEY, detect_prediction_type

    for std, expected in ((0.15, "v_prediction"), (0.03, "epsilon")):
        probe = torch.randn(1280, generator=torch.Generator().manual_seed(0))
        state = {SD2_V_PROBE_KEY: probe / probe.std(unbiased=False) * std}
        kind, why = detect_prediction_type("sd2", state, {}, None, "model.safetensors")
        assert kind == expected and "ComfyUI" in why and f"{std:.3f}" in why
    assert detect_prediction_type("sd2", {"v_pred": torch.zeros(0)}, {}, None, "m")[0] == "v_prediction"
    assert detect_prediction_type("sd1", {}, {}, True, "m") == ("v_prediction", "--v_parameterization")


def test_clip_skip_conditions_on_an_earlier_layer_and_is_recorded(micro_sd15, gray_pairs, tmp_path,
                                                                  sd1_tokenizer_dir):
    from trainer.models import load_base_model

    base = load_base_model(micro_sd15.path, tokenizer_path=sd1_tokenizer_dir)
    skip = load_base_model(micro_sd15.path, tokenizer_path=sd1_tokenizer_dir, clip_skip=2)
    plain, skipped = base.encode_text(["a cat"])["encoder_hidden_states"], skip.encode_text(["a cat"])[
        "encoder_hidden_states"]
    encoder = base.text_encoders[0]
    ids = base.tokenizers[0](["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    assert torch.allclose(skipped, expected) and not torch.allclose(plain, skipped)
    assert base.effective_clip_skip == 1 and skip.effective_clip_skip == 2
    code = train_main(base_args(micro_sd15.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--max_train_steps", "1",
                                "--clip_skip", "2"))
    assert code == 0
    _, metadata = read_adapter(tmp_path / "adapter.safetensors")
    meta = cs.CoDiMetadata.from_metadata(metadata)
    assert meta.clip_skip == 2 and meta.ema_warmup and meta.ema_decay == 0.999


def test_zero_terminal_snr_checkpoint_trains_and_is_recorded(small_sd2v, gray_pairs, tmp_path, sd1_tokenizer_dir,
                                                             capsys):
    """A v-prediction SD2 with --zero_terminal_snr trains on the rescaled schedule (finite at alpha = 0) and the
    adapter says so; an epsilon model with it is refused."""
    code = train_main(base_args(small_sd2v.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--max_train_steps", "2",
                                "--zero_terminal_snr", "--sample_prompts", _prompts(tmp_path, gray_pairs),
                                "--sample_every_n_steps", "2"))
    assert code == 0
    out = capsys.readouterr().out
    assert "zero terminal SNR" in out and "zero_terminal_snr from --zero_terminal_snr" in out
    tensors, metadata = read_adapter(tmp_path / "adapter.safetensors")
    meta = cs.CoDiMetadata.from_metadata(metadata)
    assert meta.zero_terminal_snr and meta.prediction_type == "v_prediction"
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    code = train_main(base_args(small_sd2v.path, gray_pairs, tmp_path / "eps", sd1_tokenizer_dir,
                                "--max_train_steps", "1", "--zero_terminal_snr", "--v_parameterization"))
    assert code == 0  # --v_parameterization is the override both ways; an explicit epsilon is refused:
    from trainer.models import CheckpointError, load_base_model

    with pytest.raises(CheckpointError, match="needs a v-prediction model"):
        load_base_model(small_sd2v.path, tokenizer_path=sd1_tokenizer_dir, v_parameterization=False,
                        zero_terminal_snr=True)
