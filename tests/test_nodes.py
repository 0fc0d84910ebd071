"""The CoDi ComfyUI nodes in the real ComfyUI 0.3.75 (layer C), against the pure-torch sampler (one source of truth
for the math, ``docs/decisions.md``).

One module-scoped in-process ComfyUI run executes every graph (start-up and checkpoint loading are paid once):

* the one-box graph CheckpointLoaderSimple -> CLIPTextEncode x2 -> CoDiAdapterLoader -> CoDiSample -> VAEDecode ->
  SaveImage (+ SaveLatent), twice with a fresh executor (determinism);
* the same through stock nodes: ControlNetLoader + ControlNetApplyAdvanced + CoDiModelPatch + CoDiScheduler +
  CoDiSampler in SamplerCustom / SamplerCustomAdvanced, which must give CoDiSample's latent;
* graphs with bad inputs (steps 0/9, a truncated adapter, an SDXL-labelled adapter on the SD1.5 model, a LoRA whose
  keys match nothing), each a clear node error.

The pure-torch side (``ccd_sampler.sample`` over the trainer's diffusers modules loaded from the same micro SD1.5 file
and the same adapter objects that were exported) runs in the pytest process with the same start noise (ComfyUI's
``prepare_noise`` = ``torch.manual_seed(seed); randn``), the same consistency noise (seed + 1) and ComfyUI's own text
embeddings (the trainer's CLIP encoding is compared to them separately).
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import ccd_sampler as cs
from ccd_sampler.metadata import CoDiMetadata
from harness import PACK_DIRNAME, make_base_dir, run_inprocess

CKPT = "micro_sd15.safetensors"
SIZE = 64  # pixels; latents are 8x8
POSITIVE, NEGATIVE = "a photo of a red barn", "blurry"
SD15_SCALE = 0.18215  # ComfyUI LATENTs are VAE-space (process_out divides by the scale factor); ccd works scaled
CODI_NODES = ("CoDiAdapterLoader", "CoDiModelPatch", "CoDiScheduler", "CoDiSampler", "CoDiSample")

# name -> (adapter file, steps, cfg, mode, seed, lora); the sample graphs and their pure-torch twins
CASES = {
    "cn_defaults": ("codi_cn.safetensors", 0, 0.0, "auto", 42, None),       # metadata: 2 steps, cfg 1, ode
    "cn_4_ode": ("codi_cn.safetensors", 4, 1.0, "ode", 3, None),
    "cl_4_consistency_cfg": ("codi_cl.safetensors", 4, 2.5, "consistency", 7, None),
    "cl_lora_2_ode": ("codi_cl.safetensors", 2, 1.0, "ode", 11, "codi_unet_lora.safetensors"),
}
RESOLVED = {"cn_defaults": (2, 1.0, "ode")}  # what the metadata defaults resolve to


def perturb(params, seed: int, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def codi_files(tmp_path_factory, micro_sd15, sd1_tokenizer_dir, comfyui_dir):
    """A ComfyUI base dir with the micro SD1.5 checkpoint, adapters (ControlNet in models/controlnet, Control-LoRA in
    models/codi), a kohya UNet LoRA, broken/foreign files and a hint image; plus the trainer-side modules."""
    from trainer.adapters.controlnet import build_adapter
    from trainer.adapters.files import build_metadata, save_adapter
    from trainer.adapters.lora import add_unet_lora
    from trainer.models import load_base_model

    base_dir = make_base_dir(tmp_path_factory.mktemp("codi-nodes") / "base")
    models = base_dir / "models"
    for sub in ("checkpoints", "controlnet", "codi", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    (models / "checkpoints" / CKPT).symlink_to(micro_sd15.path)

    base = load_base_model(micro_sd15.path, tokenizer_path=sd1_tokenizer_dir)
    cn = build_adapter(base.unet, "controlnet")
    cl = build_adapter(base.unet, "control-lora", network_dim=4, network_alpha=8)
    perturb(cn.trainable_named_parameters(), 1)
    perturb(cl.trainable_named_parameters(), 2)

    def meta(adapter_type, codi, arch="stable-diffusion-v1"):
        return build_metadata(base_architecture=arch, adapter_type=adapter_type, title="test", codi=codi)

    cn_codi = CoDiMetadata(task="paired", adapter_type="controlnet", recommended_steps=2, recommended_cfg=1.0)
    cl_codi = CoDiMetadata(task="paired", adapter_type="control-lora", recommended_steps=4, recommended_cfg=2.5,
                           sampler_mode="consistency", guidance_mode="cfg", cfg_range=(2.0, 8.0))
    cn_state, cl_state = cn.export_state_dict(), cl.export_state_dict()
    save_adapter(models / "controlnet" / "codi_cn.safetensors", cn_state, meta("controlnet", cn_codi))
    save_adapter(models / "codi" / "codi_cl.safetensors", cl_state, meta("control-lora", cl_codi))
    # the same Control-LoRA where the stock ControlNetLoader looks
    shutil.copy(models / "codi" / "codi_cl.safetensors", models / "controlnet" / "codi_cl_stock.safetensors")
    save_adapter(models / "controlnet" / "plain_cn.safetensors", cn_state)  # no metadata: a stock file
    # an adapter of a v-prediction, zero-terminal-SNR base trained with --clip_skip 2
    zsnr_codi = CoDiMetadata(task="paired", adapter_type="controlnet", prediction_type="v_prediction",
                             zero_terminal_snr=True, clip_skip=2)
    save_adapter(models / "codi" / "codi_zsnr.safetensors", cn_state, meta("controlnet", zsnr_codi))
    save_adapter(models / "controlnet" / "sdxl_cn.safetensors", cn_state,
                 meta("controlnet", cn_codi, arch="stable-diffusion-xl-v1-base"))
    data = (models / "controlnet" / "codi_cn.safetensors").read_bytes()
    (models / "codi" / "corrupt.safetensors").write_bytes(data[: len(data) // 3])
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
               "something_else.weight": torch.zeros(2)}, str(models / "loras" / "unrelated_lora.safetensors"))

    # second base model for the UNet-LoRA case: same Control-LoRA weights, plus a trained kohya UNet LoRA
    base_lora = load_base_model(micro_sd15.path, tokenizer_path=sd1_tokenizer_dir)
    cl_on_lora = build_adapter(base_lora.unet, "control-lora", network_dim=4, network_alpha=8)
    cl_on_lora.load_exported(cl_state)
    unet_lora = add_unet_lora(base_lora.unet, 4, 2)
    perturb(unet_lora.trainable_named_parameters(), 3)
    save_adapter(models / "loras" / "codi_unet_lora.safetensors", unet_lora.export_kohya_state_dict(),
                 build_metadata(base_architecture="stable-diffusion-v1", adapter_type="lora", title="test"))

    rng = np.random.default_rng(0)
    hint = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    hint[16:48, 16:48] = 255  # some structure
    Image.fromarray(hint).save(base_dir / "input" / "hint.png")
    hint_t = torch.from_numpy(hint).float().div(255).permute(2, 0, 1).unsqueeze(0)
    return SimpleNamespace(base_dir=base_dir, base=base, base_lora=base_lora, hint=hint_t,
                           adapters={"codi_cn.safetensors": (base, cn), "codi_cl.safetensors": (base, cl),
                                     "codi_cl.safetensors+lora": (base_lora, cl_on_lora)})


# ------------------------------------------------------------------------------ sigma-space math (no ComfyUI)


def test_comfy_space_steps_equal_the_z_space_steps():
    """ccd_sampler.comfy_space: every sigma-space step is the z-space step of ccd_sampler divided by alpha_s."""
    from ccd_sampler import comfy_space as sp

    schedule = cs.NoiseSchedule.stable_diffusion()
    g = torch.Generator().manual_seed(0)
    x0_true = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    eps_out = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    xi = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    for t, s in ((980, 720), (200, 0), (40, 20), (20, 0), (1, 0), (0, 0)):
        alpha_t, sigma_t = schedule.alpha_sigma(t, like=x0_true)
        alpha_s, sigma_s = schedule.alpha_sigma(s, like=x0_true)
        z_t = alpha_t * x0_true + sigma_t * xi
        k_t, k_s = float(schedule.sigma_karras(t)), float(schedule.sigma_karras(s))
        x = z_t / alpha_t  # ComfyUI's state at sigma k_t
        # z space (ccd_sampler.sampling), with the boundary
        x0_hat, _ = cs.to_x0_eps(eps_out, z_t, alpha_t, sigma_t, "epsilon")
        f = cs.apply_boundary(z_t, x0_hat, t)
        eps = cs.eps_from_x0(z_t, f, alpha_t, sigma_t) if t > 0 else None
        # sigma space (ComfyUI EPS calculate_denoised, then the boundary)
        denoised = sp.boundary_denoised(x, x - eps_out * k_t, k_t, t)
        torch.testing.assert_close(denoised, f, rtol=1e-12, atol=1e-12)
        if t == 0:
            continue
        torch.testing.assert_close(sp.implied_eps(x, denoised, k_t), eps, rtol=1e-9, atol=1e-9)
        ode_z = cs.ode_step(f, eps, alpha_s, sigma_s)
        torch.testing.assert_close(sp.euler_step(x, denoised, k_t, k_s), ode_z / alpha_s, rtol=1e-9, atol=1e-9)
        lcm_z = cs.consistency_step(f, xi, alpha_s, sigma_s)
        torch.testing.assert_close(sp.lcm_step(denoised, xi, k_s), lcm_z / alpha_s, rtol=1e-12, atol=1e-12)
        # k-diffusion's form of the Euler step is the same step
        torch.testing.assert_close(sp.euler_step(x, denoised, k_t, k_s), x + (x - denoised) / k_t * (k_s - k_t),
                                   rtol=1e-9, atol=1e-9)
    assert sp.euler_step(x, denoised, 1.0, 0.0) is denoised and sp.lcm_step(denoised, xi, 0.0) is denoised
    # starts: pure noise -> z = xi (unit variance); img2img -> ComfyUI's latent + sigma xi
    k0 = float(schedule.sigma_karras(980))
    alpha0, _ = schedule.alpha_sigma(980)
    zero = torch.zeros_like(xi)
    torch.testing.assert_close(sp.start_latent(xi, zero, k0, True) * float(alpha0), xi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sp.start_latent(xi, zero, k0, False), xi * k0)
    torch.testing.assert_close(sp.start_latent(xi, x0_true, k0, True), x0_true + xi * k0)


# ------------------------------------------------------------------------------------------------- graphs


def _front(adapter: str | None = None) -> dict:
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": POSITIVE, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["ckpt", 1]}},
        "hint": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
    }
    if adapter:
        g["adapter"] = {"class_type": "CoDiAdapterLoader", "inputs": {"adapter_name": adapter}}
    return g


def codi_sample_graph(prefix, adapter, steps, cfg, mode, seed, lora=None, decode=True, **extra) -> dict:
    g = _front(adapter)
    model = ["ckpt", 0]
    if lora:
        g["patch"] = {"class_type": "CoDiModelPatch", "inputs": {"model": model, "boundary": "auto",
                                                                 "lora_name": lora, "lora_strength": 1.0}}
        model = ["patch", 0]
    g["sample"] = {"class_type": "CoDiSample", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["adapter", 0],
        "image": ["hint", 0], "seed": seed, "steps": steps, "cfg": cfg, "strength": 1.0, "mode": mode,
        "denoise": 1.0, "width": 0, "height": 0, "codi_info": ["adapter", 1], **extra}}
    g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}}
    if decode:
        g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
        g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    return g


def stock_graph(prefix, stock_adapter, info_adapter, steps, cfg, mode, seed, advanced=False, end="zero") -> dict:
    """Stock ControlNetLoader + ControlNetApplyAdvanced + our patch/scheduler/sampler in SamplerCustom(Advanced)."""
    g = _front(info_adapter)
    g.update({
        "cn": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": stock_adapter}},
        "apply": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn", 0], "image": ["hint", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "patch": {"class_type": "CoDiModelPatch", "inputs": {"model": ["ckpt", 0], "boundary": "auto",
                                                             "lora_name": "None", "lora_strength": 1.0,
                                                             "codi_info": ["adapter", 1]}},
        "sigmas": {"class_type": "CoDiScheduler", "inputs": {"model": ["patch", 0], "steps": steps, "grid": 0,
                                                             "end": end, "denoise": 1.0,
                                                             "codi_info": ["adapter", 1]}},
        "sampler": {"class_type": "CoDiSampler", "inputs": {"mode": mode, "noise_seed": seed + 1, "start": "codi"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
    })
    if advanced:
        g["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
        g["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["patch", 0], "positive": ["apply", 0],
                                                             "negative": ["apply", 1], "cfg": cfg}}
        g["sample"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}}
    else:
        g["sample"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["patch", 0], "add_noise": True, "noise_seed": seed, "cfg": cfg, "positive": ["apply", 0],
            "negative": ["apply", 1], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}}
    g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}}
    return g


def prompts() -> dict:
    out = {name: codi_sample_graph(name, *case) for name, case in CASES.items()}
    out["stock_cn_defaults"] = stock_graph("stock_cn_defaults", "codi_cn.safetensors", "codi_cn.safetensors", 2,
                                           1.0, "ode", 42)
    out["stock_cl_4_consistency_cfg"] = stock_graph("stock_cl_4_consistency_cfg", "codi_cl_stock.safetensors",
                                                    "codi_cl.safetensors", 4, 2.5, "consistency", 7, advanced=True)
    out["stock_cn_sigma_0"] = stock_graph("stock_cn_sigma_0", "codi_cn.safetensors", "codi_cn.safetensors", 2,
                                          1.0, "ode", 42, end="sigma_0")
    out["plain_stock_file"] = codi_sample_graph("plain", "plain_cn.safetensors", 1, 1.0, "ode", 5, decode=False)
    bad = {
        "bad_scheduler_steps_0": stock_graph("bad0", "codi_cn.safetensors", "codi_cn.safetensors", 0, 1.0, "ode", 1),
        "bad_scheduler_steps_9": stock_graph("bad9", "codi_cn.safetensors", "codi_cn.safetensors", 9, 1.0, "ode", 1),
        "bad_sample_steps_9": codi_sample_graph("bad9s", "codi_cn.safetensors", 9, 1.0, "ode", 1, decode=False),
        "bad_corrupt_adapter": codi_sample_graph("badc", "corrupt.safetensors", 2, 1.0, "ode", 1, decode=False),
        "bad_sdxl_adapter": codi_sample_graph("badx", "sdxl_cn.safetensors", 2, 1.0, "ode", 1, decode=False),
        "bad_lora": codi_sample_graph("badl", "codi_cn.safetensors", 2, 1.0, "ode", 1,
                                      lora="unrelated_lora.safetensors", decode=False),
    }
    return {**out, **bad}


INPROCESS = r'''
import json, torch
from safetensors.torch import save_file
spec = json.load(open(SPEC_PATH))
execution = env.execution

def fresh_executor():
    env.executor = execution.PromptExecutor(env.server, cache_type=execution.CacheType.CLASSIC,
                                            cache_args={"lru": 0, "ram": 0})

def run(prompt):
    res = env.run_prompt(prompt)
    errors = [{"node_type": m[1].get("node_type"), "type": m[1].get("exception_type"),
               "message": m[1].get("exception_message")} for m in res["messages"] if m[0] == "execution_error"]
    return {"valid": res["valid"], "success": res["success"], "error": res["error"],
            "node_errors": res["node_errors"], "outputs": res["outputs"], "errors": errors}

import comfy.utils
progress = []
comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, *a, **k: progress.append([value, total]))
results = {}
for name, prompt in spec["prompts"].items():
    del progress[:]
    results[name] = run(prompt)
    results[name]["progress"] = list(progress)
fresh_executor()  # nothing cached: the one-box graph again from scratch
results["cn_defaults_again"] = run(spec["rerun"])

object_info = {k: env.nodes.NODE_CLASS_MAPPINGS[k].GET_NODE_INFO_V1() for k in env.nodes.NODE_CLASS_MAPPINGS
               if k.startswith("CoDi")}

# ComfyUI's own pieces, for the pure-torch twin: text embeddings, sigmas, sigma <-> timestep round trip
model, clip, vae = env.nodes.CheckpointLoaderSimple().load_checkpoint(spec["ckpt"])[:3]
enc = env.nodes.CLIPTextEncode()
tensors = {"pos": enc.encode(clip, spec["positive"])[0][0][0].float().contiguous(),
           "neg": enc.encode(clip, spec["negative"])[0][0][0].float().contiguous()}
import importlib
pack = spec["pack"].replace(".", "_x_")  # ComfyUI's sys.modules name for a custom node folder
scheduler = importlib.import_module(pack + ".nodes.scheduler")
patched = importlib.import_module(pack + ".nodes.model_patch").patch_model(model)
schedules = {f"{steps}-{end}-{denoise}": scheduler.codi_sigmas(patched, steps, 0, end, denoise).tolist()
             for steps in (1, 2, 4, 8) for end in ("zero", "sigma_0") for denoise in (1.0, 0.5)}
direct_errors = {}
for steps in (0, 9):
    try:
        scheduler.codi_sigmas(patched, steps)
    except ValueError as e:
        direct_errors[str(steps)] = str(e)
# zero terminal SNR: ComfyUI's own zsnr model vs a plain v model patched with a zero-terminal-SNR adapter
loader = importlib.import_module(pack + ".nodes.loader")
model_patch = importlib.import_module(pack + ".nodes.model_patch")
discrete = env.nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]()
comfy_zsnr = discrete.patch(model, "v_prediction", True)[0]
plain_v = discrete.patch(model, "v_prediction", False)[0]
start = len(env.log_records)
_, info_z = loader.load_adapter("codi_zsnr.safetensors", clip)  # the SD1 CLIP at its default layer -1
clip_warnings = [r for r in env.log_records[start:] if "CLIP Set Last Layer" in r]
clip_2 = clip.clone()
clip_2.clip_layer(-2)
start = len(env.log_records)
loader.load_adapter("codi_zsnr.safetensors", clip_2)
clip_warnings_at_2 = [r for r in env.log_records[start:] if "CLIP Set Last Layer" in r]
patched_z = model_patch.patch_model(plain_v, info_z)
zsnr = {"codi": scheduler.codi_sigmas(patched_z, 4, info=info_z).tolist(),
        "comfy": comfy_zsnr.get_model_object("model_sampling").sigma(
            torch.tensor([980.0, 720.0, 460.0, 200.0])).tolist(),
        "codi_on_comfy_zsnr": scheduler.codi_sigmas(model_patch.patch_model(comfy_zsnr, info_z), 4,
                                                    info=info_z).tolist(),
        "plain_v": scheduler.codi_sigmas(model_patch.patch_model(plain_v), 4).tolist(),
        "patched_zsnr_flag": bool(getattr(patched_z.get_model_object("model_sampling"), "zsnr", False)),
        "clip_warnings": clip_warnings, "clip_warnings_at_2": clip_warnings_at_2}
ms = model.get_model_object("model_sampling")
t = torch.arange(1000, dtype=torch.float32)
back = ms.timestep(ms.sigma(t))
tensors["sigmas"] = ms.sigmas.float().contiguous()
save_file(tensors, spec["tensors_path"])
RESULT = {"results": results, "object_info": object_info, "model_config": type(model.model.model_config).__name__,
          "timestep_roundtrip_exact": bool(torch.equal(back.float(), t)),
          "timestep_980": int(ms.timestep(ms.sigma(torch.tensor([980.0])))[0]),
          "schedules": schedules, "direct_errors": direct_errors, "zsnr": zsnr,
          "log": [r for r in env.log_records if "CoDi" in r]}
'''


@pytest.fixture(scope="module")
def comfy_run(codi_files):
    spec_path = codi_files.base_dir / "spec.json"
    tensors_path = codi_files.base_dir / "comfy_tensors.safetensors"
    all_prompts = prompts()
    rerun = codi_sample_graph("cn_defaults_again", *CASES["cn_defaults"])
    spec_path.write_text(json.dumps({"prompts": all_prompts, "rerun": rerun, "ckpt": CKPT, "positive": POSITIVE,
                                     "negative": NEGATIVE, "tensors_path": str(tensors_path),
                                     "pack": str(codi_files.base_dir / "custom_nodes" / PACK_DIRNAME)}))
    run = run_inprocess(f"SPEC_PATH = {str(spec_path)!r}\n" + INPROCESS, codi_files.base_dir, timeout=900)
    assert run.result is not None, run.log[-10000:]
    return SimpleNamespace(**run.result, tensors=load_file(str(tensors_path)), log_text=run.log,
                           base_dir=codi_files.base_dir)


def _latent(comfy_run, name) -> torch.Tensor:
    res = comfy_run.results[name]
    assert res["success"], (name, res["errors"], res["node_errors"], comfy_run.log_text[-5000:])
    entry = res["outputs"]["save_latent"]["latents"][0]
    path = comfy_run.base_dir / "output" / entry["subfolder"] / entry["filename"]
    return load_file(str(path))["latent_tensor"]


def _image(comfy_run, name) -> np.ndarray:
    entry = comfy_run.results[name]["outputs"]["save"]["images"][0]
    with Image.open(comfy_run.base_dir / "output" / entry["subfolder"] / entry["filename"]) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------------------- tests


def test_nodes_are_listed_with_documented_inputs_and_outputs(comfy_run):
    info = comfy_run.object_info
    assert set(CODI_NODES) <= set(info), sorted(info)
    expect = {
        "CoDiAdapterLoader": (["adapter_name"], ["clip"], ["CONTROL_NET", "CODI_INFO"], "loaders/codi"),
        "CoDiModelPatch": (["model", "boundary", "lora_name", "lora_strength"], ["codi_info"], ["MODEL"],
                           "sampling/codi"),
        "CoDiScheduler": (["model", "steps", "grid", "end", "denoise"], ["codi_info"], ["SIGMAS"], "sampling/codi"),
        "CoDiSampler": (["mode", "noise_seed", "start"], [], ["SAMPLER"], "sampling/codi"),
        "CoDiSample": (["model", "positive", "negative", "control_net", "image", "seed", "steps", "cfg", "strength",
                        "mode", "denoise", "width", "height"], ["latent", "codi_info"], ["LATENT"], "sampling/codi"),
    }
    for node, (required, optional, outputs, category) in expect.items():
        entry = info[node]
        assert list(entry["input"]["required"]) == required, node
        assert list(entry["input"].get("optional", {})) == optional, node
        assert list(entry["output"]) == outputs, node
        assert entry["category"] == category, node
    adapters = info["CoDiAdapterLoader"]["input"]["required"]["adapter_name"][1]["options"]
    # models/codi and models/controlnet, merged
    assert {"codi_cl.safetensors", "codi_cn.safetensors", "codi_cl_stock.safetensors", "plain_cn.safetensors",
            "corrupt.safetensors"} <= set(adapters)
    steps = info["CoDiScheduler"]["input"]["required"]["steps"][1]
    assert (steps["min"], steps["max"]) == (1, 8)
    assert info["CoDiSampler"]["input"]["required"]["mode"][1]["options"] == ["ode", "consistency"]
    assert comfy_run.model_config == "SD15"


def test_codi_sample_graph_runs_and_is_deterministic(comfy_run):
    for name in CASES:
        image = _image(comfy_run, name)
        assert image.shape == (SIZE, SIZE, 3), name
        latent = _latent(comfy_run, name)
        assert latent.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latent).all(), name
    first, again = _latent(comfy_run, "cn_defaults"), _latent(comfy_run, "cn_defaults_again")
    assert torch.equal(first, again)
    assert np.array_equal(_image(comfy_run, "cn_defaults"), _image(comfy_run, "cn_defaults_again"))
    # the metadata defaults were used (steps 0 -> codi.recommended_steps, cfg 0 -> recommended, auto -> ode)
    assert any("CoDiSample: 2 steps (ode), cfg 1.0" in line for line in comfy_run.log), comfy_run.log
    assert any("CoDiSample: 4 steps (consistency), cfg 2.5" in line for line in comfy_run.log)


def test_stock_nodes_give_the_codi_sample_latent(comfy_run):
    """ControlNetLoader + ControlNetApplyAdvanced + CoDiModelPatch/Scheduler/Sampler in SamplerCustom (ode, cfg 1) and
    SamplerCustomAdvanced (Control-LoRA, consistency, cfg 2.5) reproduce CoDiSample."""
    for ours, stock in (("cn_defaults", "stock_cn_defaults"),
                        ("cl_4_consistency_cfg", "stock_cl_4_consistency_cfg")):
        diff = (_latent(comfy_run, ours) - _latent(comfy_run, stock)).abs().max().item()
        print(f"{ours}: max |CoDiSample - stock graph| = {diff:.2e}")
        assert diff <= 1e-5, (ours, diff)


def test_sigma_timestep_round_trip_is_exact(comfy_run):
    """ComfyUI's ModelSamplingDiscrete.timestep (nearest log-sigma) maps sigma(t) back to t for every t, so the
    boundary scalings see CoDi's integer grid timesteps; and its sigmas are ccd_sampler's schedule (float32)."""
    assert comfy_run.timestep_roundtrip_exact
    assert comfy_run.timestep_980 == 980
    ours = cs.NoiseSchedule.stable_diffusion().sigma_karras(torch.arange(1000))
    rel = ((comfy_run.tensors["sigmas"].double() - ours) / ours).abs().max().item()
    assert rel < 1e-6, rel


def _pure_torch_latent(codi_files, comfy_run, adapter_key, steps, cfg, mode, seed, with_adapter=True, final="x0"):
    base, adapter = codi_files.adapters[adapter_key]
    from trainer.adapters.controlnet import adapted_unet_output

    noise = torch.randn([1, 4, SIZE // 8, SIZE // 8], generator=torch.Generator().manual_seed(seed))
    cond = {"encoder_hidden_states": comfy_run.tensors["pos"], "hint": codi_files.hint}
    uncond = {"encoder_hidden_states": comfy_run.tensors["neg"], "hint": codi_files.hint} if cfg != 1.0 else None

    def denoise(z, t, c):
        return adapted_unet_output(base.unet, adapter if with_adapter else None, z, t, c)

    return cs.sample(denoise, noise, cs.codi_timesteps(steps, 50), "epsilon", mode=mode, cond=cond, uncond=uncond,
                     cfg=cfg, generator=torch.Generator().manual_seed(seed + 1), final=final)


def test_zero_terminal_snr_adapter_samples_with_comfyuis_zsnr_sigmas(comfy_run):
    """An adapter trained on the zero-terminal-SNR schedule makes the patched model sample with exactly the sigmas
    ComfyUI's own zsnr option gives (stock ModelSamplingDiscrete, zsnr on), also when the workflow did not set it;
    and those are ccd_sampler's rescaled schedule."""
    z = comfy_run.zsnr
    assert z["patched_zsnr_flag"]
    assert z["codi"][:4] == z["comfy"] and z["codi"][-1] == 0.0
    assert z["codi_on_comfy_zsnr"] == z["codi"]
    ours = cs.NoiseSchedule.from_config({"rescale_betas_zero_snr": True}).sigma_karras(
        torch.tensor([980, 720, 460, 200]))
    assert torch.allclose(torch.tensor(z["codi"][:4], dtype=torch.float64), ours, rtol=1e-4)
    assert z["plain_v"][0] < z["codi"][0]  # SD's schedule ends lower (sigma_980 ~ 14.6 vs ~46 rescaled)


def test_loader_warns_when_the_clip_layer_differs_from_the_adapters(comfy_run):
    """codi.clip_skip = 2 against a CLIP at SD1's default last layer: a warning that names the node to add; none
    once the CLIP uses layer -2."""
    assert len(comfy_run.zsnr["clip_warnings"]) == 1 and "stop_at_clip_layer = -2" in comfy_run.zsnr["clip_warnings"][0]
    assert comfy_run.zsnr["clip_warnings_at_2"] == []


def test_text_embeddings_match_the_trainer(codi_files, comfy_run):
    with torch.no_grad():
        ours = codi_files.base.encode_text([POSITIVE])["encoder_hidden_states"]
    diff = (ours - comfy_run.tensors["pos"]).abs().max().item()
    print(f"CLIP: max |trainer encode_text - ComfyUI CLIPTextEncode| = {diff:.2e}")
    assert diff < 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_pure_torch_sampler(codi_files, comfy_run, name):
    """D4: the ComfyUI graph's latent (and image) equal ccd_sampler.sample over the trainer's diffusers modules."""
    adapter, steps, cfg, mode, seed, lora = CASES[name]
    steps, cfg, mode = RESOLVED.get(name, (steps, cfg, mode))
    key = adapter + ("+lora" if lora else "")
    ours = _pure_torch_latent(codi_files, comfy_run, key, steps, cfg, mode, seed)
    comfy = _latent(comfy_run, name) * SD15_SCALE
    diff = (comfy - ours).abs().max().item()
    scale = ours.abs().max().item()
    effect = (ours - _pure_torch_latent(codi_files, comfy_run, key, steps, cfg, mode, seed, False)).abs().max().item()
    base, _ = codi_files.adapters[key]
    with torch.no_grad():
        image = base.vae.decode(ours / SD15_SCALE).sample
    image = np.clip(255.0 * (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
    pixel = int(np.abs(image.astype(int) - _image(comfy_run, name).astype(int)).max())
    print(f"{name}: max |ComfyUI - ccd_sampler| latent = {diff:.2e} (latent magnitude {scale:.2f}, adapter effect "
          f"{effect:.2e}); image max abs pixel difference = {pixel}/255")
    assert effect > 1e-2  # the adapter matters, so parity is not vacuous
    assert diff <= 5e-6 * max(1.0, scale), diff
    assert pixel <= 2, pixel


def test_file_without_codi_metadata_loads_with_defaults(comfy_run):
    res = comfy_run.results["plain_stock_file"]
    assert res["success"], res["errors"]
    assert any("plain_cn.safetensors has no codi.* metadata" in line for line in comfy_run.log)


def test_bad_inputs_are_clear_errors(comfy_run):
    r = comfy_run.results
    for name in ("bad_scheduler_steps_0", "bad_scheduler_steps_9", "bad_sample_steps_9"):
        assert not r[name]["valid"], name
        text = json.dumps(r[name]["node_errors"])
        assert "steps" in text and ("smaller than min" in text or "bigger than max" in text), (name, text)

    def error(name):
        assert r[name]["valid"] and not r[name]["success"], (name, r[name])
        (err,) = r[name]["errors"]
        return err

    err = error("bad_corrupt_adapter")
    assert err["node_type"] == "CoDiAdapterLoader" and "corrupt.safetensors" in err["message"], err
    assert "truncated" in err["message"]
    err = error("bad_sdxl_adapter")
    assert err["node_type"] == "CoDiSample", err
    assert "SDXL" in err["message"] and "SD1.x" in err["message"] and "sdxl_cn.safetensors" in err["message"], err
    err = error("bad_lora")
    assert err["node_type"] == "CoDiModelPatch", err
    assert "unrelated_lora.safetensors" in err["message"] and "0 of its 1 modules" in err["message"], err


def test_end_at_sigma_0_is_the_z0_output(codi_files, comfy_run):
    """CoDiScheduler end=sigma_0: ComfyUI's latent x = x0 + sigma(0) eps_hat is ccd_sampler's final="z0" / alpha_0."""
    ours = _pure_torch_latent(codi_files, comfy_run, "codi_cn.safetensors", 2, 1.0, "ode", 42, final="z0")
    alpha0, _ = cs.NoiseSchedule.stable_diffusion().alpha_sigma(0)
    comfy = _latent(comfy_run, "stock_cn_sigma_0") * SD15_SCALE * float(alpha0)
    diff = (comfy - ours).abs().max().item()
    assert diff <= 5e-6 * max(1.0, ours.abs().max().item()), diff
    clean = _latent(comfy_run, "stock_cn_defaults") * SD15_SCALE
    assert (clean - comfy).abs().max().item() > 1e-3  # the option changes the output


def test_scheduler_sigmas_follow_the_codi_grid(comfy_run):
    schedule = cs.NoiseSchedule.stable_diffusion()
    assert cs.codi_timesteps(4, 50) == [980, 720, 460, 200]
    for key, got in comfy_run.schedules.items():
        steps, end, denoise = key.split("-")
        timesteps = cs.codi_timesteps(int(steps), 50)
        if float(denoise) < 1:
            timesteps = cs.img2img_timesteps(timesteps, float(denoise))
        expect = schedule.sigma_karras(torch.tensor(timesteps)).tolist()
        if end == "zero":
            expect.append(0.0)
        elif timesteps[-1] != 0:
            expect.append(schedule.sigma_karras(0).item())
        assert len(got) == len(expect), (key, got, expect)
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=0, err_msg=key)
    for steps in ("0", "9"):
        assert "steps must be an integer in 1..8" in comfy_run.direct_errors[steps]


def test_sampler_reports_progress_per_step(comfy_run):
    """The sampler's per-step callback reaches ComfyUI's progress bar (and latent previews) through SamplerCustom's
    and CoDiSample's callback: one update per step."""
    for name, steps in (("cn_4_ode", 4), ("stock_cn_defaults", 2), ("stock_cl_4_consistency_cfg", 4)):
        updates = [v for v, total in comfy_run.results[name]["progress"] if total == steps]
        assert updates == list(range(1, steps + 1)), (name, comfy_run.results[name]["progress"])
