"""The Population Sampler's FLUX guidance (nodes/population_nodes.py) inside ComfyUI 0.3.75 (skipped on 2024.03, which
has no FLUX): a tiny ComfyUI Flux (guidance input) and FluxSchnell (none) built from `comfy.supported_models` with
the tiny FLUX transformer's weights (the builder and weights of tests/nodes/test_comfy_flow_adapter.py). The text
encoder is a stand-in with FLUX's conditioning shapes: ComfyUI's FLUX CLIP always builds the 4.7 B-parameter T5-XXL,
which cannot run in CI. Checked: the guidance reaches ComfyUI's sampler (other values give other latents, 3.5 gives
what ComfyUI samples without a FluxGuidance node), only a model with a guidance input gets it, and the sampler's
settings record it.
"""

from __future__ import annotations

from pathlib import Path

import comfy_support as cs  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ADAPTER_TESTS = Path(__file__).with_name("test_comfy_flow_adapter.py")  # its tiny Flux weights and model builder
pytestmark = pytest.mark.timeout(600)
SETTINGS = {"steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "width": 64, "height": 64,
            "seed": 11, "negative_prompt": ""}  # fmt: skip


class StandInTextEncoder:
    """CLIP's two calls the sampler makes, with FLUX's conditioning shapes (tiny widths): a fixed random embedding
    per prompt (T5 states [1, 8, 64], pooled [1, 32])."""

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens(self, tokens: str, return_pooled: bool = False):
        g = torch.Generator().manual_seed(sum(map(ord, tokens)) + 1)
        return torch.randn(1, 8, 64, generator=g), torch.randn(1, 32, generator=g)


class StandInVAE:
    """VAE.decode's contract (LATENT [B, 16, h, w] -> IMAGE [B, h, w, 3] in 0..1) without a 16-channel VAE."""

    def decode(self, samples):
        return torch.sigmoid(samples[:, :3]).movedim(1, -1)


def guidance_job(job: dict, log) -> dict:
    pop = cs.node_module("population_nodes", job["repo"])
    tiny_flux_model = cs.load_target(f"{ADAPTER_TESTS}:_tiny_flux_model")
    clip, chunk, out = StandInTextEncoder(), [{"prompt": "a photo of a doctor", "index": 0}], {}
    for name in ("Flux", "FluxSchnell"):
        model = tiny_flux_model(job["weights"], name)
        r = {"guidance_of": pop.guidance_of(model, 5.0)}
        for g in (None, 1.0, 3.5, 6.0):
            pos = pop._conditioning(clip, chunk[0]["prompt"], g)
            neg = pop._conditioning(clip, "", g)
            r[f"cond_keys_{g}"] = sorted(pos[0][1])
            r[f"latents_{g}"] = pop.sample_latents(model, chunk, pos, neg, SETTINGS)[1].float().tolist()
        node = pop.PopAlignPopulationSampler()
        s = {k: v for k, v in SETTINGS.items() if k != "negative_prompt"}
        images, population = node.run(model, clip, StandInVAE(), "a photo of a doctor", 1, 1, guidance=5.0, **s)
        r["settings"], r["images"] = population["settings"], images.tolist()
        out[name] = r
    return out


@pytest.fixture(scope="module")
def run(comfy_dir, comfy_version, tmp_path_factory):
    if comfy_version not in ("0.3.75", "custom"):
        pytest.skip(f"ComfyUI {comfy_version} has no FLUX model types")
    from safetensors.torch import save_file

    from popalign_core.models.flow_single_file import transformer_to_original

    from .test_comfy_flow_adapter import tiny_flux

    root = tmp_path_factory.mktemp("flux_guidance")
    weights = {}
    for kind, guidance in (("Flux", True), ("FluxSchnell", False)):
        weights.update(
            {f"{kind}.{k}": v.contiguous() for k, v in transformer_to_original(tiny_flux(guidance), "flux").items()}
        )
    save_file(weights, str(root / "weights.safetensors"))
    job = {"repo": str(REPO), "weights": str(root / "weights.safetensors")}
    out = cs.run_in_comfy(f"{__file__}:guidance_job", job, comfy_dir=comfy_dir, output_dir=root / "out")
    for r in (out["Flux"], out["FluxSchnell"]):  # the child answers in JSON
        r.update({k: torch.tensor(v) for k, v in r.items() if k.startswith(("latents_", "images"))})
    return out


def test_flux_dev_guidance_reaches_the_sampler(run):
    r = run["Flux"]
    assert r["guidance_of"] == 5.0
    assert r["cond_keys_6.0"] == ["guidance", "pooled_output"] and r["cond_keys_None"] == ["pooled_output"]
    assert torch.equal(r["latents_3.5"], r["latents_None"])  # 3.5 = ComfyUI's default without FluxGuidance
    assert (r["latents_1.0"] - r["latents_6.0"]).abs().max() > 1e-3
    assert (r["latents_1.0"] - r["latents_3.5"]).abs().max() > 1e-3


def test_a_model_without_guidance_input_gets_none(run):
    r = run["FluxSchnell"]
    assert r["guidance_of"] is None
    assert torch.equal(r["latents_1.0"], r["latents_6.0"])  # no guidance embedding: the value cannot matter


def test_the_node_records_guidance_only_where_used(run):
    assert run["Flux"]["settings"]["guidance"] == 5.0
    assert "guidance" not in run["FluxSchnell"]["settings"]
    assert run["Flux"]["images"].shape == (1, 8, 8, 3)
    assert not torch.equal(run["Flux"]["images"], torch.sigmoid(run["Flux"]["latents_3.5"][:, :3]).movedim(1, -1))
