"""Base-model loading (``trainer/models``) on random-weight checkpoints built at test time (tests/model_builders.py).

Covers: architecture / prediction-type detection and overrides, exact weight round trips (builder's diffusers modules
-> ldm single file -> loader), text encoding per architecture against the reference transformers modules, UNet and VAE
forward passes, .ckpt via weights_only (and refusal of a malicious pickle), clear errors for bad files and a missing
tokenizer, --vae variants, and that the real ComfyUI detects the micro SD1.5 file as SD15.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from model_builders import BuiltCheckpoint, build_small_sd2v, unet_to_ldm, vae_to_ldm
from safetensors.torch import load_file, save_file

from trainer.models import CheckpointError, load_base_model, model_hash, single_file, tokenizers
from trainer.models import base as model_base


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute weight difference between two modules with the same keys (0.0 when bit-identical)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), sorted(set(sa) ^ set(sb))[:10]
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]  # fast path: exact equality
    return max(((sa[k].float() - sb[k].float()).abs().max().item() for k in different), default=0.0)


def assert_same_weights(model: model_base.BaseModel, built: BuiltCheckpoint) -> None:
    assert max_abs_diff(model.unet, built.unet) == 0
    assert max_abs_diff(model.vae, built.vae) == 0
    assert len(model.text_encoders) == len(built.text_encoders)
    for loaded, reference in zip(model.text_encoders, built.text_encoders):
        assert max_abs_diff(loaded, reference) == 0


def reference_text_states(arch: str, encoders: list, tokenizers: list, prompts: list[str]):
    """What each architecture conditions on, computed directly with the reference transformers modules."""
    states, pooled = [], None
    for _spec, encoder, tokenizer in zip(model_base.TEXT_ENCODING[arch], encoders, tokenizers):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        if arch == "sd1":
            states.append(out.last_hidden_state)
        elif arch == "sd2":
            states.append(encoder.final_layer_norm(out.hidden_states[-2]))
        else:
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", pooled)
    return torch.cat(states, dim=-1), pooled


def unet_forward(model: model_base.BaseModel, cond: dict, latent: int = 8) -> torch.Tensor:
    batch = cond["encoder_hidden_states"].shape[0]
    x = torch.randn(batch, model.unet.config.in_channels, latent, latent)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500] * batch), encoder_hidden_states=cond["encoder_hidden_states"],
                          added_cond_kwargs=cond.get("added_cond_kwargs")).sample


def vae_round_trip_shapes(vae, size: int = 64) -> tuple[tuple, tuple]:
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, size, size) * 2 - 1).latent_dist.sample()
        image = vae.decode(latents).sample
    return tuple(latents.shape), tuple(image.shape)


# ------------------------------------------------------------------------------------------- per architecture


def test_micro_sd15_loads_exactly(micro_sd15, sd1_tokenizer_dir):
    print(f"micro SD1.5: {micro_sd15.size_mb:.0f} MB, built in {micro_sd15.seconds:.1f} s")
    model = load_base_model(micro_sd15.path, tokenizer_path=sd1_tokenizer_dir)
    assert (model.architecture, model.prediction_type) == ("sd1", "epsilon")
    assert model.modelspec_architecture == "stable-diffusion-v1"
    assert model.default_resolution == 512 and model.vae_scaling_factor == pytest.approx(0.18215)
    assert model.scheduler == model_base.DEFAULT_SCHEDULER
    assert model.unet.config.block_out_channels == (320,) or list(model.unet.config.block_out_channels) == [320]
    assert model.unet.dtype == torch.float32 and model.text_encoders[0].dtype == torch.float32  # fp16 file upcast
    assert_same_weights(model, micro_sd15)
    assert not any(p.requires_grad for p in model.unet.parameters())

    prompts = ["a photo of a cat", "a red bicycle"]
    cond = model.encode_text(prompts)
    assert set(cond) == {"encoder_hidden_states"} and cond["encoder_hidden_states"].shape == (2, 77, 768)
    expected, _ = reference_text_states("sd1", micro_sd15.text_encoders, model.tokenizers, prompts)
    assert torch.equal(cond["encoder_hidden_states"], expected)
    assert unet_forward(model, cond).shape == (2, 4, 8, 8)
    assert vae_round_trip_shapes(model.vae) == ((1, 4, 8, 8), (1, 3, 64, 64))


def test_small_sd2v_loads_exactly(small_sd2v, sd1_tokenizer_dir):
    print(f"small SD2 v: {small_sd2v.size_mb:.1f} MB, built in {small_sd2v.seconds:.1f} s")
    model = load_base_model(small_sd2v.path, tokenizer_path=sd1_tokenizer_dir)
    assert (model.architecture, model.prediction_type) == ("sd2", "v_prediction")
    assert model.modelspec_architecture == "stable-diffusion-v2-768-v" and model.default_resolution == 768
    assert model.unet.config.use_linear_projection
    assert_same_weights(model, small_sd2v)

    prompts = ["a photo of a cat", "x"]
    cond = model.encode_text(prompts)
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)
    expected, _ = reference_text_states("sd2", small_sd2v.text_encoders, model.tokenizers, prompts)
    assert torch.equal(cond["encoder_hidden_states"], expected)
    ids = model.tokenizers[0](["x"], padding="max_length", max_length=77).input_ids[0]
    assert ids[0] == 49406 and ids[2] == 49407 and ids[3:] == [0] * 74  # OpenCLIP pads with "!" (id 0)
    assert unet_forward(model, cond).shape == (2, 4, 8, 8)
    assert vae_round_trip_shapes(model.vae) == ((1, 4, 8, 8), (1, 3, 64, 64))


def test_small_sdxl_loads_exactly(small_sdxl, sd1_tokenizer_dir):
    print(f"small SDXL: {small_sdxl.size_mb:.1f} MB, built in {small_sdxl.seconds:.1f} s")
    model = load_base_model(small_sdxl.path, tokenizer_path=sd1_tokenizer_dir)
    assert (model.architecture, model.prediction_type) == ("sdxl", "epsilon")
    assert model.modelspec_architecture == "stable-diffusion-xl-v1-base" and model.default_resolution == 1024
    assert model.vae_scaling_factor == pytest.approx(0.13025)
    assert model.unet.config.addition_embed_type == "text_time" and model.unet.config.addition_time_embed_dim == 16
    assert_same_weights(model, small_sdxl)

    prompts = ["a photo of a cat", "a red bicycle"]
    cond = model.encode_text(prompts)
    states, pooled = reference_text_states("sdxl", small_sdxl.text_encoders, model.tokenizers, prompts)
    assert cond["encoder_hidden_states"].shape == (2, 77, 128)
    assert torch.equal(cond["encoder_hidden_states"], states)
    added = cond["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 32) and torch.equal(added["text_embeds"], pooled)
    assert added["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 2
    assert model.encode_text(["a"], size=(512, 768))["added_cond_kwargs"]["time_ids"].tolist() == \
        [[512, 768, 0, 0, 512, 768]]
    assert [t.pad_token_id for t in model.tokenizers] == [49407, 0]
    assert unet_forward(model, cond).shape == (2, 4, 8, 8)


def test_diffusers_folder_loads_with_its_own_tokenizer(sd_diffusers_folder, monkeypatch, tmp_path):
    monkeypatch.delenv("CODI_COMFYUI_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ComfyUI above the cwd: the tokenizer must come from the folder
    print(f"diffusers folder: {sd_diffusers_folder.size_mb:.1f} MB, built in {sd_diffusers_folder.seconds:.1f} s")
    model = load_base_model(sd_diffusers_folder.path)
    assert (model.architecture, model.prediction_type) == ("sd1", "epsilon")
    assert model.scheduler == model_base.DEFAULT_SCHEDULER
    assert_same_weights(model, sd_diffusers_folder)
    cond = model.encode_text(["a photo of a cat"])
    assert cond["encoder_hidden_states"].shape == (1, 77, 64)
    assert unet_forward(model, cond).shape == (1, 4, 8, 8)
    unet_file = sd_diffusers_folder.path / "unet" / "diffusion_pytorch_model.safetensors"
    assert model_hash(sd_diffusers_folder.path) == hashlib.sha256(unet_file.read_bytes()).hexdigest()
    assert load_base_model(sd_diffusers_folder.path, v_parameterization=True).prediction_type == "v_prediction"


def test_tokenizer_saved_by_transformers_5_loads(sd1_tokenizer_dir, tmp_path):
    """transformers 5 ``save_pretrained`` writes tokenizer.json only (no vocab.json / merges.txt)."""
    original = tokenizers.load_clip_tokenizer(sd1_tokenizer_dir)
    original.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists() and tokenizers.is_tokenizer_dir(tmp_path)
    again = tokenizers.load_clip_tokenizer(tmp_path, pad_token="!")
    prompt = ["a photo of an astronaut riding a horse"]
    ids = again(prompt, padding="max_length", max_length=77).input_ids[0]
    expected = original(prompt, padding="max_length", max_length=77).input_ids[0]
    n = expected.index(49407) + 1
    assert ids[:n] == expected[:n] and set(ids[n:]) == {0}


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_full_size_unet_config_inferred_from_shapes(arch):
    """The ldm layout of the real full-size UNets (built on the meta device: shapes only) gives their configs."""
    from diffusers import UNet2DConditionModel

    config = single_file.standard_unet_config(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    shapes = single_file.shapes_of(unet_to_ldm(unet))
    resolution = {"sd1": 512, "sd2": 768, "sdxl": 1024}[arch]
    inferred = single_file.infer_unet_config(shapes, arch, pooled_dim=1280 if arch == "sdxl" else None,
                                             resolution=resolution)
    assert inferred == config
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    assert round(params, 1) == {"sd1": 859.5, "sd2": 865.9, "sdxl": 2567.5}[arch]


# --------------------------------------------------------------------------------------------- prediction type


def test_prediction_type_markers_and_override(small_sd2v, sd1_tokenizer_dir, tmp_path, caplog):
    load = lambda path, **kw: load_base_model(path, tokenizer_path=sd1_tokenizer_dir, **kw)  # noqa: E731
    assert load(small_sd2v.path, v_parameterization=False).prediction_type == "epsilon"
    assert load(small_sd2v.path, v_parameterization=False).modelspec_architecture == "stable-diffusion-v2-512"

    by_metadata = build_small_sd2v(tmp_path / "meta.safetensors", v_marker="metadata")
    assert load(by_metadata.path).prediction_type == "v_prediction"

    unmarked = build_small_sd2v(tmp_path / "plain.safetensors", v_marker=None)
    with caplog.at_level(logging.WARNING, logger="trainer.models.single_file"):
        model = load(unmarked.path)
    assert model.prediction_type == "epsilon" and model.default_resolution == 512
    assert "--v_parameterization" in caplog.text and "plain.safetensors" in caplog.text
    assert load(unmarked.path, v_parameterization=True).prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------------- .ckpt files


def test_ckpt_plain_state_dict_loads_with_weights_only(small_sd2v, sd1_tokenizer_dir, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(small_sd2v.path)), "global_step": 7}, path)
    model = load_base_model(path, tokenizer_path=sd1_tokenizer_dir)
    assert (model.architecture, model.prediction_type) == ("sd2", "v_prediction")
    assert_same_weights(model, small_sd2v)
    assert model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()


class _Payload:
    """Unpickling this would create ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_ckpt_with_pickled_code_is_refused_without_running_it(small_sd2v, sd1_tokenizer_dir, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    state = load_file(str(small_sd2v.path))
    torch.save({"state_dict": state, "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError) as info:
        load_base_model(path, tokenizer_path=sd1_tokenizer_dir)
    message = str(info.value)
    assert "evil.ckpt" in message and "weights_only=True" in message and "refuses" in message
    assert "Unsupported global" in message and "open" in message  # says what it refused
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- bad inputs


def _expect_error(path, *fragments, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_base_model(path, **kwargs)
    message = str(info.value)
    assert os.fspath(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_truncated_corrupt_and_empty_files_name_the_file(small_sd2v, tmp_path):
    data = small_sd2v.path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    _expect_error(truncated, "truncated")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    _expect_error(garbage, "not a safetensors file")

    renamed_pickle = tmp_path / "pickle.safetensors"
    torch.save({"a": torch.zeros(3)}, renamed_pickle)
    _expect_error(renamed_pickle, "safetensors")

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _expect_error(empty, "too short")

    empty_ckpt = tmp_path / "empty.ckpt"
    empty_ckpt.write_bytes(b"")
    _expect_error(empty_ckpt, "empty")

    broken_ckpt = tmp_path / "broken.ckpt"
    broken_ckpt.write_bytes(b"PK\x03\x04 definitely not a zip")
    _expect_error(broken_ckpt, "not a readable torch checkpoint")

    no_tensors = tmp_path / "none.safetensors"
    save_file({}, str(no_tensors))
    _expect_error(no_tensors, "no tensors")

    _expect_error(tmp_path / "missing.safetensors", "file not found")
    _expect_error(tmp_path / "missing.ckpt", "file not found")
    other = tmp_path / "model.onnx"
    other.write_bytes(b"123")
    _expect_error(other, "unsupported file type")


def test_unsupported_state_dicts_say_what_they_look_like(small_sd2v, tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{d}.weight": torch.zeros(4, 4)
               for d in ("up", "down")}, str(lora))
    _expect_error(lora, "unsupported checkpoint: found 2 tensors, no UNet keys", "LoRA")

    unknown = tmp_path / "unknown.safetensors"
    save_file({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}, str(unknown))
    _expect_error(unknown, "unknown architecture")

    unet_only = tmp_path / "unet_only.safetensors"
    state = load_file(str(small_sd2v.path))
    save_file({k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}, str(unet_only))
    _expect_error(unet_only, "no text encoder")

    broken_unet = tmp_path / "broken_unet.safetensors"
    save_file({k: v for k, v in state.items() if "middle_block.2." not in k}, str(broken_unet))
    _expect_error(broken_unet, "UNet weights do not match", "missing")

    not_a_folder = tmp_path / "some_folder"
    not_a_folder.mkdir()
    (not_a_folder / "readme.txt").write_text("hi")
    _expect_error(not_a_folder, "model_index.json")


# ------------------------------------------------------------------------------------------------ tokenizers


def test_missing_tokenizer_names_the_three_ways(small_sd2v, tmp_path, monkeypatch):
    monkeypatch.delenv("CODI_COMFYUI_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_base_model(small_sd2v.path)
    message = str(info.value)
    for fragment in ("--tokenizer_path", "diffusers", "ComfyUI", "CODI_COMFYUI_DIR", "vocab.json"):
        assert fragment in message, message
    with pytest.raises(CheckpointError, match="has no vocab.json"):
        load_base_model(small_sd2v.path, tokenizer_path=tmp_path)


def test_tokenizer_found_in_a_comfyui_tree_or_by_env(small_sd2v, sd1_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("CODI_COMFYUI_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    tree = tmp_path / "ComfyUI"
    (tree / "comfy").mkdir(parents=True)
    (tree / "comfy" / "sd1_tokenizer").symlink_to(sd1_tokenizer_dir, target_is_directory=True)
    (tree / "models" / "checkpoints").mkdir(parents=True)
    inside = tree / "models" / "checkpoints" / "model.safetensors"
    shutil.copy(small_sd2v.path, inside)
    assert load_base_model(inside).tokenizers[0].pad_token == "!"

    monkeypatch.setenv("CODI_COMFYUI_DIR", str(tree))
    assert tokenizers.find_comfyui_tokenizer_dir() == tree / "comfy" / "sd1_tokenizer"
    assert load_base_model(small_sd2v.path).architecture == "sd2"


# -------------------------------------------------------------------------------------------------- --vae


def test_separate_vae_in_every_layout(small_sd2v, sd1_tokenizer_dir, tmp_path):
    reference = small_sd2v.vae
    ldm_file = tmp_path / "vae_ldm.safetensors"  # like vae-ft-mse-840000: encoder.* / decoder.* keys
    save_file({k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm(reference).items()}, str(ldm_file))
    diffusers_file = tmp_path / "vae_diffusers.safetensors"
    save_file(reference.state_dict(), str(diffusers_file))
    folder = tmp_path / "vae_folder"
    reference.save_pretrained(str(folder))
    for source in (ldm_file, diffusers_file, folder):
        vae = single_file.load_vae(source, architecture="sd2")
        assert max_abs_diff(vae, reference) == 0, source
    model = load_base_model(small_sd2v.path, tokenizer_path=sd1_tokenizer_dir, vae_path=ldm_file)
    assert max_abs_diff(model.vae, reference) == 0
    not_a_vae = tmp_path / "not_a_vae.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(not_a_vae))
    with pytest.raises(CheckpointError, match="not_a_vae.safetensors.*not a VAE.*LoRA"):
        single_file.load_vae(not_a_vae)


def test_model_hash_is_sha256_of_the_file(small_sdxl):
    assert model_hash(small_sdxl.path) == hashlib.sha256(small_sdxl.path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ the real ComfyUI


COMFY_CHECK = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, ".")
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before comfy.model_management: the CUDA torch build aborts otherwise
    import comfy.sd, torch
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(sys.argv[1], output_vae=True, output_clip=True)[:3]
    cond = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
    image = vae.decode(torch.zeros(1, 4, 8, 8))
    print("RESULT " + json.dumps({"config": type(model.model.model_config).__name__,
                                  "model_type": model.model.model_type.name, "cond": list(cond.shape),
                                  "vae": type(vae.first_stage_model).__name__, "image": list(image.shape)}))
""")


def test_real_comfyui_detects_micro_sd15(micro_sd15):
    from harness import comfyui_dir
    from harness.comfyui import subprocess_env

    comfy = comfyui_dir()
    if not (comfy / "comfy" / "sd.py").is_file():
        pytest.skip(f"the real ComfyUI is not prepared at {comfy} (run `make comfyui`)")
    proc = subprocess.run([sys.executable, "-c", COMFY_CHECK, str(micro_sd15.path)], cwd=comfy,
                          env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result == {"config": "SD15", "model_type": "EPS", "cond": [1, 77, 768], "vae": "AutoencoderKL",
                      "image": [1, 64, 64, 3]}, log[-3000:]
    for complaint in ("Missing VAE keys", "clip missing", "left over keys"):
        assert complaint not in log, log[-5000:]
