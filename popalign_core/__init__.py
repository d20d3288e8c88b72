"""PopAlign core: bias measurement and debiasing of text-to-image diffusion models.

Standalone: never imports ComfyUI. Submodules are imported lazily by their users, so that importing
`popalign_core` alone stays cheap (no torch/diffusers import at package import time).
"""

__version__ = "0.1.0"
