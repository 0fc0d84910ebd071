"""Layer A: the CoDi math in ccd_sampler against diffusers' reference schedulers and closed forms."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ccd_sampler as cs
from ccd_sampler.sampling import predict_x0_eps

REPO = Path(__file__).resolve().parents[1]
SCHEDULE = cs.NoiseSchedule.stable_diffusion()


def sd_scheduler_kwargs():
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ---------------------------------------------------------------- schedule and parameterisations


def test_schedule_equals_diffusers_ddpm():
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(**sd_scheduler_kwargs()).alphas_cumprod.double()
    assert torch.allclose(SCHEDULE.alphas_cumprod, reference, rtol=1e-6, atol=0)
    assert SCHEDULE.num_train_timesteps == 1000


def test_zero_terminal_snr_schedule_equals_diffusers():
    """Lin et al.'s rescaled betas: the same abar as diffusers' ``rescale_betas_zero_snr``, alpha exactly 0 at the
    last step, the first step unchanged, and SD's schedule untouched without the flag."""
    from diffusers import DDPMScheduler

    zsnr = cs.NoiseSchedule.from_config({**sd_scheduler_kwargs(), "rescale_betas_zero_snr": True})
    reference = DDPMScheduler(**sd_scheduler_kwargs(), rescale_betas_zero_snr=True).alphas_cumprod.double()
    assert torch.allclose(zsnr.alphas_cumprod, reference, rtol=1e-5, atol=1e-9)
    alpha, sigma = zsnr.alpha_sigma(999)
    assert float(alpha) == 0.0 and float(sigma) == 1.0 and zsnr.zero_terminal_snr
    assert torch.isclose(zsnr.alphas_cumprod[0], SCHEDULE.alphas_cumprod[0], rtol=1e-12)
    assert not SCHEDULE.zero_terminal_snr
    assert torch.equal(cs.NoiseSchedule.from_config(sd_scheduler_kwargs()).alphas_cumprod, SCHEDULE.alphas_cumprod)


def test_alpha_sigma_unit_norm_and_broadcast():
    t = torch.arange(1000)
    alpha, sigma = SCHEDULE.alpha_sigma(t)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(1000, dtype=torch.float64), atol=1e-12)
    assert (alpha[1:] < alpha[:-1]).all(), "alpha_t must decrease with t"
    like = torch.zeros(3, 4, 8, 8, dtype=torch.float16)
    a, s = SCHEDULE.alpha_sigma(torch.tensor([0, 500, 999]), like=like)
    assert a.shape == (3, 1, 1, 1) and a.dtype == torch.float16
    a0, _ = SCHEDULE.alpha_sigma(999, like=like)
    assert a0.shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="0..999"):
        SCHEDULE.alpha_sigma(1000)
    with pytest.raises(ValueError, match="integers"):
        SCHEDULE.alpha_sigma(torch.tensor([1.5]))


def test_sigma_karras_matches_comfy_definition():
    abar = SCHEDULE.alphas_cumprod
    assert torch.allclose(SCHEDULE.sigma_karras(torch.arange(1000)), ((1 - abar) / abar).sqrt())


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "eps", "v", "x"])
def test_conversions_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 250, 600, 999])
    alpha, sigma = SCHEDULE.alpha_sigma(t, like=x0)
    z = alpha * x0 + sigma * eps
    out = cs.from_x0_eps(x0, eps, alpha, sigma, kind)
    x0_back, eps_back = cs.to_x0_eps(out, z, alpha, sigma, kind)
    assert torch.allclose(x0_back, x0, atol=1e-9) and torch.allclose(eps_back, eps, atol=1e-9)
    # the network output must differ between parameterisations (the conversion is not a no-op)
    if cs.normalize_prediction_type(kind) == "v_prediction":
        assert torch.allclose(out, alpha * eps - sigma * x0)


def test_v_prediction_matches_diffusers_definition():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**sd_scheduler_kwargs(), prediction_type="v_prediction")
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 700])
    alpha, sigma = SCHEDULE.alpha_sigma(t, like=x0)
    assert torch.allclose(cs.from_x0_eps(x0, eps, alpha, sigma, "v"), sched.get_velocity(x0, eps, t), atol=1e-6)


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="unknown prediction type"):
        cs.normalize_prediction_type("flow")


# ---------------------------------------------------------------- boundary scalings


def test_boundary_scalings_limits():
    c_skip, c_out = cs.boundary_scalings(0)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    c_skip, c_out = cs.boundary_scalings(torch.arange(20, 1000))
    assert (c_out - 1).abs().max() < 1e-4
    assert c_skip.max() < 1e-4
    # not the JAX release's c_out * sigma_data (~0.5) bug
    assert float(cs.boundary_scalings(980)[1]) > 0.9999


def test_boundary_scalings_equal_diffusers_lcm():
    from diffusers import LCMScheduler

    lcm = LCMScheduler(**sd_scheduler_kwargs(), timestep_scaling=10.0)
    for t in [0, 1, 3, 19, 20, 500, 999]:
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        c_skip, c_out = cs.boundary_scalings(t, sigma_data=0.5, timestep_scaling=10.0)
        assert math.isclose(float(c_skip), float(ref_skip), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(float(c_out), float(ref_out), rel_tol=1e-9, abs_tol=1e-12)


def test_apply_boundary_switch_and_per_sample():
    z, x0 = torch.full((2, 1, 2, 2), 3.0), torch.full((2, 1, 2, 2), -1.0)
    assert torch.equal(cs.apply_boundary(z, x0, torch.tensor([0, 0]), enabled=False), x0)
    f = cs.apply_boundary(z, x0, torch.tensor([0, 999]))
    assert torch.allclose(f[0], z[0]) and torch.allclose(f[1], x0[1], atol=1e-4)
    f_wide = cs.apply_boundary(z, x0, torch.tensor([1, 1]), timestep_scaling=1.0)
    f_narrow = cs.apply_boundary(z, x0, torch.tensor([1, 1]), timestep_scaling=100.0)
    assert (f_wide - x0).abs().max() > (f_narrow - x0).abs().max()


# ---------------------------------------------------------------- grids


def test_codi_grid_values():
    assert cs.codi_timesteps(1, grid=50) == [980]
    assert cs.codi_timesteps(2, grid=50) == [980, 480]
    assert cs.codi_timesteps(4, grid=50) == [980, 720, 460, 200]
    assert cs.codi_timesteps(8, grid=50) == [980, 840, 700, 560, 420, 280, 140, 0]
    assert cs.distill_grid(50)[:3] == [980, 960, 940] and cs.distill_grid(50)[-1] == 0
    assert cs.codi_timesteps(50, grid=50) == cs.distill_grid(50)
    assert cs.codi_timesteps(2, grid=20) == [950, 450]


def test_grid_errors_are_clear():
    with pytest.raises(ValueError, match="steps must be an integer in 1..50"):
        cs.codi_timesteps(0)
    with pytest.raises(ValueError, match="steps must be an integer in 1..10"):
        cs.codi_timesteps(11, grid=10)
    with pytest.raises(ValueError, match="grid N must be an integer"):
        cs.codi_timesteps(2, grid=1)
    with pytest.raises(ValueError, match="cannot be split"):
        cs.codi_timesteps(7, grid=10)  # stride ceil(10/7)=2 gives only 5 points
    with pytest.raises(ValueError, match="strictly descending"):
        cs.validate_timesteps([500, 500, 0])
    with pytest.raises(ValueError, match="empty"):
        cs.validate_timesteps([])
    with pytest.raises(ValueError, match="0..999"):
        cs.validate_timesteps([1200, 0])


def test_even_and_img2img_timesteps():
    assert cs.even_timesteps(1) == [999]
    assert cs.even_timesteps(4, t_max=999) == [999, 666, 333, 0]
    assert cs.img2img_timesteps([980, 720, 460, 200], 0.5) == [460, 200]
    assert cs.img2img_timesteps([980, 720, 460, 200], 0.01) == [200]
    with pytest.raises(ValueError, match="strength"):
        cs.img2img_timesteps([980], 0.0)


# ---------------------------------------------------------------- sampler steps vs diffusers


def _linear_denoiser(kind):
    """A fixed, non-trivial denoiser: output = tanh(W z) * (1 + t/1000)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.5

    def denoise(z, t, cond):
        out = torch.tanh(torch.einsum("ij,bjhw->bihw", weight.to(z.dtype), z))
        scale = (1 + t.to(z.dtype) / 1000).reshape(-1, 1, 1, 1)
        return out * scale + (0 if cond is None else cond)

    return denoise


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ode_step_equals_diffusers_ddim(kind):
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(**sd_scheduler_kwargs(), prediction_type=kind, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=0, timestep_spacing="leading")
    ddim.set_timesteps(50)
    assert ddim.timesteps.tolist() == cs.distill_grid(50)
    denoise = _linear_denoiser(kind)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t, s in [(980, 960), (500, 480), (20, 0)]:
        x0, eps = predict_x0_eps(denoise, z, t, SCHEDULE, kind, boundary=False)
        alpha_s, sigma_s = SCHEDULE.alpha_sigma(s, like=z)
        ours = cs.ode_step(x0, eps, alpha_s, sigma_s)
        out = denoise(z, torch.full((2,), t), None)
        reference = ddim.step(out, t, z, eta=0.0).prev_sample
        assert (ours - reference).abs().max() <= 1e-5, (t, s)


def test_full_ode_sampler_equals_diffusers_ddim_loop():
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(**sd_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False, steps_offset=0)
    ddim.set_timesteps(10)
    denoise = _linear_denoiser("epsilon")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = noise
    for t in ddim.timesteps:
        z = ddim.step(denoise(z, torch.full((1,), int(t)), None), t, z, eta=0.0).prev_sample
    ours = cs.sample(denoise, noise, ddim.timesteps.tolist(), "epsilon", boundary=False, final="z0")
    # diffusers keeps alphas_cumprod in float32: compare relative to the sample's scale
    assert ((ours - z).abs().max() / z.abs().max()) <= 1e-6


def test_consistency_step_equals_diffusers_lcm():
    from diffusers import LCMScheduler

    lcm = LCMScheduler(**sd_scheduler_kwargs(), timestep_scaling=10.0, set_alpha_to_one=False)
    steps = [999, 759, 499, 259]
    lcm.set_timesteps(4, original_inference_steps=50)
    assert lcm.timesteps.tolist() == steps
    denoise = _linear_denoiser("epsilon")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    z = noise
    gen = torch.Generator().manual_seed(11)
    for t in lcm.timesteps:
        z, _ = lcm.step(denoise(z, torch.full((1,), int(t)), None), t, z, generator=gen, return_dict=False)
    # diffusers' last step returns the boundary-scaled x0 without noise: our final="x0".
    ours = cs.sample(denoise, noise, steps, "epsilon", mode="consistency", generator=torch.Generator().manual_seed(11))
    assert ((ours - z).abs().max() / z.abs().max()) <= 1e-6  # float32 round-off only


def test_one_consistency_step_formula():
    x0, xi = torch.randn(2, 3), torch.randn(2, 3)
    alpha, sigma = SCHEDULE.alpha_sigma(480, like=x0)
    assert torch.allclose(cs.consistency_step(x0, xi, alpha, sigma), alpha * x0 + sigma * xi)


def test_sampler_cfg_is_one_batched_call_and_guides():
    calls = []

    def denoise(z, t, cond):
        calls.append(z.shape[0])
        return torch.zeros_like(z) + cond.reshape(-1, 1, 1, 1)

    noise = torch.randn(2, 1, 2, 2)
    cond, uncond = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    cs.sample(denoise, noise, [980], "epsilon", cond=cond, uncond=uncond, cfg=3.0)
    assert calls == [4]  # cond and uncond in one call
    out = cs.guided_output(denoise, noise, torch.tensor([5, 5]), cond, uncond, cfg=3.0)
    assert torch.allclose(out, torch.full_like(out, 3.0))  # u + w (c - u) = 0 + 3 (1 - 0), not swapped
    calls.clear()
    cs.sample(denoise, noise, [980], "epsilon", cond=cond, uncond=uncond, cfg=1.0)
    assert calls == [2]  # cfg exactly 1 skips the uncond pass


def test_sampler_options_and_callback():
    denoise = _linear_denoiser("epsilon")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    out = cs.sample(denoise, noise, cs.codi_timesteps(4), "epsilon", callback=lambda d: seen.append((d["t"], d["s"])))
    assert seen == [(980, 720), (720, 460), (460, 200), (200, 0)]
    assert torch.isfinite(out).all()
    # consistency mode is seeded: same generator seed, same sample; different seed, different sample
    a = cs.sample(denoise, noise, cs.codi_timesteps(4), "epsilon", mode="consistency",
                  generator=torch.Generator().manual_seed(1))
    b = cs.sample(denoise, noise, cs.codi_timesteps(4), "epsilon", mode="consistency",
                  generator=torch.Generator().manual_seed(1))
    c = cs.sample(denoise, noise, cs.codi_timesteps(4), "epsilon", mode="consistency",
                  generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # img2img with strength: only the tail of the schedule runs
    seen.clear()
    init = torch.zeros_like(noise)
    cs.sample(denoise, noise, cs.codi_timesteps(4), "epsilon", init_image=init, strength=0.5,
              callback=lambda d: seen.append(d["t"]))
    assert seen == [460, 200]
    with pytest.raises(ValueError, match="init_image"):
        cs.sample(denoise, noise, [980], "epsilon", strength=0.5)
    with pytest.raises(ValueError, match="mode"):
        cs.sample(denoise, noise, [980], "epsilon", mode="euler")


def test_sampler_boundary_at_t0_returns_input():
    """With the boundary on, a network evaluation at t = 0 is the identity on z (c_skip = 1, c_out = 0)."""
    denoise = _linear_denoiser("epsilon")
    z = torch.randn(1, 4, 4, 4)
    assert torch.allclose(cs.sample(denoise, z, [0], "epsilon", boundary=True), z)
    assert not torch.allclose(cs.sample(denoise, z, [0], "epsilon", boundary=False), z)


# ---------------------------------------------------------------- the loss


def _toy_models():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))
    target_net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))
    target_net.load_state_dict(net.state_dict())

    def wrap(module):
        def fn(z, t, cond, w=None):
            extra = (t.float() / 1000).unsqueeze(-1)
            return module(torch.cat([z, extra], dim=-1)) + cond
        return fn

    return net, wrap(net), wrap(target_net)


def test_loss_default_options_and_gradient():
    net, online, target = _toy_models()
    x, cond = torch.randn(8, 2), torch.randn(8, 2)
    config = cs.CoDiLossConfig()
    loss, diag = cs.codi_loss(online, target, x, cond, config, generator=torch.Generator().manual_seed(0))
    assert loss.requires_grad and torch.isfinite(loss)
    assert len(set(diag["t"])) == 1, "the default draws one t shared by the batch"
    assert all(t - s == 20 and t >= 20 and t <= 980 for t, s in zip(diag["t"], diag["s"]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert math.isclose(float(loss.detach()), diag["loss_consistency"] + diag["loss_guidance"], rel_tol=1e-5)


def test_loss_is_zero_for_a_perfect_consistency_model_with_exact_data():
    """If every model returns x0 = x exactly (eps-param: out = (z - alpha x) / sigma), f = f_target = x."""
    x = torch.randn(16, 2, dtype=torch.float64)

    def perfect(z, t, cond, w=None):
        alpha, sigma = SCHEDULE.alpha_sigma(t, like=z)
        return (z - alpha * x) / sigma

    for space in ("x", "eps"):
        config = cs.CoDiLossConfig(consistency_space=space, shared_timestep=False)
        loss, diag = cs.codi_loss(perfect, perfect, x, None, config, generator=torch.Generator().manual_seed(1))
        assert float(loss) < 1e-12, space


def test_perfect_denoiser_scores_near_zero_at_every_grid_index_in_both_spaces():
    """The oracle (x0 = x exactly) at every index i = 1..49 of the grid, in x and eps space. At i = 1 (s = 0) the
    boundary scaling makes the target z_0 itself, whose implied noise is ~0: the eps-space distance would then be
    |eps|^2 ~ 1 for the perfect model (the bug this test pins down), so s = 0 uses the x-space distance, ~sigma_0^2.
    A model that does not denoise at t = 20 (returns f = z_t) must score worse than the perfect one there."""
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def perfect(z, t, cond, w=None):
        alpha, sigma = SCHEDULE.alpha_sigma(t, like=z)
        return (z - alpha * x) / sigma

    def lazy(z, t, cond, w=None):  # x0_hat = z_t: "not denoising" (eps-param out = z (1 - alpha) / sigma)
        alpha, sigma = SCHEDULE.alpha_sigma(t, like=z)
        return z * (1 - alpha) / sigma

    seen = {}
    for space in ("x", "eps"):
        for seed in range(400):
            config = cs.CoDiLossConfig(consistency_space=space)
            _, diag = cs.codi_loss(perfect, perfect, x, None, config, generator=torch.Generator().manual_seed(seed))
            seen.setdefault((space, diag["t"][0]), diag["loss_consistency"])
        values = {t: v for (sp, t), v in seen.items() if sp == space}
        assert set(values) == set(range(20, 1000, 20)), "every grid index drawn"
        assert max(v for t, v in values.items() if t > 20) < 1e-9, space
        assert values[20] < 2e-3, (space, values[20])  # sigma_0^2 + (1 - alpha_0)^2 ~ 8.5e-4: ~0, not ~1
    for space in ("x", "eps"):
        config = cs.CoDiLossConfig(consistency_space=space, distill_grid=50)
        # the first generator seed whose shared draw is i = 1 (t = 20, s = 0)
        seed = next(k for k in range(400) if cs.draw_timesteps(1, 50, True, generator=torch.Generator()
                                                                  .manual_seed(k))[0][0] == 20)
        good, _ = cs.codi_loss(perfect, perfect, x, None, config, generator=torch.Generator().manual_seed(seed))
        bad, _ = cs.codi_loss(lazy, perfect, x, None, config, generator=torch.Generator().manual_seed(seed))
        assert float(good) < 0.1 * float(bad), (space, float(good), float(bad))


def test_cfg_regression_acts_on_the_conditional_branch():
    """With CFG-aware distillation the lambda |f - x|^2 term regresses the conditional branch: a model whose
    conditional branch is perfect and whose unconditional branch predicts something else (c - u != 0: guidance)
    has no regression loss, whatever w. On the guided output it would pay E[w^2] |c - u|^2 and so learn to cancel
    its own guidance."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model(z, t, c, w=None):
        alpha, sigma = SCHEDULE.alpha_sigma(t, like=z)
        perfect = (z - alpha * x.repeat(z.shape[0] // x.shape[0], 1)) / sigma
        return torch.where(c.bool(), perfect, perfect + 0.5)  # c: 1 = conditional branch, 0 = unconditional

    cond, uncond = torch.ones(8, 1), torch.zeros(8, 1)
    # x-space: the guided outputs' implied noises are the perfect noise plus the same offset on both sides, so an
    # eps-space consistency term would not see w here
    config = cs.CoDiLossConfig(guidance_mode="cfg", cfg_range=(2.0, 8.0), guidance_weight=1.0, consistency_space="x")
    _, diag = cs.codi_loss(model, model, x, cond, config, uncond=uncond, generator=torch.Generator().manual_seed(0))
    assert diag["loss_guidance"] < 1e-12
    assert diag["loss_consistency"] > 1e-3  # the guided outputs differ from x: the consistency term still sees w


def test_loss_options_change_the_computation():
    _, online, target = _toy_models()
    x, cond = torch.randn(8, 2), torch.randn(8, 2)

    def run(**kw):
        config = cs.CoDiLossConfig(**kw)
        return cs.codi_loss(online, target, x, cond, config, base=target, uncond=torch.zeros(8, 2),
                            generator=torch.Generator().manual_seed(0))

    base_loss, base_diag = run()
    per_sample_loss, per_sample_diag = run(shared_timestep=False)
    assert len(set(per_sample_diag["t"])) > 1
    assert run(eps_source="true")[1]["loss_consistency"] != base_diag["loss_consistency"]
    x_space_diag = run(consistency_space="x")[1]
    assert x_space_diag["loss_consistency"] != base_diag["loss_consistency"]
    assert math.isclose(float(run(guidance_weight=0.0)[0].detach()), base_diag["loss_consistency"], rel_tol=1e-5)
    # on an eps-space loss the x_space weighting is min(SNR, gamma) / SNR, 1 at this batch's high-noise t: compare
    # it in x-space, where it is min(SNR, gamma)
    assert run(min_snr_gamma=5.0, min_snr_weighting="x_space", consistency_space="x")[1]["loss_consistency"] != \
        x_space_diag["loss_consistency"]
    cfg_loss, cfg_diag = run(guidance_mode="cfg", cfg_range=(2.0, 8.0))
    assert all(2.0 <= w <= 8.0 for w in cfg_diag["w"])
    assert run(ode_model="online")[1]["loss_consistency"] == base_diag["loss_consistency"]  # same init weights
    with pytest.raises(ValueError, match="needs the empty-text"):
        cs.codi_loss(online, target, x, cond, cs.CoDiLossConfig(guidance_mode="cfg"))
    with pytest.raises(ValueError, match="needs the frozen base"):
        cs.codi_loss(online, target, x, cond, cs.CoDiLossConfig(ode_model="base"))
    with pytest.raises(ValueError, match="ode_model must be one of"):
        cs.CoDiLossConfig(ode_model="student")
    with pytest.raises(ValueError, match="needs the frozen teacher"):
        cs.codi_loss(online, target, x, cond, cs.CoDiLossConfig(ode_model="teacher"))
    with pytest.raises(ValueError, match="cfg_range"):
        cs.CoDiLossConfig(cfg_range=(8.0, 2.0))


def test_loss_ode_model_selects_the_callable():
    x, cond = torch.randn(4, 2), torch.zeros(4, 2)
    used = []

    def tagged(name):
        def fn(z, t, c, w=None):
            used.append(name)
            return torch.zeros_like(z)
        return fn

    for choice in ("ema", "base", "online", "teacher"):
        used.clear()
        cs.codi_loss(tagged("online"), tagged("ema"), x, cond, cs.CoDiLossConfig(ode_model=choice),
                     base=tagged("base"), teacher=tagged("teacher"))
        assert used[0] == choice, used  # the first (ODE) call is made with the chosen model
        assert used[1:] == ["ema", "online"]


def test_loss_cfg_branches_are_not_swapped():
    """With CFG-aware distillation the target must be u + w (c - u): a model whose cond branch predicts 1 and whose
    uncond branch predicts 0 gives a target output of w, so f_target(eps-param) moves *towards* the text."""
    x = torch.zeros(2, 2, dtype=torch.float64)
    seen = {}

    def model(z, t, c, w=None):
        return c.expand_as(z).to(z.dtype)

    def online(z, t, c, w=None):
        seen["out"] = model(z, t, c)
        return seen["out"]

    config = cs.CoDiLossConfig(guidance_mode="cfg", cfg_range=(3.0, 3.0), boundary=False)
    cond, uncond = torch.ones(2, 1, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
    captured = []

    def target(z, t, c, w=None):
        out = model(z, t, c)
        captured.append(out)
        return out

    cs.codi_loss(online, target, x, cond, config, uncond=uncond, generator=torch.Generator().manual_seed(0))
    batched = captured[-1]  # the guided target call: [cond; uncond]
    assert batched.shape[0] == 4 and torch.allclose(batched[:2], torch.ones(2, 2, dtype=torch.float64))


def test_loss_distill_mode_passes_w():
    seen = []

    def online(z, t, c, w=None):
        seen.append(None if w is None else w.tolist())
        return torch.zeros_like(z)

    x = torch.randn(3, 2)
    cs.codi_loss(online, online, x, torch.zeros(3, 2), cs.CoDiLossConfig(guidance_mode="distill", cfg_range=(4, 4)),
                 uncond=torch.zeros(3, 2))
    assert seen[0] == [1.0] * 3        # ODE model: neutral w
    assert seen[1] == [1.0] * 6        # target, both branches: neutral w
    assert seen[2] == [4.0] * 3        # online: the drawn w


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_is_zero_for_the_oracle_and_positive_otherwise(prediction_type):
    """The plain denoising loss regresses the model's own target: with data x known, the oracle output for z_t is
    eps = (z - alpha x) / sigma, v = alpha eps - sigma x, or x; any other output costs its squared error."""
    x = torch.randn(64, 2, dtype=torch.float64)

    def oracle(z, t, cond):
        alpha, sigma = SCHEDULE.alpha_sigma(t, like=z)
        eps = (z - alpha * x) / sigma
        return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x, "sample": x}[prediction_type]

    loss, diag = cs.diffusion_loss(oracle, x, None, SCHEDULE, prediction_type, torch.Generator().manual_seed(0))
    assert float(loss) < 1e-20 and len(set(diag["t"])) > 10  # per-sample t over 0..999
    assert min(diag["t"]) >= 0 and max(diag["t"]) <= 999
    off, _ = cs.diffusion_loss(lambda z, t, c: oracle(z, t, c) + 0.5, x, None, SCHEDULE, prediction_type,
                               torch.Generator().manual_seed(0))
    assert abs(float(off) - 0.25) < 1e-9


def test_draw_timesteps_never_draws_index_zero():
    t, s = cs.draw_timesteps(4096, grid=50, shared=False, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) == 20 and int(t.max()) == 980 and torch.equal(t - s, torch.full_like(t, 20))
    t, _ = cs.draw_timesteps(8, grid=50, shared=True, generator=torch.Generator().manual_seed(0))
    assert len(set(t.tolist())) == 1


def test_min_snr_weights():
    t = torch.tensor([20, 500, 980])
    snr = SCHEDULE.snr(t)
    wx = cs.min_snr_weight(SCHEDULE, t, 5.0, "x")
    we = cs.min_snr_weight(SCHEDULE, t, 5.0, "eps")
    assert torch.allclose(wx.double(), snr.clamp(max=5.0), rtol=1e-6)
    assert torch.allclose(we.double() * snr, snr.clamp(max=5.0), rtol=1e-5)
    # the CoDi reference code's weighting: min(SNR, gamma) / SNR on the loss as computed -- 1 at the high-noise
    # steps (SNR < gamma), gamma / SNR at the low-noise ones; x-space weighting nearly ignores t = 980 instead
    truncated = cs.min_snr_weight(SCHEDULE, t, 5.0, "x", "truncated")
    assert torch.allclose(truncated.double(), snr.clamp(max=5.0) / snr, rtol=1e-5)
    assert float(truncated[2]) == 1.0 and float(truncated[0]) < 0.1 and float(wx[2]) < 0.01
    zsnr = cs.NoiseSchedule.from_config({"rescale_betas_zero_snr": True})
    assert float(cs.min_snr_weight(zsnr, torch.tensor([999]), 5.0, "x", "truncated")[0]) == 1.0  # finite at SNR 0


# ---------------------------------------------------------------- EMA


def test_ema_update_swap_state():
    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight.fill_(0.0)
        module.bias.fill_(0.0)
    ema = cs.EMA(module, decay=0.9, warmup=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
        module.bias.fill_(1.0)
    ema.update(module)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 2), 0.1))
    ema.update(module)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 2), 0.19))
    with ema.swapped_in(module):
        assert torch.allclose(module.weight, torch.full((2, 2), 0.19))
    assert torch.allclose(module.weight, torch.ones(2, 2))
    state = ema.state_dict()
    other = cs.EMA(module, decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and other.num_updates == 2 and torch.equal(other.shadow["bias"], ema.shadow["bias"])
    with pytest.raises(KeyError, match="do not match"):
        ema.update(torch.nn.Linear(3, 3, bias=False))
    with pytest.raises(ValueError, match="decay"):
        cs.EMA(module, decay=1.0)


def test_ema_warmup_leaves_little_of_the_initialisation():
    """A weight that jumps from its initial 0 to 1 at once: after 2,000 updates at decay 0.999 the plain EMA still
    holds 0.999^2000 = 13.5 % of the initial value; with the warm-up min(decay, (1+n)/(10+n)) less than 1 %. The
    warm-up survives a save/resume."""
    def run(warmup, updates=2000):
        param = torch.nn.Parameter(torch.zeros(1))
        ema = cs.EMA({"w": param}, decay=0.999, warmup=warmup)
        with torch.no_grad():
            param.fill_(1.0)
        for _ in range(updates):
            ema.update({"w": param})
        return ema

    plain, warm = run(False), run(True)
    assert abs((1 - float(plain.shadow["w"])) - 0.999 ** 2000) < 1e-4 and 0.13 < 1 - float(plain.shadow["w"]) < 0.14
    assert 1 - float(warm.shadow["w"]) < 0.01
    assert warm.current_decay() == 2001 / 2010 and run(True, 0).current_decay() == 0.1  # below 0.999 until n = 8990
    resumed = cs.EMA({"w": torch.nn.Parameter(torch.zeros(1))}, decay=0.5, warmup=False)
    resumed.load_state_dict(run(True, 3).state_dict())
    assert resumed.warmup and resumed.current_decay() == min(0.999, 4 / 13)


# ---------------------------------------------------------------- metadata


def test_metadata_round_trip_and_types(tmp_path):
    from safetensors.torch import save_file

    meta = cs.CoDiMetadata(task="sr", adapter_type="control-lora", guidance_mode="cfg", cfg_range=(2.0, 8.0),
                           prediction_type="v", recommended_steps=4, hint_preprocessing={"type": "sr", "scale": 4},
                           objective="diffusion")
    strings = meta.to_metadata()
    assert all(isinstance(v, str) for v in strings.values())
    assert strings["codi.prediction_type"] == "v_prediction" and strings["codi.boundary"] == "true"
    path = tmp_path / "adapter.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={**strings, "modelspec.title": "x"})
    index, read = cs.read_safetensors_header(path)
    assert "w" in index and read["modelspec.title"] == "x"
    assert cs.CoDiMetadata.from_metadata(read) == meta


@pytest.mark.parametrize("key,value,message", [
    ("codi.distill_grid", "fifty", "must be an integer|cannot parse"),
    ("codi.distill_grid", "1", "distill_grid must be in"),
    ("codi.boundary", "yes", "cannot parse"),
    ("codi.task", "dance", "task must be one of"),
    ("codi.recommended_steps", "12", "recommended_steps"),
    ("codi.cfg_range", "8,2", "cfg_range"),
    ("codi.hint_preprocessing", "[1]", "cannot parse"),
    ("codi.objective", "lcm", "objective must be one of"),
    ("codi.unknown_key", "1", "unknown codi"),
    ("codi.format_version", "99", "newer"),
])
def test_metadata_errors_name_the_key(key, value, message):
    strings = cs.CoDiMetadata().to_metadata()
    strings[key] = value
    with pytest.raises(cs.MetadataError, match=message):
        cs.CoDiMetadata.from_metadata(strings)


def test_metadata_missing_and_bad_files(tmp_path):
    with pytest.raises(cs.MetadataError, match="not written by the CoDi trainer"):
        cs.CoDiMetadata.from_metadata({"modelspec.title": "a LoRA"})
    bad = tmp_path / "pickle.safetensors"
    bad.write_bytes(b"\x80\x02}q\x00(X\x05\x00\x00\x00" + b"\x00" * 100)
    with pytest.raises(ValueError, match="not a safetensors file"):
        cs.read_safetensors_header(bad)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        cs.read_safetensors_header(short)
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file({"w": torch.zeros(1000)}, str(full))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(full.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        cs.read_safetensors_header(truncated)
    with pytest.raises(ValueError, match="file not found"):
        cs.read_safetensors_header(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- dependency direction


def test_ccd_sampler_imports_neither_diffusers_nor_comfyui():
    code = (
        "import sys, ccd_sampler, ccd_sampler.loss, ccd_sampler.metadata\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'diffusers', 'transformers', 'accelerate', 'comfy', 'comfy_api', 'folder_paths', 'nodes', 'trainer'})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # and no source file names them (a lazy import would escape the check above)
    for path in (REPO / "ccd_sampler").glob("*.py"):
        text = path.read_text()
        for name in ("import diffusers", "from diffusers", "import comfy", "from comfy", "from trainer", "from nodes"):
            assert name not in text, f"{path.name} contains {name!r}"
