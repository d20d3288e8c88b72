"""Soft prompt prefix: n learned token vectors prepended to every prompt, saved as a textual-inversion embedding.

Distributional alignment finetunes either LoRA or "merely five soft tokens as prompt prefix" (patent [0129]). A
`SoftPrefix` adds placeholder tokens to the model's tokenizers with diffusers' multi-vector naming (``<popalign>``,
``<popalign>_1``, ..., ``<popalign>_{n-1}``) and owns one trainable [n, D_k] parameter per text encoder::

    prefix = SoftPrefix.attach(adapter, n_tokens=5, token="<popalign>", init_text="person")
    opt = torch.optim.AdamW(prefix.parameters(), lr=5e-3)        # exactly the prefix vectors
    cond = adapter.encode_prompt(prefix.apply(["a photo of a doctor"]))
    prefix.save("out/popalign.safetensors")                      # diffusers / ComfyUI textual inversion
    prefix.detach()                                              # the adapter encodes as before

How: each text encoder's token-embedding table is grown in place to the tokenizer's size (the base rows are copied,
the new rows hold the initial vectors, and the table is never written again), and a forward hook on it substitutes
the parameter rows wherever the input ids are the placeholder ids (``torch.where``: the gradient reaches the
parameters even when every weight of the encoder is frozen, and never reaches the table's rows of the placeholders).

Pooled output: CLIP configs with the legacy ``eos_token_id == 2`` (the original SD1.5 / SD2 / SDXL configs, and the
shipped ones) make transformers pool at the *highest* token id, which is a placeholder once tokens are added. While
attached, such an encoder pools at the tokenizer's end-of-text token instead (identical for prompts without added
tokens; what ComfyUI does, which moves its end-of-text id above the embedding ids). Only SDXL's pooled embedding
depends on it.

File layout (safetensors, float32, read by diffusers' ``load_textual_inversion`` and ComfyUI's
``comfy.sd1_clip.load_embed``): SD1.5 / SD2.x ``{"emb_params": [n, D]}``; SDXL ``{"clip_l": [n, 768],
"clip_g": [n, 1280]}``. Metadata: format ("pt"), popalign_version, popalign_type ("soft_prefix"), family, token,
n_tokens, plus the caller's str entries. docs/prefix.md explains how to use the file in ComfyUI and diffusers.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from popalign_core import __version__
from popalign_core.common.fileio import (
    check_safetensors_metadata,
    read_safetensors,
    safetensors_keys,
    save_safetensors,
)
from popalign_core.models.families import FLOW_FAMILIES, UNET_FAMILIES, check_family

__all__ = ["SOFT_PREFIX_TYPE", "SoftPrefix", "expand_token", "prefix_file_keys"]

SOFT_PREFIX_TYPE = "soft_prefix"  # safetensors metadata "popalign_type"
SD_KEY = "emb_params"  # SD1.5 / SD2.x single-encoder files
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL: text encoder 1 (CLIP-L), text encoder 2 (OpenCLIP-bigG)
_RESERVED_METADATA = ("format", "popalign_version", "popalign_type", "family", "token", "n_tokens")

# tokens a SoftPrefix added to a tokenizer: tokenizer -> {token: [ids]}; such tokens may be attached again (e.g. a
# resumed run on the same adapter after `detach`) as long as no other SoftPrefix holds them
_ADDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_IN_USE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def expand_token(token: str, n_tokens: int) -> list[str]:
    """diffusers' multi-vector names: [token, token_1, ..., token_{n-1}]."""
    return [token] + [f"{token}_{i}" for i in range(1, n_tokens)]


def prefix_file_keys(family: str) -> tuple[str, ...]:
    """The tensor keys of a prefix file for `family`, in text-encoder order."""
    return SDXL_KEYS if family == "sdxl" else (SD_KEY,)


def _check_adapter(adapter) -> None:
    encs, toks = getattr(adapter, "text_encoders", None), getattr(adapter, "tokenizers", None)
    if not encs or not toks or len(encs) != len(toks):
        raise ValueError(
            "adapter: expected a DiffusersAdapter-like object with matching, non-empty `text_encoders` and "
            "`tokenizers` lists"
        )
    family = getattr(adapter, "family", None)
    if family in FLOW_FAMILIES:
        check_family(family, UNET_FAMILIES, "a soft prefix (its file layout holds CLIP vectors of SD1.5/SD2/SDXL)")
    if len(encs) != len(prefix_file_keys(family)):
        raise ValueError(
            f"adapter: family {family!r} with {len(encs)} text encoder(s); a soft prefix needs 1 (sd15, sd2) or "
            "2 (sdxl)"
        )


def _check_n_tokens(n_tokens, tokenizers) -> int:
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int):
        raise ValueError(f"n_tokens={n_tokens!r}: expected an int >= 1")
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens}: must be >= 1")
    room = min(int(t.model_max_length) for t in tokenizers) - 3  # start, end and at least one prompt token
    if n_tokens > room:
        raise ValueError(f"n_tokens={n_tokens}: must be <= {room} (the tokenizer's 77-token window)")
    return n_tokens


def _check_token(token, names: list[str], tokenizers) -> None:
    if not isinstance(token, str) or not token or token != token.strip() or any(c.isspace() for c in token):
        raise ValueError(f"token={token!r}: expected a non-empty placeholder without whitespace, e.g. '<popalign>'")
    if token.startswith("embedding:"):
        raise ValueError(f"token={token!r}: 'embedding:' is ComfyUI's prompt syntax, not part of a token")
    for tok in tokenizers:
        vocab = tok.get_vocab()
        ours = _ADDED.get(tok, {})
        in_use = _IN_USE.get(tok, set())
        for name in names:
            if name in ours and name not in in_use:
                continue  # added by an earlier SoftPrefix (now detached): reuse its ids
            if name in in_use:
                raise ValueError(f"token={token!r}: {name!r} is held by another attached SoftPrefix; detach it first")
            for form in (name, name.lower(), name.lower() + "</w>"):
                if form in vocab:
                    raise ValueError(
                        f"token={token!r}: {name!r} is already in the tokenizer's vocabulary (as {form!r}); pick a "
                        "new placeholder such as '<popalign>' (a known word would be replaced in every prompt)"
                    )


def _token_embedding(encoder) -> nn.Embedding:
    emb = encoder.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"adapter: text encoder {type(encoder).__name__} has no nn.Embedding token table")
    return emb


def _grow_embedding(encoder, size: int, init_rows: dict[int, torch.Tensor]) -> None:
    """Grow the token table in place (same module, so hooks on it stay valid) to `size` rows; rows in `init_rows`
    (id -> vector) are written into the *new* part only."""
    emb = _token_embedding(encoder)
    old = emb.weight
    if size > old.shape[0]:
        with torch.no_grad():
            new = torch.zeros(size, old.shape[1], dtype=old.dtype, device=old.device)
            new[: old.shape[0]] = old
        emb.weight = nn.Parameter(new, requires_grad=old.requires_grad)
        emb.num_embeddings = size
        if hasattr(encoder, "config"):
            encoder.config.vocab_size = size
    base = old.shape[0]
    with torch.no_grad():
        for i, vec in init_rows.items():
            if i >= base:
                emb.weight[i] = vec.to(emb.weight.dtype)


def _init_vectors(tokenizer, encoder, init_text, n_tokens: int) -> torch.Tensor:
    ids = tokenizer(init_text, add_special_tokens=False).input_ids
    table = _token_embedding(encoder).weight
    base = ids and max(ids) < table.shape[0]
    if not ids or not base:
        raise ValueError(f"init_text={init_text!r}: must tokenise to at least one known token")
    rows = table.detach()[torch.tensor([ids[i % len(ids)] for i in range(n_tokens)], device=table.device)]
    return rows.float().clone()


class SoftPrefix(nn.Module):
    """n trainable token vectors per text encoder, prepended to prompts through placeholder tokens.

    Build it with `SoftPrefix.attach(adapter, ...)` (or `SoftPrefix.load(path, adapter)`); `parameters()` yields
    exactly the prefix vectors (`vectors[k]`: [n, D_k], float32, text encoder k). See the module docstring.
    """

    def __init__(
        self,
        adapter,
        n_tokens: int = 5,
        token: str = "<popalign>",
        init_text: str = "person",
        *,
        _vectors: Sequence[torch.Tensor] | None = None,
    ):
        super().__init__()
        _check_adapter(adapter)
        toks, encs = list(adapter.tokenizers), list(adapter.text_encoders)
        n_tokens = _check_n_tokens(n_tokens, toks)
        names = expand_token(token, n_tokens)
        _check_token(token, names, toks)
        if _vectors is None and (not isinstance(init_text, str) or not init_text.strip()):
            raise ValueError(f"init_text={init_text!r}: expected a non-empty string, e.g. 'person'")
        if _vectors is None:
            init = [_init_vectors(t, e, init_text, n_tokens) for t, e in zip(toks, encs)]
        else:
            init = [v.detach().float().clone().to(_token_embedding(e).weight.device) for v, e in zip(_vectors, encs)]
        self.family = adapter.family
        self.token, self.n_tokens, self.names = token, n_tokens, names
        self.vectors = nn.ParameterList([nn.Parameter(v) for v in init])
        # plain attributes (not submodules): parameters() / state_dict() stay the prefix alone
        self.__dict__["_adapter"] = adapter
        self._ids: list[list[int]] = []
        self._hooks: list = []
        self._eos_restore: list[tuple[nn.Module, object]] = []
        try:
            for k, (tok, enc) in enumerate(zip(toks, encs)):
                self._attach_one(k, tok, enc)
        except BaseException:
            self.detach()
            raise

    # ------------------------------------------------------------------ construction
    @classmethod
    def attach(cls, adapter, n_tokens: int = 5, token: str = "<popalign>", init_text: str = "person") -> SoftPrefix:
        """Add the placeholder tokens to every tokenizer of `adapter`, grow its token tables and hook them; the new
        vectors start from the token embeddings of `init_text` (cycled to n_tokens)."""
        return cls(adapter, n_tokens, token, init_text)

    def _attach_one(self, k: int, tok, enc) -> None:
        ours = _ADDED.setdefault(tok, {})
        new = [name for name in self.names if name not in ours]
        if new:
            tok.add_tokens(new)
        ids = [tok.convert_tokens_to_ids(name) for name in self.names]
        for name, i in zip(self.names, ids):
            got = tok(name, add_special_tokens=False).input_ids
            if got != [i]:
                raise ValueError(f"token={self.token!r}: the tokenizer splits {name!r} into {got}; pick another name")
            ours[name] = i
        _IN_USE.setdefault(tok, set()).update(self.names)
        self._ids.append(ids)
        vec, emb = self.vectors[k], _token_embedding(enc)
        if vec.shape[1] != emb.embedding_dim:
            raise ValueError(
                f"vectors[{k}]: width {vec.shape[1]} does not match text encoder {k}'s embedding width "
                f"{emb.embedding_dim}"
            )
        _grow_embedding(enc, max(len(tok), max(ids) + 1), {i: vec[j].detach() for j, i in enumerate(ids)})
        id_tensor = torch.tensor(ids)

        def hook(module, args, output, _k=k, _ids=id_tensor):
            input_ids = args[0] if args else None
            if input_ids is None:
                return output
            ids_dev = _ids.to(input_ids.device)
            match = input_ids.unsqueeze(-1) == ids_dev  # [..., n]
            hit = match.any(-1)
            if not bool(hit.any()):
                return output
            pos = match.to(torch.long).argmax(-1)
            rows = self.vectors[_k].to(device=output.device, dtype=output.dtype)[pos]
            return torch.where(hit.unsqueeze(-1), rows, output)

        self._hooks.append(emb.register_forward_hook(hook))
        eos = getattr(tok, "eos_token_id", None)
        if eos not in (None, 2):
            # the CLIP text transformer that pools (transformers 5: CLIPTextModel itself, or the `text_model` of
            # CLIPTextModelWithProjection; 4.x: CLIPTextTransformer): an `eos_token_id` instance attribute
            for m in enc.modules():
                if m.__dict__.get("eos_token_id") == 2:
                    self._eos_restore.append((m, 2))
                    m.eos_token_id = int(eos)

    # ------------------------------------------------------------------ use
    @property
    def prefix_text(self) -> str:
        """The expanded placeholder text, e.g. '<popalign> <popalign>_1 <popalign>_2 <popalign>_3 <popalign>_4'."""
        return " ".join(self.names)

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def apply(self, prompts: Sequence[str]) -> list[str]:
        """`prompts` with the expanded prefix prepended (an empty prompt becomes the prefix alone)."""
        if isinstance(prompts, str):
            raise TypeError("prompts: expected a list of strings, got a single str")
        out = []
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts: expected strings, got {type(p).__name__}")
            out.append(f"{self.prefix_text} {p}" if p else self.prefix_text)
        return out

    def forward(self, prompts: Sequence[str]) -> list[str]:
        return self.apply(prompts)

    def detach(self) -> None:
        """Remove the hooks and restore pooling; the added tokens and grown tables stay (ids for prompts without
        them are unchanged, so those encode exactly as before `attach`). Idempotent."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for text_model, eos in self._eos_restore:
            text_model.eos_token_id = eos
        self._eos_restore = []
        adapter = self.__dict__.get("_adapter")
        if adapter is not None:
            for tok in adapter.tokenizers:
                if tok in _IN_USE:
                    _IN_USE[tok].difference_update(self.names)

    remove = detach

    def extra_repr(self) -> str:
        dims = ", ".join(str(v.shape[1]) for v in self.vectors)
        return f"token={self.token!r}, n_tokens={self.n_tokens}, family={self.family!r}, dims=[{dims}]"

    # ------------------------------------------------------------------ files
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors: {"emb_params": [n, D]} or {"clip_l": ..., "clip_g": ...} (float32, CPU)."""
        keys = prefix_file_keys(self.family)
        return {key: v.detach().float().cpu().contiguous() for key, v in zip(keys, self.vectors)}

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> str:
        """Write the textual-inversion file atomically (safetensors); returns its path. metadata: extra str -> str
        entries (format, popalign_version, popalign_type, family, token, n_tokens are always written)."""

        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            raise ValueError(f"path={path!r}: the embedding file's name must end in .safetensors")
        if os.path.isdir(path):
            raise ValueError(f"path={path!r} is a folder; expected a file path")
        check_safetensors_metadata(metadata, reserved=_RESERVED_METADATA)
        meta = dict(metadata or {})
        meta.update(
            format="pt",
            popalign_version=__version__,
            popalign_type=SOFT_PREFIX_TYPE,
            family=self.family,
            token=self.token,
            n_tokens=str(self.n_tokens),
        )
        save_safetensors(self.state_tensors(), path, meta)
        return path

    @staticmethod
    def read_file(path: str | os.PathLike, family: str) -> tuple[list[torch.Tensor], dict[str, str]]:
        """The vectors (text-encoder order) and metadata of a prefix file for `family`, validated."""

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path={path!r}: no such file")
        want = prefix_file_keys(family)
        hint = "re-export it (re-running `popalign dal` writes it again from its last checkpoint)"
        keys, meta = safetensors_keys(path, "soft-prefix embedding", hint)
        tensors, _ = read_safetensors(path, "soft-prefix embedding", hint, keys=lambda k: k in want)
        if sorted(keys) != sorted(want):
            raise ValueError(
                f"path={path!r}: keys {sorted(keys)} do not match a {family} prefix file; expected exactly "
                f"{list(want)}"
            )
        vectors = [tensors[k] for k in want]
        for k, v in zip(want, vectors):
            if v.ndim != 2 or v.shape[0] < 1 or not v.is_floating_point():
                raise ValueError(f"path={path!r}: {k!r} has shape {list(v.shape)}; expected a float [n_tokens, dim]")
        ns = {k: int(v.shape[0]) for k, v in zip(want, vectors)}
        if len(set(ns.values())) != 1:
            raise ValueError(f"path={path!r}: the encoders' token counts differ: {ns}")
        if "n_tokens" in meta and meta["n_tokens"] != str(vectors[0].shape[0]):
            raise ValueError(
                f"path={path!r}: metadata n_tokens={meta['n_tokens']} but the tensors hold {vectors[0].shape[0]} rows"
            )
        return vectors, meta

    @classmethod
    def load(cls, path: str | os.PathLike, adapter, token: str | None = None) -> SoftPrefix:
        """Attach the prefix saved in `path` to `adapter` (resume, evaluation). token: the placeholder (default: the
        file's metadata "token", else "<popalign>")."""
        _check_adapter(adapter)
        vectors, meta = cls.read_file(path, adapter.family)
        for k, (v, enc) in enumerate(zip(vectors, adapter.text_encoders)):
            dim = _token_embedding(enc).embedding_dim
            if v.shape[1] != dim:
                key = prefix_file_keys(adapter.family)[k]
                raise ValueError(
                    f"path={os.fspath(path)!r}: {key!r} has width {v.shape[1]}, text encoder {k} expects {dim}"
                )
        if token is None:
            token = meta.get("token") or "<popalign>"
        return cls(adapter, int(vectors[0].shape[0]), token, _vectors=vectors)
