"""The Automatic1111 / Forge glue (``codi_webui``) outside the web UIs: the panel's decisions, the scheduler's sigmas,
the sampler against :func:`ccd_sampler.sample` on a denoiser with the UIs' interface, and the hint preprocessors
against the trainer's hint builders. The same code inside the real Forge and A1111 is tested in
``test_webui.py``."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import ccd_sampler as cs
from ccd_sampler.adapter_info import CoDiInfo
from ccd_sampler.metadata import CoDiMetadata
from codi_webui import plan as planning
from codi_webui import preprocessors, sampling
from codi_webui.controlnet import model_file
from codi_webui.plan import CoDiWebUIError, PanelSettings, make_plan, missing_unet_lora

SD1 = "stable-diffusion-v1/codi-controlnet"


def adapter(name="codi_sr.safetensors", architecture=SD1, **meta) -> CoDiInfo:
    defaults = dict(task="sr", recommended_steps=2, recommended_cfg=1.5, sampler_mode="consistency",
                    distill_grid=40, hint_preprocessing={"type": "sr", "scale": 4})
    return CoDiInfo(name=name, metadata=CoDiMetadata(**{**defaults, **meta}), has_codi_metadata=True,
                    architecture=architecture)


def plan_for(adapters, panel=None, family="sd1", sampler="Euler a", steps=20, cfg=7.0):
    return make_plan(adapters, panel or PanelSettings(), family, "test.safetensors is SD1.x", sampler, steps, cfg)


# ------------------------------------------------------------------------------------------------ the panel

def test_adapter_settings_are_applied_unless_overridden():
    plan = plan_for([CoDiInfo(name="stock_canny.safetensors"), adapter()])
    assert (plan.steps, plan.cfg, plan.mode, plan.sampler_name) == (2, 1.5, "consistency", "CoDi")
    assert plan.timesteps == [975, 475]  # N = 40: k = 25, stride 20
    assert plan.infotext() == {"CoDi adapter": "codi_sr.safetensors", "CoDi steps": 2, "CoDi cfg": 1.5,
                               "CoDi mode": "consistency", "CoDi grid": 40, "CoDi boundary": "on"}
    plan = plan_for([adapter()], PanelSettings(steps=4, cfg=2.0, mode="ode"))
    assert (plan.steps, plan.cfg, plan.sampler_name) == (4, 2.0, "CoDi ODE")


def test_an_adapter_trained_with_a_unet_lora_asks_for_it_in_the_prompt():
    plan = plan_for([adapter(name="codi_sr [1a2b3c4d]", unet_lora=True)])
    warning = missing_unet_lora(plan, "a photo")
    assert "<lora:codi_sr_unet_lora:1>" in warning and "models/Lora" in warning
    assert missing_unet_lora(plan, "a photo <lora:codi_sr_unet_lora:0.8>") is None
    assert missing_unet_lora(plan_for([adapter()]), "a photo") is None


def test_generations_without_codi_are_left_alone():
    assert plan_for([]) is None
    assert plan_for([CoDiInfo(name="stock.safetensors")]) is None  # an ordinary ControlNet with Euler a
    assert plan_for([adapter()], PanelSettings(enabled=False)) is None
    assert plan_for([adapter(objective="diffusion")]) is None  # a plain fine-tune needs many steps


def test_codi_sampler_without_a_codi_adapter_uses_the_defaults(caplog):
    caplog.set_level("INFO", logger="codi")
    plan = plan_for([CoDiInfo(name="stock.safetensors")], sampler="CoDi ODE", steps=4, cfg=1.0)
    assert plan.adapter is None and plan.mode == "ode" and plan.metadata.distill_grid == 50
    assert plan.timesteps == [980, 720, 460, 200]
    assert "without a CoDi adapter (stock.safetensors)" in caplog.text


@pytest.mark.parametrize("case, kwargs, message", [
    ("sdxl adapter on sd1", dict(adapters=[adapter(architecture="stable-diffusion-xl-v1-base/codi-control-lora")]),
     "was made for SDXL"),
    ("sdxl adapter on sd1, panel settings off",
     dict(adapters=[adapter(architecture="stable-diffusion-xl-v1-base/codi-control-lora")],
          panel=PanelSettings(enabled=False)), "was made for SDXL"),
    ("steps over 8", dict(adapters=[adapter()], panel=PanelSettings(steps=12)), "steps must be in 1..8"),
    ("codi sampler, 20 steps", dict(adapters=[], sampler="CoDi", steps=20), "steps must be in 1..8"),
    ("grid cannot split", dict(adapters=[adapter(distill_grid=10)], panel=PanelSettings(steps=7)),
     "cannot be split into 7 steps"),
    ("bad mode", dict(adapters=[adapter()], panel=PanelSettings(mode="fast")), "mode must be one of"),
])
def test_refusals_are_clear(case, kwargs, message):
    with pytest.raises(CoDiWebUIError, match=message) as info:
        plan_for(**kwargs)
    assert info.value.status_code == 400 and info.value.detail == str(info.value)


def test_model_file_by_exact_name_or_stem(tmp_path):
    files = {"codi_sr [e3b0c442]": str(tmp_path / "codi_sr.safetensors"),
             "other [12345678]": str(tmp_path / "sub" / "Other.safetensors")}
    assert model_file("codi_sr [e3b0c442]", files) == files["codi_sr [e3b0c442]"]
    assert model_file("codi_sr [deadbeef]", files) == files["codi_sr [e3b0c442]"]  # every small file shares a hash
    assert model_file("other", files) == files["other [12345678]"]
    assert model_file("missing", files) is None


# ------------------------------------------------------------------------------------------------ sampling

class ModelWrap:
    """The UIs' k-diffusion model wrap: a 1000-entry ascending sigma table with A1111's fractional
    ``sigma_to_t`` (log-sigma interpolation)."""

    def __init__(self, schedule: cs.NoiseSchedule):
        abar = schedule.alphas_cumprod.double()
        self.sigmas = ((1 - abar) / abar).sqrt().float()

    def sigma_to_t(self, sigma):
        log_sigmas = self.sigmas.log()
        log_sigma = torch.as_tensor(sigma).float().log().reshape(-1)
        idx = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        low, high = log_sigmas[idx - 1], log_sigmas[idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return (1 - w) * (idx - 1) + w * idx


class CFGDenoiser:
    """The UIs' CFG denoiser over an epsilon model ``eps(z_t, t)``: returns ``x0`` in sigma space."""

    def __init__(self, eps_model, wrap: ModelWrap, p=None):
        self.eps_model, self.inner_model, self.p, self.sigmas_seen = eps_model, wrap, p, []

    def __call__(self, x, sigma, **extra):
        self.sigmas_seen.append(float(sigma[0]))
        t = self.inner_model.sigma_to_t(sigma).round().long()
        z = x / torch.sqrt(1 + sigma.reshape(-1, 1, 1, 1) ** 2)
        return x - sigma.reshape(-1, 1, 1, 1) * self.eps_model(z, t)


def eps_model(z, t):
    """A fixed smooth nonlinear 'network' (deterministic in z and t)."""
    return torch.tanh(0.7 * z + 0.001 * t.float().reshape(-1, 1, 1, 1)) + 0.1 * z.roll(1, dims=-1)


@pytest.mark.parametrize("steps, mode", [(1, "ode"), (4, "ode"), (4, "consistency")])
def test_sampler_equals_ccd_sampler(steps, mode, monkeypatch):
    schedule = cs.NoiseSchedule.stable_diffusion()
    wrap = ModelWrap(schedule)
    meta = CoDiMetadata(distill_grid=50, sampler_mode=mode, recommended_steps=steps)
    monkeypatch.setattr(planning.CURRENT, "plan", planning.CoDiPlan(None, steps, 1.0, mode, meta))
    monkeypatch.setattr(planning.CURRENT, "errors", [])
    sigmas = sampling.codi_scheduler(steps, None, None, wrap, "cpu")
    timesteps = cs.codi_timesteps(steps, 50)
    assert torch.equal(sigmas[:-1], wrap.sigmas[timesteps]) and sigmas[-1] == 0
    xi = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    queue = list(draws)
    monkeypatch.setattr(sampling, "_seeded_randn_like", lambda x: queue.pop(0))
    model = CFGDenoiser(eps_model, wrap, p=types.SimpleNamespace())  # a txt2img p: no init_images
    ours = sampling.sample_codi(model, xi * sigmas[0], sigmas, mode=mode)  # the UI starts at xi * sigma_0

    def denoise_fn(z, t, cond):
        return eps_model(z, t)

    reference_noise = iter(draws)  # the same consistency noise, in the same order
    monkeypatch.setattr(cs.sampling, "_randn_like", lambda z, g: next(reference_noise))
    reference = cs.sample(denoise_fn, xi, timesteps, "epsilon", schedule, mode=mode)
    worst = float((ours - reference).abs().max())
    print(f"{steps} steps {mode}: max |web-UI sampler - ccd_sampler.sample| = {worst:.2e}")
    assert worst < 2e-5
    assert model.sigmas_seen == [float(s) for s in sigmas[:-1]]


def test_sampler_raises_what_the_panel_or_a_preprocessor_recorded(monkeypatch):
    monkeypatch.setattr(planning.CURRENT, "plan", None)
    monkeypatch.setattr(planning.CURRENT, "errors", ["codi_sr: the low-res image is 10x10 but the output is 64x64"])
    wrap = ModelWrap(cs.NoiseSchedule.stable_diffusion())
    with pytest.raises(CoDiWebUIError, match="codi_sr: the low-res image"):
        sampling.sample_codi(CFGDenoiser(eps_model, wrap), torch.zeros(1, 4, 8, 8), torch.tensor([14.6, 0.0]))


# ------------------------------------------------------------------------------------------------ hints

def test_hints_are_the_trainers(monkeypatch):
    from skimage import data

    from trainer.data.conditions import CannyCondition, InpaintCondition, SuperResolutionCondition, image_to_tensor

    photo = np.ascontiguousarray(data.astronaut()[::8, ::8])  # 64x64
    low = np.ascontiguousarray(photo[::4, ::4])  # 16x16
    assert torch.equal(preprocessors.image_to_bchw(photo), image_to_tensor(photo))
    monkeypatch.setattr(planning.CURRENT, "target_size", (64, 64))
    monkeypatch.setattr(planning.CURRENT, "errors", [])
    monkeypatch.setattr(planning.CURRENT, "adapters", [])  # no adapter: the sliders and the output size decide

    def hwc(hint):
        return hint[0].permute(1, 2, 0).numpy()

    sr = preprocessors.build_hint("codi_sr", low)
    assert np.array_equal(hwc(sr), SuperResolutionCondition(scale=4).hint_from_low_res(low))
    trained = InpaintCondition()(photo, np.random.default_rng(0))  # a training mask and its hint
    mask = (trained.mask * 255).astype(np.uint8)
    inpaint = preprocessors.build_hint("codi_inpaint", photo, np.dstack([mask] * 3))
    assert np.array_equal(hwc(inpaint), trained.hint) and (inpaint == -1).any()
    canny = preprocessors.build_hint("codi_canny", photo, None, 50, 150)
    assert np.array_equal(hwc(canny), CannyCondition(50, 150)(photo).hint)
    assert not planning.CURRENT.errors


def test_hints_follow_the_adapter_they_feed(monkeypatch, caplog):
    """codi_canny takes the adapter's trained thresholds while the sliders are at their defaults, the sliders once
    moved; codi_sr refuses an output size at another scale than the adapter's."""
    from skimage import data

    from trainer.data.conditions import CannyCondition

    caplog.set_level("INFO", logger="codi")
    photo = np.ascontiguousarray(data.astronaut()[::8, ::8])  # 64x64
    canny_adapter = adapter("codi_canny.safetensors", task="canny",
                            hint_preprocessing={"type": "canny", "low_threshold": 30, "high_threshold": 90})
    monkeypatch.setattr(planning.CURRENT, "target_size", (64, 64))
    monkeypatch.setattr(planning.CURRENT, "errors", [])
    monkeypatch.setattr(planning.CURRENT, "adapters", [adapter(), canny_adapter])

    def hint(*sliders):
        return preprocessors.build_hint("codi_canny", photo, None, *sliders)[0].permute(1, 2, 0).numpy()

    trained = CannyCondition(30, 90)(photo).hint
    assert not np.array_equal(trained, CannyCondition(100, 200)(photo).hint)  # the thresholds matter here
    assert np.array_equal(hint(100, 200), trained) and np.array_equal(hint(-1, -1), trained)
    assert "trained with (30, 90)" in caplog.text
    assert np.array_equal(hint(50, 150), CannyCondition(50, 150)(photo).hint)  # the user's choice wins
    assert "uses the sliders (50, 150); adapter codi_canny.safetensors was trained with (30, 90)" in caplog.text

    # the SR adapter was trained at x4: a 32x32 input for a 64x64 output (x2) is refused with the size to set
    assert preprocessors.build_hint("codi_sr", np.zeros((32, 32, 3), np.uint8)) is None
    assert "trained for x4 super-resolution" in planning.CURRENT.errors[0]
    assert "set the output size to 128x128" in planning.CURRENT.errors[0]
    monkeypatch.setattr(planning.CURRENT, "errors", [])
    assert preprocessors.build_hint("codi_sr", np.zeros((16, 16, 3), np.uint8)) is not None  # x4: fine
    assert not planning.CURRENT.errors


@pytest.mark.parametrize("name, image_size, message", [
    ("codi_sr", 24, "the low-res image is 24x24 but the output is 64x64"),
    ("codi_inpaint", 32, "codi_inpaint: the image is 32x32 but the output is 64x64"),
    ("codi_canny", 32, "codi_canny: the image is 32x32 but the output is 64x64"),
])
def test_hint_errors_are_recorded_for_the_sampler(name, image_size, message, monkeypatch):
    monkeypatch.setattr(planning.CURRENT, "target_size", (64, 64))
    monkeypatch.setattr(planning.CURRENT, "errors", [])
    image = np.zeros((image_size, image_size, 3), np.uint8)
    assert preprocessors.build_hint(name, image, np.zeros((image_size, image_size), np.uint8)) is None
    assert message in planning.CURRENT.errors[0]


def test_zero_terminal_snr_adapter_needs_the_uis_ztsnr_schedule(monkeypatch):
    meta = CoDiMetadata(prediction_type="v_prediction", zero_terminal_snr=True)
    monkeypatch.setattr(planning.CURRENT, "plan", planning.CoDiPlan(adapter(), 4, 1.0, "ode", meta))
    monkeypatch.setattr(planning.CURRENT, "errors", [])
    standard = ModelWrap(cs.NoiseSchedule.stable_diffusion())
    with pytest.raises(CoDiWebUIError, match="Noise schedule for sampling to 'Zero Terminal SNR'"):
        sampling.sample_codi(CFGDenoiser(eps_model, standard), torch.zeros(1, 4, 8, 8), torch.tensor([14.6, 0.0]))
    ztsnr = ModelWrap(cs.NoiseSchedule.stable_diffusion())
    ztsnr.sigmas[-1] = 4.5e3  # what A1111's Zero Terminal SNR option makes of the last sigma
    sampling.check_schedule(planning.CURRENT.plan, ztsnr)


def test_img2img_keeps_the_tail_of_the_grid(monkeypatch):
    """The UI hands an img2img sampler ``init + sigma xi`` on its own slice of the schedule; CoDi keeps the last
    round(strength * steps) grid timesteps and rebuilds the start from the same noise."""
    wrap = ModelWrap(cs.NoiseSchedule.stable_diffusion())
    meta = CoDiMetadata(distill_grid=50, recommended_steps=4)
    monkeypatch.setattr(planning.CURRENT, "plan", planning.CoDiPlan(None, 4, 1.0, "ode", meta))
    monkeypatch.setattr(planning.CURRENT, "errors", [])
    init, xi = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    ui_sigmas = sampling.codi_scheduler(4, None, None, wrap, "cpu")[1:]  # the UI's int(0.5 * 4) + 1 = 3 steps
    model = types.SimpleNamespace(init_latent=init, inner_model=wrap)
    p = types.SimpleNamespace(init_images=[object()], denoising_strength=0.5, steps=4)
    x, sigmas = sampling.img2img_schedule(model, init + ui_sigmas[0] * xi, ui_sigmas, planning.CURRENT.plan, p)
    assert sampling.timesteps_of(wrap, sigmas[:-1]).long().tolist() == [460, 200]
    assert torch.allclose(x, init + sigmas[0] * xi, atol=1e-5)
