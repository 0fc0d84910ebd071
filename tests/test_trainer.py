"""Layer B: the trainer end to end on random-weight checkpoints built at test time (tests/model_builders.py) and real
photos from scikit-image, on CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ccd_sampler as cs
from trainer.training.main import main as train_main
from trainer_helpers import base_args, read_adapter

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "trainer" / "train.py")


CHECKPOINTS = ["micro_sd15", "small_sd2v", "small_sdxl", "sd_diffusers_folder"]


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("adapter_type", ["controlnet", "control-lora"])
def test_train_each_checkpoint_and_adapter(checkpoint, adapter_type, request, gray_pairs, tmp_path,
                                           sd1_tokenizer_dir, capsys):
    built = request.getfixturevalue(checkpoint)
    code = train_main(base_args(built.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--adapter_type", adapter_type,
                                "--optimizer_type", "AdamW8bit", "--max_train_steps", "2", "--network_dim", "4"))
    assert code == 0
    tensors, metadata = read_adapter(tmp_path / "adapter.safetensors")
    meta = cs.CoDiMetadata.from_metadata(metadata)
    assert meta.adapter_type == adapter_type and meta.task == "gray" and meta.distill_grid == 50
    expected_prediction = "v_prediction" if checkpoint == "small_sd2v" else "epsilon"
    assert meta.prediction_type == expected_prediction
    assert metadata["modelspec.architecture"].endswith(f"/codi-{adapter_type}")
    assert metadata["ss_steps"] == "2"
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    if adapter_type == "control-lora":
        assert "lora_controlnet" in tensors and any(k.endswith(".up") for k in tensors)
    else:
        assert "zero_convs.0.0.weight" in tensors and "input_hint_block.0.weight" in tensors


def test_micro_sd15_adapters_load_in_real_comfyui(micro_sd15, gray_pairs, tmp_path, sd1_tokenizer_dir,
                                                  comfy_base_dir):
    """The stock ComfyUI loaders accept what the trainer writes: the controlnet file through
    comfy.controlnet.load_controlnet, the control-lora file through its Control-LoRA path (applied to the micro
    SD1.5 model), and every module of the UNet LoRA maps in ComfyUI's LoRA loader."""
    from harness import run_inprocess

    for adapter_type in ("controlnet", "control-lora"):
        extra = ["--adapter_type", adapter_type, "--max_train_steps", "1", "--output_name", adapter_type,
                 "--network_dim", "4"]
        if adapter_type == "control-lora":
            extra += ["--unet_lora_dim", "4"]
        assert train_main(base_args(micro_sd15.path, gray_pairs, tmp_path, sd1_tokenizer_dir, *extra)) == 0
    code = f"""
import logging, torch, comfy.sd, comfy.controlnet, comfy.lora, comfy.utils
records = []
class Grab(logging.Handler):
    def emit(self, record): records.append(record.getMessage())
logging.getLogger().addHandler(Grab()); logging.getLogger().setLevel(logging.DEBUG)
model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config({str(micro_sd15.path)!r}, output_vae=True, output_clip=True)
cn = comfy.controlnet.load_controlnet({str(tmp_path / 'controlnet.safetensors')!r})
cl = comfy.controlnet.load_controlnet({str(tmp_path / 'control-lora.safetensors')!r})
cl.pre_run(model.model, lambda p: 999.0)
lora = comfy.utils.load_torch_file({str(tmp_path / 'control-lora_unet_lora.safetensors')!r}, safe_load=True)
key_map = comfy.lora.model_lora_keys_unet(model.model, {{}})
patches = comfy.lora.load_lora(lora, key_map)
modules = {{k.rsplit('.lora_down', 1)[0] for k in lora if '.lora_down' in k}}
RESULT = {{"cn": type(cn).__name__, "cl": type(cl).__name__, "model": type(model.model.model_config).__name__,
          "missing": [r for r in records if 'missing controlnet keys' in r],
          "not_loaded": [r for r in records if 'lora key not loaded' in r],
          "modules": len(modules), "patches": len(patches)}}
"""
    result = run_inprocess(code, comfy_base_dir).result
    print(result)
    assert result["model"] == "SD15"
    assert result["cn"] == "ControlNet" and result["cl"] == "ControlLora"
    assert not result["missing"], result["missing"]
    assert result["modules"] > 0 and result["patches"] == result["modules"] and not result["not_loaded"]


def test_loss_decreases_on_tiny_overfit(small_sd2v, gray_pairs, tmp_path, sd1_tokenizer_dir, capsys):
    from trainer.training.config import parse_args
    from trainer.training.loop import train
    from trainer.training.settings import Settings

    args = parse_args(base_args(small_sd2v.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--max_train_steps", "60",
                                "--learning_rate", "1e-3", "--adapter_type", "controlnet", "--ema_decay", "0.9"))
    losses = []
    import trainer.training.loop as loop

    original = cs.codi_loss

    def recording(*a, **k):
        loss, diag = original(*a, **k)
        losses.append(float(loss.detach()))
        return loss, diag

    loop.cs.codi_loss = recording
    try:
        train(Settings.from_args(args))
    finally:
        loop.cs.codi_loss = original
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    print(f"loss: first 10 steps {first:.4f}, last 10 steps {last:.4f} ({len(losses)} steps)")
    assert last < 0.8 * first


def _run(args, env=None, **kw):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def test_resume_after_kill_matches_uninterrupted_run(small_sd2v, gray_pairs, tmp_path, sd1_tokenizer_dir):
    steps = 30
    common = ["--max_train_steps", str(steps), "--adapter_type", "control-lora", "--optimizer_type", "AdamW8bit",
              "--network_dim", "4", "--lr_warmup_steps", "3", "--lr_scheduler", "cosine"]
    straight = tmp_path / "straight"
    result = _run(base_args(small_sd2v.path, gray_pairs, straight, sd1_tokenizer_dir, *common))
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, TRAIN, *base_args(small_sd2v.path, gray_pairs, killed, sd1_tokenizer_dir,
                                                               *common, "--save_every_n_steps", "4",
                                                               "--save_state")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not list(killed.glob("adapter-step00000008-state")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    states = sorted(p for p in killed.glob("adapter-step*-state") if p.is_dir())
    assert states, "no state was saved before the kill"
    assert not (killed / "adapter.safetensors").exists(), "the run finished before it was killed"
    resume_from = states[-1]
    resumed_step = int(re.search(r"step(\d+)", resume_from.name).group(1))
    assert resumed_step < steps
    result = _run(base_args(small_sd2v.path, gray_pairs, killed, sd1_tokenizer_dir, *common, "--resume",
                            str(resume_from)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {resume_from} at step {resumed_step}" in result.stdout
    a, _ = read_adapter(straight / "adapter.safetensors")
    b, _ = read_adapter(killed / "adapter.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    print(f"resumed at step {resumed_step}/{steps}: max |difference| {worst:.3g}")
    assert worst <= 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_cpu_processes(small_sd2v, gray_pairs, tmp_path, sd1_tokenizer_dir):
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), TRAIN,
           *base_args(small_sd2v.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--max_train_steps", "3",
                      "--adapter_type", "control-lora", "--network_dim", "4", "--unet_lora_dim", "4")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "num_processes == 2" in output
    sums = re.findall(r"rank (\d)/2 trainable-weights checksum ([0-9a-f]+)", output)
    print(sums)
    assert sorted(r for r, _ in sums) == ["0", "1"]
    assert len({s for _, s in sums}) == 1, "the two ranks ended with different weights"
    assert (tmp_path / "adapter.safetensors").is_file()


def test_nan_loss_stops_and_keeps_last_good(small_sd2v, gray_pairs, tmp_path, sd1_tokenizer_dir):
    result = _run(base_args(small_sd2v.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--max_train_steps", "10",
                            "--save_every_n_steps", "2", "--adapter_type", "control-lora", "--network_dim", "4"),
                  env={"CODI_DEBUG_NAN_AT_STEP": "5"})
    print(result.stderr[-2000:])
    assert result.returncode == 3
    assert "loss is not finite at step 5" in result.stderr and "last good adapter" in result.stderr
    last_good = tmp_path / "adapter-last-good.safetensors"
    tensors, metadata = read_adapter(last_good)
    assert metadata["ss_steps"] == "4"
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert (tmp_path / "adapter-step00000004.safetensors").is_file()
    assert not (tmp_path / "adapter.safetensors").exists()


def test_dry_run_prints_counts_and_memory(micro_sd15, tmp_path, sd1_tokenizer_dir, capsys):
    code = train_main(["--pretrained_model_name_or_path", str(micro_sd15.path), "--tokenizer_path",
                       str(sd1_tokenizer_dir), "--dry_run", "--resolution", "64", "--adapter_type", "control-lora",
                       "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    assert re.search(r"[\d,]+ trainable, [\d,]+ frozen parameters", out)
    for line in ("frozen weights", "optimizer state", "EMA copy", "activations (estimate)", "total"):
        assert line in out
    assert not list(tmp_path.glob("*.safetensors"))


def test_cached_latents_and_text_match_uncached(small_sd2v, gray_pairs, tmp_path, sd1_tokenizer_dir):
    common = ["--max_train_steps", "3", "--adapter_type", "control-lora", "--network_dim", "4"]
    assert train_main(base_args(small_sd2v.path, gray_pairs, tmp_path / "plain", sd1_tokenizer_dir, *common)) == 0
    assert train_main(base_args(small_sd2v.path, gray_pairs, tmp_path / "cached", sd1_tokenizer_dir, *common,
                                "--cache_latents", "--cache_text_encoder_outputs")) == 0
    a, _ = read_adapter(tmp_path / "plain" / "adapter.safetensors")
    b, _ = read_adapter(tmp_path / "cached" / "adapter.safetensors")
    # Float rounding only: cached latents are encoded once, in another batch. The default ε-space consistency divides
    # by sigma_s, which magnifies that rounding (1.7e-5 seen; 1e-5 was the bound under x-space); a wrong cache (other
    # scaling, crop or text) changes the gradients, and 3 Adam steps at lr 1e-4 move a weight by up to 3e-4.
    assert max(float((a[k] - b[k]).abs().max()) for k in a if a[k].numel()) <= 5e-5


def test_sample_prompts_and_state_files(small_sd2v, gray_pairs, tmp_path, sd1_tokenizer_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of a cat --cn {gray_pairs / 'conditions' / 'chelsea.png'} --d 3 --s 2\n"
                       "# comment line\n")
    code = train_main(base_args(small_sd2v.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--max_train_steps", "2",
                                "--adapter_type", "control-lora", "--network_dim", "4", "--sample_prompts",
                                str(prompts), "--sample_at_first", "--sample_every_n_steps", "2",
                                "--save_state_on_train_end"))
    assert code == 0
    samples = sorted((tmp_path / "sample").glob("*.png"))
    assert [p.name for p in samples][:1] == ["adapter_step00000000_00.png"] and len(samples) >= 2
    with Image.open(samples[0]) as img:
        assert img.size == (128, 64)  # condition | sample
    state = json.loads((tmp_path / "adapter-state" / "trainer_state.json").read_text())
    assert state["step"] == 2


def test_the_codi_defaults_agree_across_flags_settings_and_loss():
    """A CoDi default lives in three places (the flag, ``CodiSettings``, ``CoDiLossConfig``); changing one changes
    what users get only if the others follow."""
    from dataclasses import MISSING, fields

    import ccd_sampler as cs
    from trainer.training.config import parse_args
    from trainer.training.settings import CodiSettings

    flags = vars(parse_args(["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "x"]))
    for f in fields(CodiSettings):
        assert f.default is MISSING or flags[f.name] == f.default, f.name
    shared = [f for f in fields(cs.CoDiLossConfig) if f.name in flags and f.name != "cfg_range"]  # None = CFG off
    assert {f.name for f in shared} >= {"consistency_space", "distill_grid", "ode_model", "guidance_weight"}
    for f in shared:
        assert flags[f.name] == f.default, f.name


def test_config_file_and_output_config(tmp_path):
    from trainer.training.config import parse_args

    toml = tmp_path / "codi.toml"
    toml.write_text('[model]\npretrained_model_name_or_path = "m.safetensors"\n[data]\ntrain_data_dir = "x"\n'
                    'resolution = 256\n[opt]\noptimizer_type = "AdamW8bit"\nlearning_rate = 2e-5\n'
                    'cfg_range = [2, 8]\nshared_timestep = false\n')
    args = parse_args(["--config_file", str(toml), "--learning_rate", "3e-5"])
    assert args.optimizer_type == "AdamW8bit" and args.learning_rate == 3e-5 and args.resolution == (256, 256)
    assert args.cfg_range == (2.0, 8.0) and args.shared_timestep is False
    out = tmp_path / "effective.toml"
    assert train_main(["--config_file", str(toml), "--output_config", str(out)]) == 0
    again = parse_args(["--config_file", str(out)])
    expected = vars(parse_args(["--config_file", str(toml)]))
    assert {k: v for k, v in vars(again).items() if k != "config_file"} == \
        {k: v for k, v in expected.items() if k != "config_file"}
    bad = tmp_path / "bad.toml"
    bad.write_text('learning_rat = 1e-4\n')
    with pytest.raises(SystemExit):
        parse_args(["--config_file", str(bad)])


def test_help_and_clear_errors(tmp_path, gray_pairs):
    result = _run(["--help"])
    assert result.returncode == 0 and "--adapter_type" in result.stdout and "kohya" in result.stdout
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    result = _run(["--pretrained_model_name_or_path", str(broken), "--train_data_dir", str(gray_pairs / "images"),
                   "--conditioning_data_dir", str(gray_pairs / "conditions"), "--output_dir", str(tmp_path)])
    assert result.returncode == 2 and "broken.safetensors" in result.stderr and "Traceback" not in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "only.png").write_bytes((gray_pairs / "images" / "chelsea.png").read_bytes())
    from trainer.data.dataset import collect_paired_items
    from trainer.data.errors import DataError

    with pytest.raises(DataError, match="1 of 1 images have no condition image.*only.png"):
        collect_paired_items(empty, gray_pairs / "conditions")


def test_bf16_mixed_precision_logging_and_pruning(small_sdxl, gray_pairs, tmp_path, sd1_tokenizer_dir):
    """The half-precision path on CPU (bf16 autocast; frozen base in bf16, trainable weights fp32), tensorboard logs
    and --save_last_n_steps pruning."""
    code = train_main(base_args(small_sdxl.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--max_train_steps", "4",
                                "--mixed_precision", "bf16", "--save_every_n_steps", "1", "--save_last_n_steps", "1",
                                "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"),
                                "--network_dim", "4", "--save_precision", "bf16"))
    assert code == 0
    tensors, metadata = read_adapter(tmp_path / "adapter.safetensors")
    assert metadata["ss_mixed_precision"] == "bf16" and metadata["codi.adapter_type"] == "control-lora"  # SDXL default
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point() and t.numel())
    kept = sorted(p.name for p in tmp_path.glob("adapter-step*.safetensors"))
    assert kept == ["adapter-step00000002.safetensors", "adapter-step00000003.safetensors"]
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_gradient_accumulation_counts_optimizer_steps(small_sd2v, gray_pairs, tmp_path, sd1_tokenizer_dir,
                                                      capsys):
    code = train_main(base_args(small_sd2v.path, gray_pairs, tmp_path, sd1_tokenizer_dir, "--max_train_steps", "2",
                                "--gradient_accumulation_steps", "2", "--adapter_type", "control-lora",
                                "--network_dim", "4", "--save_state_on_train_end"))
    assert code == 0
    _, metadata = read_adapter(tmp_path / "adapter.safetensors")
    state = json.loads((tmp_path / "adapter-state" / "trainer_state.json").read_text())
    assert metadata["ss_steps"] == "2" and state["step"] == 2 and state["micro_step"] == 4


def test_quality_report_after_training(small_sd2v, tmp_path, sd1_tokenizer_dir, gray_pairs):
    """--task sr generates the low-res hints on the fly; --validation_split holds out images; --quality_report
    scores the adapter at 1 and 2 steps next to the bicubic baseline and writes report.md, a plot and a grid."""
    out = tmp_path / "out"
    code = train_main(["--pretrained_model_name_or_path", str(small_sd2v.path), "--tokenizer_path",
                       str(sd1_tokenizer_dir), "--train_data_dir", str(gray_pairs / "images"), "--caption_extension",
                       ".txt", "--task", "sr", "--sr_scale", "4", "--resolution", "64", "--validation_split", "0.25",
                       "--max_train_steps", "2", "--adapter_type", "control-lora", "--network_dim", "4",
                       "--quality_report", "--quality_report_steps", "1,2", "--cache_text_encoder_outputs",
                       "--output_dir", str(out), "--output_name", "sr"])
    assert code == 0
    report_dir = out / "sr-report"
    text = (report_dir / "report.md").read_text()
    print(text)
    assert "CoDi 1 step" in text and "CoDi 2 steps" in text and "bicubic" in text
    for name in ("quality_vs_steps.png", "grid.png"):
        assert (report_dir / name).stat().st_size > 1000
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics
    _, metadata = read_adapter(out / "sr.safetensors")
    assert metadata["codi.task"] == "sr"
    assert json.loads(metadata["codi.hint_preprocessing"]) == {"type": "sr", "scale": 4, "upsample": "bicubic",
                                                             "antialias": False}


def test_latest_step_state_skips_incomplete_folders(tmp_path):
    """A run killed while saving leaves an incomplete state folder: resuming picks the newest complete one."""
    from trainer.training.state import STATE_FILES, latest_step_state

    assert latest_step_state(tmp_path, "run") is None
    for step, files in ((100, STATE_FILES), (200, STATE_FILES), (300, STATE_FILES[:2])):
        folder = tmp_path / f"run-step{step:08d}-state"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("x")
    (tmp_path / "other-step00000900-state").mkdir()
    assert latest_step_state(tmp_path, "run").name == "run-step00000200-state"
