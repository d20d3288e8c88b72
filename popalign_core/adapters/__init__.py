"""Model adapters: the one seam between the core (losses, trainer, sampler, metrics) and a model world.

`DiffusersAdapter` (diffusers components) lives here; the ComfyUI adapter lives under `nodes/`, since only the
node pack may import ComfyUI. Both implement the interface documented in `base.ModelAdapter`.
"""

from .base import FAMILIES, PREDICTION_TYPES, Conditioning, ModelAdapter

__all__ = ["FAMILIES", "PREDICTION_TYPES", "Conditioning", "ModelAdapter", "DiffusersAdapter"]


def __getattr__(name):  # lazy: importing the package must not import diffusers
    if name == "DiffusersAdapter":
        from .diffusers import DiffusersAdapter

        return DiffusersAdapter
    raise AttributeError(name)
