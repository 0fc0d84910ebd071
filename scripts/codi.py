"""CoDi for Automatic1111 and Forge: the panel, and the samplers, scheduler and hint preprocessors it registers.

The web UIs execute this file from the extension's ``scripts/`` folder; everything it does lives in the
``codi_webui`` package beside it (and every formula in ``ccd_sampler``).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # A1111 puts an extension's root on sys.path only while loading its scripts
    sys.path.insert(0, ROOT)

import gradio as gr  # noqa: E402
from modules import script_callbacks, scripts  # noqa: E402

from ccd_sampler.grids import MAX_STEPS  # noqa: E402
from codi_webui import panel, preprocessors, sampling  # noqa: E402
from codi_webui.plan import INFOTEXT_KEYS, MODE_CHOICES, PanelSettings  # noqa: E402

sampling.register()
if not preprocessors.register_forge():
    # sd-webui-controlnet may load after this extension: register once every extension is in
    script_callbacks.on_before_ui(preprocessors.register_mikubill)


class CoDiScript(scripts.Script):
    def title(self):
        return "CoDi"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion("CoDi", open=False, elem_id=self.elem_id("accordion")):
            gr.Markdown("With a CoDi adapter in a ControlNet unit, its recommended steps, CFG and sampler are used "
                        "(0 / auto below = the adapter's).")
            enabled = gr.Checkbox(value=True, label="Use the adapter's settings", elem_id=self.elem_id("enabled"))
            with gr.Row():
                steps = gr.Slider(0, MAX_STEPS, value=0, step=1, label="Steps", elem_id=self.elem_id("steps"))
                cfg = gr.Slider(0.0, 15.0, value=0.0, step=0.5, label="CFG", elem_id=self.elem_id("cfg"))
                mode = gr.Dropdown(list(MODE_CHOICES), value="auto", label="Mode", elem_id=self.elem_id("mode"))
        # pasting a CoDi infotext switches the panel on and restores its values; any other infotext leaves it
        self.infotext_fields = [(enabled, lambda params: True if INFOTEXT_KEYS["mode"] in params else None),
                                (steps, INFOTEXT_KEYS["steps"]), (cfg, INFOTEXT_KEYS["cfg"]),
                                (mode, INFOTEXT_KEYS["mode"])]
        self.paste_field_names = [INFOTEXT_KEYS[k] for k in ("steps", "cfg", "mode")]
        return [enabled, steps, cfg, mode]

    def before_process(self, p, *args):
        panel.inspect(p)

    def process(self, p, enabled=True, steps=0, cfg=0.0, mode="auto", *args):
        panel.run(p, PanelSettings(bool(enabled), int(steps or 0), float(cfg or 0.0), str(mode or "auto")))
