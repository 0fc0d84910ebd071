"""The Automatic1111 / Forge extension's glue (the repository root is the extension; ``scripts/codi.py`` is what the
web UIs load).

* :mod:`codi_webui.sampling` -- the "CoDi" (consistency) and "CoDi ODE" samplers and the "CoDi" scheduler, registered
  in the UI's sampler and scheduler lists. The samplers run :func:`ccd_sampler.comfy_space.sample_sigma_space` over
  the UI's own CFG denoiser and apply the boundary scalings to its ``x0`` estimate (one place for both UIs: A1111 and
  Forge call the model differently, but both hand a k-diffusion sampler ``denoised``).
* :mod:`codi_webui.plan` -- what the CoDi panel decides for one generation from the adapters in the ControlNet units
  (their ``codi.*`` metadata) and the panel's overrides: steps, cfg, sampler, grid, boundary; the architecture check;
  the infotext fields.
* :mod:`codi_webui.controlnet` -- the enabled ControlNet units of a generation and their model files, in Forge's
  built-in ControlNet and in Mikubill's sd-webui-controlnet on A1111.
* :mod:`codi_webui.preprocessors` -- the training hints (SR input, inpaint input, Canny) as ControlNet preprocessors
  of each UI, computed by ``ccd_sampler.hints`` exactly as the trainer builds them.

Every formula comes from ``ccd_sampler``; nothing here imports ``trainer/`` or ``nodes/``. The web UIs' own modules
(``modules.*``, ``modules_forge.*``, the ControlNet extensions) are imported inside functions, so the package also
imports (and its pure parts are tested) outside a web UI.
"""
