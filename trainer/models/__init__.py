"""Base models: what the trainer distills from, loaded offline from a single file, a diffusers folder or a CoDi
base bundle (``loading.load_base_model``), as a :class:`BaseModel` of diffusers / transformers modules.

``base`` (the type and its constants) < ``tokenizers`` < ``single_file`` < ``diffusers_folder``, ``bundle`` <
``loading``; ``ldm_keys`` (diffusers <-> ldm key tables) stands alone. Nothing here imports the rest of the trainer.
"""

from trainer.models.base import BaseModel, CheckpointError
from trainer.models.loading import load_base_model, model_hash

__all__ = ["BaseModel", "CheckpointError", "load_base_model", "model_hash"]
