"""CoDi trainer: distills few-step conditional adapters from a user's Stable Diffusion checkpoint."""
