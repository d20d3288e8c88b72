"""Prompt augmentation and the population sampler (ComfyUI's own sampling on the user's MODEL / CLIP / VAE)."""

from __future__ import annotations

import json

from . import _common as C

KEYWORD_SETS = ("default", "toy")


AUG_PROMPTS_TIP = "identity-neutral prompts, one per line (# starts a comment)"
KEYWORDS_TIP = "keyword set: 'default' = the paper's gender and race keywords; 'toy' = the toy world's"
AXES_TIP = "comma-separated axes to combine (their product); empty = the set's default (default: race,gender)"
TEMPLATE_TIP = (
    "augmentation template with {identity} and {subject}; empty = default "
    "'a realistic photo of {article} {identity} {subject}'"
)


class PopAlignAugmentPrompts:
    DESCRIPTION = (
        "Identity-neutral prompts -> identity-augmented prompts (PopAlign Sec. 4.1). Prompts that already name an "
        "identity are skipped and listed; the sampler makes the augmented (winning) and neutral (losing) images."
    )
    CATEGORY = C.category("prompts")
    FUNCTION = "run"
    RETURN_TYPES = ("STRING", "STRING", "STRING")
    RETURN_NAMES = ("augmented_json", "augmented_prompts", "skipped")
    OUTPUT_TOOLTIPS = (
        "rows {neutral, prompt, identity, index} as JSON (the sampler's input)",
        "the augmented prompts, one per line",
        "prompts skipped as identity-specific, with the words that made them so",
    )

    @classmethod
    def INPUT_TYPES(cls):
        required = (
            C.row(
                "prompts", "STRING", AUG_PROMPTS_TIP, multiline=True, default="a photo of a doctor\na photo of a chef"
            ),
            C.CHOICE("keywords", KEYWORD_SETS, KEYWORDS_TIP, default="default"),
            C.STRING("axes", AXES_TIP, "gender"),
            C.INT(
                "samples_per_prompt",
                "augmented images per neutral prompt, spread evenly over the identities",
                8,
                1,
                100000,
            ),
            C.INT("seed", "seed of the order identities are assigned in", 0, 0, 0xFFFFFFFF),
        )
        return C.input_types(required, (C.STRING("template", TEMPLATE_TIP, ""),))

    def run(self, prompts, keywords, axes, samples_per_prompt, seed, template=""):
        from popalign_core.population.pipeline import keyword_sets
        from popalign_core.population.prompts import AugmentConfig, augment_prompts

        aug_kw, detect, default_axes = keyword_sets(keywords)
        names = tuple(a.strip() for a in str(axes).split(",") if a.strip()) or default_axes
        more = {"template": template} if template.strip() else {}
        n, seed = int(samples_per_prompt), int(seed)
        cfg = AugmentConfig(axes=names, keywords=aug_kw, samples_per_prompt=n, seed=seed, detect=detect, **more)
        out = augment_prompts(C.prompt_lines(prompts), cfg)
        if not out.rows:
            raise ValueError("prompts: every prompt was skipped as identity-specific; nothing to augment")
        skipped = [f"{s['prompt']}  <- {', '.join(t['term'] for t in s['terms'])}" for s in out.skipped]
        skipped += [f"{d}  <- duplicate" for d in out.duplicates]
        return (json.dumps(out.rows), "\n".join(r["prompt"] for r in out.rows), "\n".join(skipped))


def _conditioning(clip, text: str, guidance: float | None = None):
    """ComfyUI's CONDITIONING of `text` (as CLIPTextEncode), with FLUX's guidance value (as FluxGuidance) if given."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    extra = {} if guidance is None else {"guidance": float(guidance)}
    return [[cond, {"pooled_output": pooled, **extra}]]


def guidance_of(model, guidance: float) -> float | None:
    """`guidance` for a MODEL with a guidance input (FLUX.1-dev and its fine-tunes), None for the others
    (FLUX.1-schnell, SD3, UNets: they have no such input and ComfyUI ignores the value)."""
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    return float(guidance) if unet_config.get("guidance_embed") else None


SAMPLER_PROMPTS_TIP = (
    "augmented rows (JSON, from PopAlign Augment Prompts) or plain prompts, one per line (then every image is a "
    "neutral, losing one)"
)
GUIDANCE_TIP = (
    "FLUX guidance (what the FluxGuidance node sets; FLUX.1-dev's default 3.5), used by models with a guidance "
    "input only (FLUX.1-dev and its fine-tunes); other models ignore it. For FLUX leave cfg at 1.0"
)
NEUTRAL_TIP = "losing (neutral-prompt) images per neutral prompt; -1 = as many as its augmented rows; 0 = none"


class PopAlignPopulationSampler:
    DESCRIPTION = (
        "Samples a population with ComfyUI's own sampler: for each augmented row one winning image, and for each "
        "neutral prompt as many losing images. Every image has its own seed (derived from seed, prompt and index), "
        "so an image never depends on the batch it was made in (deterministic samplers)."
    )
    CATEGORY = C.category("population")
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", C.POPULATION)
    RETURN_NAMES = ("images", "population")
    OUTPUT_TOOLTIPS = ("the sampled images, in job order", "one metadata row per image (prompt, identity, seed...)")

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        required = (
            C.LINK("model", "MODEL", "the diffusion model to sample from"),
            C.LINK("clip", "CLIP", "its text encoder"),
            C.LINK("vae", "VAE", "its VAE (latents -> images)"),
            C.row("prompts", "STRING", SAMPLER_PROMPTS_TIP, multiline=True, default="a photo of a doctor"),
            C.INT("neutral_per_prompt", NEUTRAL_TIP, -1, -1, 100000),
            C.INT(
                "seed",
                "base seed; image seeds are derived from it, the prompt and the index",
                0,
                0,
                0xFFFFFFFFFFFFFFFF,
            ),
            C.INT("steps", "sampler steps", 20, 1, 1000),
            C.FLOAT("cfg", "classifier-free guidance scale", 7.0, 0.0, 100.0, 0.1),
            C.row("sampler_name", comfy.samplers.KSampler.SAMPLERS, "ComfyUI sampler"),
            C.row("scheduler", comfy.samplers.KSampler.SCHEDULERS, "ComfyUI noise schedule"),
            C.INT("width", "image width in pixels", 512, 64, 4096, 8),
            C.INT("height", "image height in pixels", 512, 64, 4096, 8),
            C.INT("batch_size", "images sampled at once (same prompt)", 4, 1, 256),
        )
        optional = (
            C.STRING("negative_prompt", "negative prompt for every image", "", multiline=True),
            C.FLOAT("guidance", GUIDANCE_TIP, 3.5, 0.0, 100.0, 0.1),
        )
        return C.input_types(required, optional)

    def run(self, model, clip, vae, prompts, neutral_per_prompt, batch_size, negative_prompt="", guidance=3.5, **s):
        jobs = _jobs(prompts, neutral_per_prompt)
        if s["width"] % 8 or s["height"] % 8:
            raise ValueError(f"width/height: {s['width']}x{s['height']} must be multiples of 8")
        settings = {k: s[k] for k in SETTINGS} | {"negative_prompt": negative_prompt}
        g = guidance_of(model, guidance)
        settings |= {} if g is None else {"guidance": g}  # recorded only where the model uses it
        images, rows = sample_jobs(model, clip, vae, jobs, int(batch_size), settings)
        return (images, {"rows": rows, "settings": settings})


SETTINGS = ("steps", "cfg", "sampler_name", "scheduler", "width", "height", "seed")  # the population's settings


def sample_jobs(model, clip, vae, jobs: list[dict], batch_size: int, s: dict):
    """(IMAGE batch in job order, rows with their seeds): ComfyUI's sampler over `jobs`, `batch_size` images of one
    prompt at a time, each from its own noise (seed derived from s["seed"], the prompt and the index); s["guidance"]
    (optional): FLUX's guidance value on both conditionings."""
    import torch

    neg = _conditioning(clip, s["negative_prompt"] or "", s.get("guidance"))
    bar = C.Progress(len(jobs))
    by_prompt: dict[str, list[dict]] = {}
    for j in jobs:
        by_prompt.setdefault(j["prompt"], []).append(j)
    order = {(j["prompt"], j["index"]): k for k, j in enumerate(jobs)}
    done: dict[int, object] = {}
    for prompt, pjobs in by_prompt.items():
        pos = _conditioning(clip, prompt, s.get("guidance"))
        for start in range(0, len(pjobs), batch_size):
            chunk = pjobs[start : start + batch_size]
            for j, sd, img in zip(chunk, *_sample_chunk(model, vae, chunk, pos, neg, s)):
                done[order[(j["prompt"], j["index"])]] = (img, {**j, "seed": sd})
            bar.update(len(chunk))
    images = [done[k][0] for k in range(len(jobs))]
    return torch.stack(images).float().clamp(0, 1), [done[k][1] for k in range(len(jobs))]


def _sample_chunk(model, vae, chunk: list[dict], pos, neg, s: dict) -> tuple[list[int], object]:
    """(seeds, decoded images) of jobs of one prompt sampled at once."""
    seeds, samples = sample_latents(model, chunk, pos, neg, s)
    return seeds, vae.decode(samples)


def sample_latents(model, chunk: list[dict], pos, neg, s: dict) -> tuple[list[int], object]:
    """(seeds, latents) of jobs of one prompt sampled at once (ComfyUI's sampler, one seeded noise per job)."""
    import comfy.sample
    import torch

    from popalign_core.models.sampling import derive_seed

    channels = int(getattr(model.model.latent_format, "latent_channels", 4))
    shape = (1, channels, s["height"] // 8, s["width"] // 8)
    seeds = [derive_seed(int(s["seed"]), j["prompt"], int(j["index"])) for j in chunk]
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(sd)) for sd in seeds])
    sampling = (s["steps"], s["cfg"], s["sampler_name"], s["scheduler"])
    latent = torch.zeros_like(noise)
    samples = comfy.sample.sample(
        model, noise, *sampling, pos, neg, latent, denoise=1.0, disable_pbar=True, seed=seeds[0]
    )
    return seeds, samples


def _jobs(text: str, neutral_per_prompt: int) -> list[dict]:
    from popalign_core.population.sample import population_jobs

    text = str(text or "").strip()
    if not text:
        raise ValueError("prompts: empty; connect PopAlign Augment Prompts or give prompts one per line")
    n = None if neutral_per_prompt < 0 else int(neutral_per_prompt)
    if text.startswith("["):
        rows = C.parse_json(text, "prompts")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError("prompts: expected a JSON list of rows {neutral, prompt, identity, index}")
        return population_jobs(rows, neutral_per_prompt=n)
    lines = C.prompt_lines(text, "prompts")
    per = 1 if n is None else max(1, n)
    losing = {"identity": {}, "population": "losing"}
    return [{"prompt": p, "index": i, "neutral": p, **losing} for p in dict.fromkeys(lines) for i in range(per)]


NODE_CLASS_MAPPINGS = {
    "PopAlignAugmentPrompts": PopAlignAugmentPrompts,
    "PopAlignPopulationSampler": PopAlignPopulationSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PopAlignAugmentPrompts": "PopAlign Augment Prompts",
    "PopAlignPopulationSampler": "PopAlign Population Sampler",
}
