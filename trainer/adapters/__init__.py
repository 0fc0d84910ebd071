"""The trainable adapters (``controlnet``, ``control-lora``, the optional UNet LoRA) and their files.

``lora`` (LoRA layers, the UNet LoRA) < ``controlnet`` (the adapters, the adapted UNet forward) < ``files`` (save,
read, and the one :func:`~trainer.adapters.files.load_adapter`). Imports ``trainer.models`` only (for the ldm key
tables).
"""
