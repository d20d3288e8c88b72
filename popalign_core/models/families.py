"""The model families, one registry entry each: what kind of network, which text encoders, which schedule.

`FAMILY_SPECS` is the one place that says what a family is. The next family (e.g. Qwen-Image, Chroma) is one entry
here plus its shipped config folder (``popalign_core/configs/<name>/``) and, when its network differs, an adapter
branch. Everything that lists families (CLI choices, node dropdowns, `check_family`) reads this table.

- UNet families ("sd15", "sd2", "sdxl") predict ε or v under a DDPM schedule (`diffusers_adapter.DiffusersAdapter`);
- flow families ("sd3", "flux") are rectified-flow transformers that predict the velocity v = ε − x0
  (`flow_adapter.FlowAdapter`, schedule in `models.flow`).
"""

from __future__ import annotations

from dataclasses import dataclass

UNET, FLOW = "unet", "flow"


@dataclass(frozen=True)
class FamilySpec:
    """One model family.

    kind: "unet" (ε / v-prediction) or "flow" (velocity, rectified flow).
    text_encoders: the text encoders in conditioning order ("clip_l", "clip_g", "openclip_h", "t5").
    optional_encoders: encoders the family runs without (SD3 without T5 gets zeros in T5's place, as diffusers does).
    patch_size: latent pixels per transformer token side (1 for UNets): image sides must be multiples of
        vae factor × patch size.
    shift: the training/sampling shift of a flow family: a number (SD3's constant s) or "dynamic" (FLUX's μ from
        the number of image tokens, `models.flow.flux_mu`).
    guidance_embeds: the network takes the guidance scale as an input (FLUX.1-dev's distilled guidance) instead of
        running classifier-free guidance.
    max_sequence_length: T5 tokens per prompt (the diffusers pipelines' defaults).
    description: one line for docs and errors.
    """

    kind: str
    text_encoders: tuple[str, ...]
    description: str
    optional_encoders: tuple[str, ...] = ()
    patch_size: int = 1
    shift: float | str | None = None
    guidance_embeds: bool = False
    max_sequence_length: int = 0


FAMILY_SPECS: dict[str, FamilySpec] = {
    "sd15": FamilySpec(UNET, ("clip_l",), "Stable Diffusion 1.x (UNet, epsilon)"),
    "sd2": FamilySpec(UNET, ("openclip_h",), "Stable Diffusion 2.x (UNet, v-prediction or epsilon)"),
    "sdxl": FamilySpec(UNET, ("clip_l", "clip_g"), "Stable Diffusion XL (UNet, two text encoders)"),
    "sd3": FamilySpec(
        FLOW,
        ("clip_l", "clip_g", "t5"),
        "Stable Diffusion 3.x (MMDiT, rectified flow; T5 optional)",
        optional_encoders=("t5",),
        patch_size=2,
        shift=3.0,
        max_sequence_length=256,
    ),
    "flux": FamilySpec(
        FLOW,
        ("clip_l", "t5"),
        "FLUX.1 (dev: guidance-distilled; schnell: no guidance input)",
        patch_size=2,
        shift="dynamic",
        guidance_embeds=True,
        max_sequence_length=512,
    ),
}

FAMILIES = tuple(FAMILY_SPECS)
UNET_FAMILIES = tuple(f for f, s in FAMILY_SPECS.items() if s.kind == UNET)
FLOW_FAMILIES = tuple(f for f, s in FAMILY_SPECS.items() if s.kind == FLOW)


def check_family(family: str, supported: tuple[str, ...] = FAMILIES, what: str = "") -> None:
    """ValueError naming the family found and the supported ones unless `family` is in `supported`.

    what: the feature that is limited to `supported` (e.g. "a soft prefix"), named in the message."""
    if family not in supported:
        feature = f" for {what}" if what else ""
        raise ValueError(f"family={family!r} is not supported{feature}; valid values: {', '.join(supported)}")


def family_spec(family: str) -> FamilySpec:
    check_family(family)
    return FAMILY_SPECS[family]


def is_flow(family: str) -> bool:
    """True for the rectified-flow families (velocity prediction)."""
    return family_spec(family).kind == FLOW
