"""Prompt augmentation and the population sampler (ComfyUI's own sampling on the user's MODEL / CLIP / VAE)."""

from __future__ import annotations

import json

from . import _common as C

KEYWORD_SETS = ("default", "toy")


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
        return {
            "required": {
                "prompts": C.tip(
                    "STRING",
                    "identity-neutral prompts, one per line (# starts a comment)",
                    multiline=True,
                    default="a photo of a doctor\na photo of a chef",
                ),  # fmt: skip
                "keywords": C.tip(
                    list(KEYWORD_SETS),
                    "keyword set: 'default' = the paper's gender and race keywords; 'toy' = the toy world's",
                    default="default",
                ),  # fmt: skip
                "axes": C.tip(
                    "STRING",
                    "comma-separated axes to combine (their product); empty = the set's default "
                    "(default: race,gender)",
                    default="gender",
                ),  # fmt: skip
                "samples_per_prompt": C.tip(
                    "INT",
                    "augmented images per neutral prompt, spread evenly over the identities",
                    default=8,
                    min=1,
                    max=100000,
                ),  # fmt: skip
                "seed": C.tip(
                    "INT", "seed of the order identities are assigned in", default=0, min=0, max=0xFFFFFFFF
                ),  # fmt: skip
            },
            "optional": {
                "template": C.tip(
                    "STRING",
                    "augmentation template with {identity} and {subject}; empty = default "
                    "'a realistic photo of {article} {identity} {subject}'",
                    default="",
                ),  # fmt: skip
            },
        }

    def run(self, prompts, keywords, axes, samples_per_prompt, seed, template=""):
        from popalign_core.population.pipeline import keyword_sets
        from popalign_core.population.prompts import AugmentConfig, augment_prompts

        aug_kw, detect, default_axes = keyword_sets(keywords)
        names = tuple(a.strip() for a in str(axes).split(",") if a.strip()) or default_axes
        cfg = AugmentConfig(axes=names, keywords=aug_kw, samples_per_prompt=int(samples_per_prompt), seed=int(seed),
                            detect=detect, **({"template": template} if template.strip() else {}))  # fmt: skip
        out = augment_prompts(C.prompt_lines(prompts), cfg)
        if not out.rows:
            raise ValueError("prompts: every prompt was skipped as identity-specific; nothing to augment")
        skipped = [f"{s['prompt']}  <- {', '.join(t['term'] for t in s['terms'])}" for s in out.skipped]
        skipped += [f"{d}  <- duplicate" for d in out.duplicates]
        return (json.dumps(out.rows), "\n".join(r["prompt"] for r in out.rows), "\n".join(skipped))


def _conditioning(clip, text: str):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


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

        return {
            "required": {
                "model": C.tip("MODEL", "the diffusion model to sample from"),
                "clip": C.tip("CLIP", "its text encoder"),
                "vae": C.tip("VAE", "its VAE (latents -> images)"),
                "prompts": C.tip(
                    "STRING",
                    "augmented rows (JSON, from PopAlign Augment Prompts) or plain prompts, one per line (then every "
                    "image is a neutral, losing one)",
                    multiline=True,
                    default="a photo of a doctor",
                ),
                "neutral_per_prompt": C.tip(
                    "INT",
                    "losing (neutral-prompt) images per neutral prompt; -1 = as many as its augmented rows; 0 = none",
                    default=-1,
                    min=-1,
                    max=100000,
                ),  # fmt: skip
                "seed": C.tip(
                    "INT",
                    "base seed; image seeds are derived from it, the prompt and the index",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                ),  # fmt: skip
                "steps": C.tip("INT", "sampler steps", default=20, min=1, max=1000),
                "cfg": C.tip("FLOAT", "classifier-free guidance scale", default=7.0, min=0.0, max=100.0, step=0.1),
                "sampler_name": C.tip(comfy.samplers.KSampler.SAMPLERS, "ComfyUI sampler"),
                "scheduler": C.tip(comfy.samplers.KSampler.SCHEDULERS, "ComfyUI noise schedule"),
                "width": C.tip("INT", "image width in pixels", default=512, min=64, max=4096, step=8),
                "height": C.tip("INT", "image height in pixels", default=512, min=64, max=4096, step=8),
                "batch_size": C.tip("INT", "images sampled at once (same prompt)", default=4, min=1, max=256),
            },
            "optional": {
                "negative_prompt": C.tip("STRING", "negative prompt for every image", default="", multiline=True),
            },
        }

    def run(self, model, clip, vae, prompts, neutral_per_prompt, seed, steps, cfg, sampler_name, scheduler,
            width, height, batch_size, negative_prompt=""):  # fmt: skip
        import comfy.sample
        import torch

        from popalign_core.models.sampling import derive_seed

        jobs = _jobs(prompts, neutral_per_prompt)
        if width % 8 or height % 8:
            raise ValueError(f"width/height: {width}x{height} must be multiples of 8")
        neg = _conditioning(clip, negative_prompt or "")
        bar = C.Progress(len(jobs))
        images, rows = [], []
        by_prompt: dict[str, list[dict]] = {}
        for j in jobs:
            by_prompt.setdefault(j["prompt"], []).append(j)
        order = {(j["prompt"], j["index"]): k for k, j in enumerate(jobs)}
        done: dict[int, object] = {}
        channels = int(getattr(model.model.latent_format, "latent_channels", 4))
        for prompt, pjobs in by_prompt.items():
            pos = _conditioning(clip, prompt)
            for s in range(0, len(pjobs), batch_size):
                chunk = pjobs[s : s + batch_size]
                seeds = [derive_seed(int(seed), j["prompt"], int(j["index"])) for j in chunk]
                noise = torch.cat([
                    torch.randn((1, channels, height // 8, width // 8), generator=torch.Generator().manual_seed(sd))
                    for sd in seeds
                ])  # fmt: skip
                latent = torch.zeros_like(noise)
                samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, pos, neg, latent,
                                              denoise=1.0, disable_pbar=True, seed=seeds[0])  # fmt: skip
                decoded = vae.decode(samples)
                for j, sd, img in zip(chunk, seeds, decoded):
                    done[order[(j["prompt"], j["index"])]] = (img, {**j, "seed": sd})
                bar.update(len(chunk))
        for k in range(len(jobs)):
            img, row = done[k]
            images.append(img)
            rows.append(row)
        settings = {"steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
                    "width": width, "height": height, "seed": seed, "negative_prompt": negative_prompt}  # fmt: skip
        return (torch.stack(images).float().clamp(0, 1), {"rows": rows, "settings": settings})


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
    return [{"prompt": p, "index": i, "neutral": p, "identity": {}, "population": "losing"}
            for p in dict.fromkeys(lines) for i in range(per)]  # fmt: skip


NODE_CLASS_MAPPINGS = {
    "PopAlignAugmentPrompts": PopAlignAugmentPrompts,
    "PopAlignPopulationSampler": PopAlignPopulationSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PopAlignAugmentPrompts": "PopAlign Augment Prompts",
    "PopAlignPopulationSampler": "PopAlign Population Sampler",
}
