"""CoDi for ComfyUI — few-step conditional adapters (Conditional Diffusion Distillation).

ComfyUI entry point (V3 schema). ComfyUI imports this folder from ``custom_nodes/`` as a module by path, so imports
inside the pack are relative (``from .nodes import ...``, ``from .ccd_sampler import ...``). This file may import only
what ComfyUI itself provides (``comfy_api``, torch, numpy, safetensors): never diffusers, accelerate or bitsandbytes.
It deliberately exports no ``NODE_CLASS_MAPPINGS`` (ComfyUI would then ignore ``comfy_entrypoint``).
"""

from comfy_api.latest import ComfyExtension, io

from .nodes import node_list


class CoDiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # loaders/codi: CoDiAdapterLoader; sampling/codi: CoDiModelPatch, CoDiScheduler, CoDiSampler, CoDiSample;
        # image/codi: CoDiSuperResolutionInput, CoDiInpaintInput, CoDiCanny (see nodes/__init__.py)
        return node_list()


async def comfy_entrypoint() -> CoDiExtension:
    return CoDiExtension()
