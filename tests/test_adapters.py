"""Adapters and their export: identity at init, training-and-reload round trips, the
Control-LoRA memory sharing, the diffusers<->ldm key table, bad inputs, and acceptance by the real ComfyUI 0.3.75
(stock ControlNet loader, Control-LoRA path, kohya UNet LoRA key mapping) with numeric parity of the residuals.

Models are tiny random-weight diffusers UNets built here; the ComfyUI checks use a "micro SD1.5" UNet (model_channels
320, context 768, one level with attention, 8 heads) that ComfyUI detects as SD15.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from ccd_sampler.metadata import CoDiMetadata
from harness.comfyui import subprocess_env
from trainer.adapters.controlnet import AdapterFileError, adapted_unet_output, build_adapter
from trainer.adapters.files import build_metadata, load_adapter_file, safetensors_hash, save_adapter
from trainer.adapters.lora import LoRAConv2d, LoRALinear, add_unet_lora, inject_lora
from trainer.models import ldm_keys

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8, sample_size=8)
# three levels, two layers, per-level transformer depth, linear projections and SDXL's text_time embedding
TINY_XL = dict(block_out_channels=(32, 64, 64), layers_per_block=2,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
               attention_head_dim=4, norm_num_groups=8, sample_size=8, transformer_layers_per_block=(1, 2, 2),
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=8 * 6 + 32)
MICRO_SD15 = dict(block_out_channels=(320,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=768, attention_head_dim=8,
                  norm_num_groups=32, sample_size=8)


def make_unet(config=TINY, seed=0) -> UNet2DConditionModel:
    """A frozen base UNet, as the trainer holds it. (Frozen also matters for bit-exact comparisons: torch picks
    another, last-bit-different linear kernel for 3-D inputs when the weight requires grad, even under no_grad, and
    the adapters freeze the weights they share or wrap.)"""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval().requires_grad_(False)


def make_inputs(config=TINY, batch=2, size=8, tokens=5, seed=1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=g)
    timestep = torch.tensor([499, 20][:batch] + [300] * max(0, batch - 2))
    cond = {"encoder_hidden_states": torch.randn(batch, tokens, config["cross_attention_dim"], generator=g),
            "hint": torch.rand(batch, 3, 8 * size, 8 * size, generator=g)}
    if config.get("addition_embed_type") == "text_time":
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                     "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return sample, timestep, cond


def perturb(params, seed: int, scale: float = 0.05) -> None:
    """Simulate training: move every trainable tensor (zero-initialised ones included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@torch.no_grad()
def run(unet, adapter, inputs):
    return adapted_unet_output(unet, adapter, *inputs)


# ------------------------------------------------------------------------------------------------- key table


@pytest.mark.parametrize("config", [TINY, TINY_XL, MICRO_SD15], ids=["tiny", "tiny-xl", "micro-sd15"])
def test_ldm_table_agrees_with_diffusers_converter(config):
    """Ours diffusers->ldm, then diffusers' own ldm->diffusers converter back: identical keys and tensors."""
    unet = make_unet(config)
    state = unet.state_dict()
    ldm = ldm_keys.diffusers_unet_to_ldm(state, unet.config)
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is state[k] or torch.equal(back[k], state[k]) for k in state)
    assert ldm_keys.ldm_unet_to_diffusers(ldm, unet.config).keys() == state.keys()


def test_ldm_table_examples():
    table = ldm_keys.unet_table(make_unet(TINY_XL).config)
    assert table["down_blocks.1.resnets.1.conv1"] == "input_blocks.5.0.in_layers.2"
    assert table["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert table["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"   # attention level: .2.conv
    assert table["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert table["add_embedding.linear_2"] == "label_emb.0.2"
    assert ldm_keys.rename("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", table) == \
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight"


# ------------------------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("unet_lora", [False, True], ids=["no-unet-lora", "unet-lora"])
@pytest.mark.parametrize("adapter_type", ["controlnet", "control-lora"])
def test_base_plus_adapter_equals_base_at_init(adapter_type, unet_lora):
    """Zero convs, the zero last hint conv and zero LoRA ups add exactly 0.0: the difference is exactly 0."""
    unet = make_unet()
    inputs = make_inputs()
    reference = run(unet, None, inputs)
    if unet_lora:
        add_unet_lora(unet, 4, 2)
    adapter = build_adapter(unet, adapter_type, network_dim=4, network_alpha=2)
    assert torch.equal(run(unet, adapter, inputs), reference)
    down, mid = adapter(inputs[0], inputs[1], inputs[2]["encoder_hidden_states"], inputs[2]["hint"])
    assert all(not d.any() for d in down) and not mid.any()


def test_lora_wrappers_are_identity_at_init_and_scale_like_kohya():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3, stride=2, padding=1))
    x_lin, x_conv = torch.randn(2, 6), torch.randn(1, 3, 8, 8)
    ref = layer[0](x_lin), layer[1](x_conv)
    wrappers = inject_lora(layer, lambda name, m: True, rank=2, alpha=1)
    assert isinstance(layer[0], LoRALinear) and isinstance(layer[1], LoRAConv2d) and set(wrappers) == {"0", "1"}
    assert torch.equal(layer[0](x_lin), ref[0]) and torch.equal(layer[1](x_conv), ref[1])
    perturb([(n, p) for w in wrappers.values() for n, p in w.named_parameters() if "lora_" in n], 3)
    for w, x in ((layer[0], x_lin), (layer[1], x_conv)):
        assert w.scale == 0.5 and not w.base.weight.requires_grad
        dense = w.base.weight + w.delta_weight()  # the weight ComfyUI reconstructs from up/down
        expect = (torch.nn.functional.linear(x, dense, w.base.bias) if isinstance(w, LoRALinear) else
                  torch.nn.functional.conv2d(x, dense, w.base.bias, stride=2, padding=1))
        torch.testing.assert_close(w(x), expect, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- training and reloading


@pytest.mark.parametrize("adapter_type", ["controlnet", "control-lora"])
def test_trained_adapter_exports_and_reloads_exactly(adapter_type, tmp_path):
    unet = make_unet()
    inputs = make_inputs()
    base = run(unet, None, inputs)
    unet_lora = add_unet_lora(unet, 4, 2)
    adapter = build_adapter(unet, adapter_type, network_dim=4, network_alpha=2)
    perturb(adapter.trainable_named_parameters(), seed=1)
    perturb(unet_lora.trainable_named_parameters(), seed=2)
    trained = run(unet, adapter, inputs)
    assert (trained - base).abs().max() > 1e-3

    meta = build_metadata(base_architecture="stable-diffusion-v1", adapter_type=adapter_type, title="t",
                          codi=CoDiMetadata(task="sr", adapter_type=adapter_type), provenance={"ss_steps": "3"})
    path, lora_path = tmp_path / "adapter.safetensors", tmp_path / "unet_lora.safetensors"
    save_adapter(path, adapter.export_state_dict(), meta)
    save_adapter(lora_path, unet_lora.export_kohya_state_dict(),
                 build_metadata(base_architecture="stable-diffusion-v1", adapter_type="lora", title="t"))
    tensors, metadata = load_adapter_file(path)
    assert metadata["modelspec.architecture"] == f"stable-diffusion-v1/codi-{adapter_type}"
    assert metadata["codi.task"] == "sr" and metadata["ss_steps"] == "3"
    assert CoDiMetadata.from_metadata(metadata).adapter_type == adapter_type
    assert metadata["modelspec.hash_sha256"] == safetensors_hash(tensors)
    save_adapter(tmp_path / "half.safetensors", adapter.export_state_dict(), meta, dtype="fp16")
    half, half_meta = load_adapter_file(tmp_path / "half.safetensors")
    assert {t.dtype for t in half.values()} == {torch.float16} and half.keys() == tensors.keys()
    assert half_meta["modelspec.hash_sha256"] != metadata["modelspec.hash_sha256"]

    fresh_unet = make_unet()  # the other order (adapter, then UNet LoRA) gives the same model
    fresh = build_adapter(fresh_unet, adapter_type, network_dim=4, network_alpha=2)
    fresh_lora = add_unet_lora(fresh_unet, 4, 2)
    fresh.load_exported(tensors)
    fresh_lora.load_kohya_state_dict(load_adapter_file(lora_path)[0])
    assert torch.equal(run(fresh_unet, fresh, inputs), trained)  # alpha/rank = 0.5 folds/unfolds exactly

    # EMA weights substituted on export are what gets saved
    live = adapter.trainable_named_parameters()
    ema = {k: p.detach() * 0.5 + 0.01 for k, p in live}
    fresh.load_exported(adapter.export_state_dict(weights=ema))
    for (name, _), (_, q) in zip(live, fresh.trainable_named_parameters()):
        torch.testing.assert_close(q.detach(), ema[name], rtol=0, atol=1e-6)
    kohya_ema = {k: v * 2 for k, v in unet_lora.trainable_named_parameters()}
    exported = unet_lora.export_kohya_state_dict(kohya_ema)
    some = next(iter(unet_lora.wrappers))
    assert torch.equal(exported[f"lora_unet_{some.replace('.', '_')}.lora_down.weight"],
                       kohya_ema[f"{some}.lora_down.weight"])


def test_controlnet_diffusers_layout_round_trip():
    unet = make_unet(TINY_XL)
    inputs = make_inputs(TINY_XL)
    adapter = build_adapter(unet, "controlnet")
    perturb(adapter.trainable_named_parameters(), seed=4)
    sd = adapter.export_state_dict(layout="diffusers")
    assert "controlnet_cond_embedding.conv_in.weight" in sd and "zero_convs.0.0.weight" not in sd
    ldm = adapter.export_state_dict()
    assert {"label_emb.0.0.weight", "input_hint_block.14.weight", "middle_block_out.0.bias"} <= set(ldm)
    fresh = build_adapter(make_unet(TINY_XL), "controlnet")
    fresh.load_exported(sd)
    torch.testing.assert_close(run(unet, fresh, inputs), run(unet, adapter, inputs), rtol=0, atol=0)


def test_control_lora_on_sdxl_layout_unet():
    """SDXL-shaped: text_time add_embedding (-> label_emb.0.*), linear projections, deeper transformers."""
    unet = make_unet(TINY_XL)
    inputs = make_inputs(TINY_XL)
    base = run(unet, None, inputs)
    adapter = build_adapter(unet, "control-lora", network_dim=2, network_alpha=4)
    assert torch.equal(run(unet, adapter, inputs), base)
    perturb(adapter.trainable_named_parameters(), seed=5)
    trained = run(unet, adapter, inputs)
    assert (trained - base).abs().max() > 1e-3
    exported = adapter.export_state_dict()
    assert {"label_emb.0.0.down", "label_emb.0.2.up", "input_blocks.7.1.proj_in.up",
            "middle_block.1.transformer_blocks.0.ff.net.2.down"} <= set(exported)
    fresh_unet = make_unet(TINY_XL)
    fresh = build_adapter(fresh_unet, "control-lora", network_dim=2, network_alpha=4)
    fresh.load_exported(exported)
    assert torch.equal(run(fresh_unet, fresh, inputs), trained)


def test_control_lora_file_carries_the_base_biases_and_norms():
    """sd-webui-controlnet (A1111) builds a Control-LoRA's encoder from the file alone, as Stability's files allow:
    the file carries every bias and normalisation tensor of the encoder in full (the base's values), and the SD1.5
    marker key it tells SD1.5 from SDXL by (12 input blocks vs 9)."""
    unet = make_unet()
    adapter = build_adapter(unet, "control-lora", network_dim=4)
    exported = adapter.export_state_dict()
    frozen = adapter.frozen_encoder_tensors()
    assert frozen and all(name.endswith((".bias", ".weight")) for name in frozen)
    assert torch.equal(frozen["mid_block.resnets.0.norm1.weight"], unet.mid_block.resnets[0].norm1.weight)
    assert torch.equal(frozen["down_blocks.0.resnets.0.conv1.bias"], unet.down_blocks[0].resnets[0].conv1.bias)
    assert "down_blocks.0.resnets.0.conv1.weight" not in frozen  # a LoRA covers it: the UNet's weight + up @ down
    assert {"middle_block.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.bias", "time_embed.0.bias"} \
        <= set(exported)
    fresh = build_adapter(make_unet(), "control-lora", network_dim=4)
    fresh.load_exported(exported)  # the frozen tensors are accepted (the encoder shares the model's own)


def test_control_lora_shares_the_base_weights():
    """The encoder copy holds the UNet's own tensors: only trainable tensors add storage."""
    unet = make_unet()
    adapter = build_adapter(unet, "control-lora", network_dim=4)
    unet_ptrs = {p.data_ptr() for p in unet.parameters()}
    cn = adapter.controlnet
    assert cn.conv_in.base.weight is unet.conv_in.weight
    shared = unet.down_blocks[0].resnets[0].conv1.weight
    assert cn.down_blocks[0].resnets[0].conv1.base.weight.data_ptr() == shared.data_ptr()
    assert cn.mid_block.resnets[0].norm1.weight is unet.mid_block.resnets[0].norm1.weight
    trainable = adapter.trainable_named_parameters()
    adapter_ptrs = {p.data_ptr() for p in adapter.parameters()}
    extra = adapter_ptrs - unet_ptrs
    assert len(extra) == len(trainable)  # every non-shared tensor is a trainable one
    frozen = [p for p in adapter.parameters() if p.data_ptr() not in extra]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for _, p in trainable)
    # the base UNet's modules are untouched (no LoRA wrappers put into it)
    assert type(unet.conv_in) is torch.nn.Conv2d
    print(f"control-lora: {sum(p.numel() for _, p in trainable)} trainable params, "
          f"{sum(p.numel() for p in frozen)} shared with the UNet (no copy)")


# ----------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_give_clear_errors(tmp_path):
    unet = make_unet()
    with pytest.raises(ValueError, match="unknown adapter type"):
        build_adapter(unet, "t2i-adapter")
    with pytest.raises(ValueError, match="ComfyUI"):
        build_adapter(unet, "controlnet", conditioning_embedding_out_channels=(16, 32, 96, 128))
    adapter = build_adapter(unet, "controlnet")
    sample, t, cond = make_inputs()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        adapter(sample, t, cond["encoder_hidden_states"], cond["hint"][:, :1])
    with pytest.raises(ValueError, match="8x the latent"):
        adapter(sample, t, cond["encoder_hidden_states"], cond["hint"][..., :32, :32])

    control_lora = build_adapter(make_unet(), "control-lora", network_dim=4)
    with pytest.raises(AdapterFileError, match="control-lora adapter"):
        adapter.load_exported(control_lora.export_state_dict())
    with pytest.raises(AdapterFileError, match="not a control-lora"):
        control_lora.load_exported(adapter.export_state_dict())
    other_rank = build_adapter(make_unet(), "control-lora", network_dim=8)
    with pytest.raises(AdapterFileError, match="another shape"):
        other_rank.load_exported(control_lora.export_state_dict())
    other_model = build_adapter(make_unet(TINY_XL), "controlnet")
    with pytest.raises(AdapterFileError, match="does not fit"):
        other_model.load_exported(adapter.export_state_dict())
    unet_lora = add_unet_lora(make_unet(), 4)
    with pytest.raises(AdapterFileError, match="UNet LoRA file"):
        adapter.load_exported(unet_lora.export_kohya_state_dict())
    twice = make_unet()
    add_unet_lora(twice, 4)
    with pytest.raises(RuntimeError, match="called twice"):
        add_unet_lora(twice, 4)

    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_adapter_file(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="safetensors only"):
        load_adapter_file(tmp_path / "adapter.ckpt")
    with pytest.raises(ValueError, match="file not found"):
        load_adapter_file(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="str -> str"):
        save_adapter(tmp_path / "a.safetensors", {"x": torch.zeros(1)}, {"ss_steps": 10})


# ------------------------------------------------------------------------------------- the real ComfyUI


COMFY_SCRIPT = r'''
import json, logging, sys
import comfy.cli_args
comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management (CUDA torch build aborts otherwise)
import torch
import comfy.controlnet, comfy.lora, comfy.model_management, comfy.sd, comfy.utils

paths = json.loads(sys.argv[1])
records = []
class Record(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
root = logging.getLogger()
root.addHandler(Record())
root.setLevel(logging.DEBUG)

inp = comfy.utils.load_torch_file(paths["inputs"], safe_load=True)
x, t, ctx, hint = inp["x"], inp["t"], inp["context"], inp["hint"]
result, outputs = {}, {}

def residuals(prefix, control_model):
    with torch.no_grad():
        out = control_model(x=x, hint=hint, timesteps=t, context=ctx)
    for i, r in enumerate(out["output"]):
        outputs[f"{prefix}.down.{i}"] = r.float().contiguous()
    outputs[f"{prefix}.mid"] = out["middle"][0].float().contiguous()

model = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(paths["unet"], safe_load=True))
result["model_config"] = type(model.model.model_config).__name__

# (1) full ControlNet, ldm layout, through the stock loader
records.clear()
cn = comfy.controlnet.load_controlnet(paths["controlnet"])
result["controlnet"] = {"class": type(cn).__name__, "model_class": type(cn.control_model).__name__,
                        "missing": [m for m in records if "missing controlnet keys" in m],
                        "unexpected": [m for m in records if "unexpected controlnet keys" in m]}
residuals("controlnet", cn.control_model)

# (2) Control-LoRA through ComfyUI's Control-LoRA path, on the unpatched model
def control_lora(prefix, file):
    records.clear()
    cl = comfy.controlnet.load_controlnet(file)
    cl.pre_run(model.model, lambda percent: percent)
    landed, wrong, unset = 0, [], []
    for k, v in cl.control_weights.items():
        if k == "lora_controlnet":
            continue
        got = comfy.utils.get_attr(cl.control_model, k)
        if got is not None and got.shape == v.shape and torch.equal(got.float(), v.float()):
            landed += 1
        else:
            wrong.append(k)
    for name, m in cl.control_model.named_modules():
        if isinstance(m, (comfy.controlnet.ControlLoraOps.Linear, comfy.controlnet.ControlLoraOps.Conv2d)):
            if m.weight is None:
                unset.append(name)
    result[prefix] = {"class": type(cl).__name__, "keys": len(cl.control_weights) - 1, "landed": landed,
                      "wrong": wrong[:5], "layers_without_weight": unset[:5],
                      "lora_layers": sum(1 for k in cl.control_weights if k.endswith(".up"))}
    residuals(prefix, cl.control_model)

control_lora("control_lora", paths["control_lora"])

# (3) kohya UNet LoRA through ComfyUI's LoRA loader; then the patched UNet and a Control-LoRA built on it
lora_sd = comfy.utils.load_torch_file(paths["unet_lora"], safe_load=True)
key_map = comfy.lora.model_lora_keys_unet(model.model, {})
records.clear()
patches = comfy.lora.load_lora(lora_sd, key_map)
modules_in_file = len({k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in lora_sd})
result["unet_lora"] = {"modules_in_file": modules_in_file, "patches": len(patches),
                       "not_loaded": [m for m in records if "lora key not loaded" in m]}
model.add_patches(patches, 1.0)
comfy.model_management.load_models_gpu([model])
with torch.no_grad():
    outputs["unet_lora.eps"] = model.model.diffusion_model(x, timesteps=t, context=ctx).float().contiguous()
control_lora("control_lora_on_lora", paths["control_lora"])

comfy.utils.save_torch_file(outputs, paths["outputs"])
json.dump(result, open(paths["result"], "w"))
'''


@torch.no_grad()
def _residuals(adapter, x, t, ctx, hint):
    down, mid = adapter(x, t, ctx, hint)
    return down, mid


def test_comfyui_loads_our_adapters_and_matches_numerically(comfyui_dir, tmp_path):
    """Real ComfyUI 0.3.75 on a micro SD1.5 UNet: stock ControlNet loader (no missing keys), Control-LoRA path
    (every key lands, no layer left without weight), kohya UNet LoRA (every module maps); residuals and the
    LoRA-patched UNet output equal ours."""
    unet = make_unet(MICRO_SD15)
    ldm_unet = ldm_keys.diffusers_unet_to_ldm(unet.state_dict(), unet.config)
    # the training loop's order: adapters first, then the UNet LoRA (which the Control-LoRA encoder then applies)
    controlnet = build_adapter(unet, "controlnet")
    control_lora = build_adapter(unet, "control-lora", network_dim=4, network_alpha=8)  # scale 2, folded into up
    unet_lora = add_unet_lora(unet, 4, 2)
    for seed, params in enumerate((controlnet.trainable_named_parameters(),
                                   control_lora.trainable_named_parameters(),
                                   unet_lora.trainable_named_parameters())):
        perturb(params, seed=10 + seed, scale=0.02)

    x, t, cond = make_inputs(MICRO_SD15, batch=1, tokens=8)
    t = t.float()
    ctx, hint = cond["encoder_hidden_states"], cond["hint"]
    ours = {"controlnet": _residuals(controlnet, x, t, ctx, hint),
            "control_lora_on_lora": _residuals(control_lora, x, t, ctx, hint)}
    ups = [w.lora_up.weight for w in unet_lora.wrappers.values()]
    saved = [u.detach().clone() for u in ups]
    with torch.no_grad():
        for u in ups:
            u.zero_()
        ours["control_lora"] = _residuals(control_lora, x, t, ctx, hint)
        for u, s in zip(ups, saved):
            u.copy_(s)
        ours_eps = unet(x, t, ctx).sample

    paths = {name: str(tmp_path / f"{name}.safetensors") for name in
             ("unet", "controlnet", "control_lora", "unet_lora", "inputs", "outputs")}
    paths["result"] = str(tmp_path / "result.json")
    save_adapter(paths["unet"], ldm_unet)
    save_adapter(paths["controlnet"], controlnet.export_state_dict())
    save_adapter(paths["control_lora"], control_lora.export_state_dict())
    save_adapter(paths["unet_lora"], unet_lora.export_kohya_state_dict())
    save_adapter(paths["inputs"], {"x": x, "t": t, "context": ctx, "hint": hint})
    proc = subprocess.run([sys.executable, "-c", COMFY_SCRIPT, json.dumps(paths)], cwd=comfyui_dir,
                          env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-8000:]
    result = json.loads(open(paths["result"]).read())
    theirs, _ = load_adapter_file(paths["outputs"])
    print(json.dumps(result, indent=1))

    assert result["model_config"] == "SD15"
    assert result["controlnet"]["class"] == "ControlNet" and result["controlnet"]["model_class"] == "ControlNet"
    assert result["controlnet"]["missing"] == [] and result["controlnet"]["unexpected"] == []
    for key in ("control_lora", "control_lora_on_lora"):
        info = result[key]
        assert info["class"] == "ControlLora"
        assert info["landed"] == info["keys"] and not info["wrong"] and not info["layers_without_weight"]
        assert info["lora_layers"] == len(control_lora.lora_layers)
    lora = result["unet_lora"]
    assert lora["modules_in_file"] == len(unet_lora.wrappers) == lora["patches"] and lora["not_loaded"] == []

    for prefix, (down, mid) in ours.items():
        assert len(down) == len([k for k in theirs if k.startswith(f"{prefix}.down.")])
        worst = max([(theirs[f"{prefix}.down.{i}"] - d).abs().max().item() for i, d in enumerate(down)] +
                    [(theirs[f"{prefix}.mid"] - mid).abs().max().item()])
        scale = max(mid.abs().max().item(), *(d.abs().max().item() for d in down))
        print(f"{prefix}: max |ComfyUI - ours| = {worst:.2e} (residual magnitude {scale:.2e})")
        assert scale > 1e-2 and worst <= 1e-4 * max(1.0, scale)  # fp32; attention kernels differ in summation order
    # the UNet LoRA reaches ComfyUI's Control-LoRA encoder (built from the patched model), and ours models that
    lora_effect = (ours["control_lora_on_lora"][1] - ours["control_lora"][1]).abs().max().item()
    print(f"UNet LoRA's effect on the Control-LoRA mid residual: {lora_effect:.2e}")
    assert lora_effect > 1e-2
    worst = (theirs["unet_lora.eps"] - ours_eps).abs().max().item()
    print(f"UNet+LoRA: max |ComfyUI - ours| = {worst:.2e} (output magnitude {ours_eps.abs().max().item():.2e})")
    assert worst <= 1e-4 * max(1.0, ours_eps.abs().max().item())
