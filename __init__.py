"""CoDi for ComfyUI — few-step conditional adapters (Conditional Diffusion Distillation).

ComfyUI entry point (V3 schema). ComfyUI imports this folder from ``custom_nodes/`` as a module by path, so imports
inside the pack are relative (``from .nodes import ...``, ``from .ccd_sampler import ...``). This file may import only
what ComfyUI itself provides (``comfy_api``, torch, numpy, safetensors): never diffusers, accelerate or bitsandbytes.
It deliberately exports no ``NODE_CLASS_MAPPINGS`` (ComfyUI would then ignore ``comfy_entrypoint``).
"""

from comfy_api.latest import ComfyExtension, io


class CoDiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []  # the CoDi nodes arrive with the ComfyUI nodes issue


async def comfy_entrypoint() -> CoDiExtension:
    return CoDiExtension()
