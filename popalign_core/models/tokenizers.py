"""The CLIP BPE tokenizer shipped with the project (no hub access needed), and the T5 tokenizers of the flow families.

SD1.5 (CLIP ViT-L), SD2.x (OpenCLIP ViT-H) and SDXL (both) share one 49408-token BPE vocabulary; they differ
only in the padding token: CLIP-L pads with the end-of-text token, OpenCLIP pads with "!" (id 0).
Files: popalign_core/configs/clip_tokenizer/ (rebuilt by tools/build_clip_tokenizer.py from open_clip's vocabulary).
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "configs" / "clip_tokenizer"
PAD_STYLES = ("clip", "openclip")


def clip_tokenizer(pad: str = "clip", model_max_length: int = 77):
    """Return a `transformers.CLIPTokenizer` built from the shipped files.

    pad: "clip" (pad with <|endoftext|>: SD1.5, SDXL tokenizer 1) or "openclip" (pad with "!": SD2.x, SDXL
    tokenizer 2).
    """
    if pad not in PAD_STYLES:
        raise ValueError(f"pad={pad!r} is not a known padding style; valid values: {', '.join(PAD_STYLES)}")
    from transformers import CLIPTokenizer

    vocab, merges = TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(
                f"shipped tokenizer file {f} is missing; rebuild it with tools/build_clip_tokenizer.py"
            )
    kwargs = {"pad_token": "!"} if pad == "openclip" else {}
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=model_max_length, **kwargs)


# ------------------------------------------------------------------------------------------------------------- T5
#: the words of the tiny T5 vocabulary (tests, benchmarks and the tiny flow models; real models bring their own)
TINY_T5_WORDS = (
    "a an the of in on with and photo portrait picture image face person people man woman male female boy girl old "
    "young doctor nurse teacher engineer ceo chef pilot lawyer scientist farmer firefighter police officer student "
    "artist worker smiling wearing white black asian indian latino middle eastern"
).split()
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def tiny_t5_tokenizer(model_max_length: int = 32):
    """A small T5-style (SentencePiece unigram) tokenizer built in code: <pad>=0, </s>=1, <unk>=2, the words of
    `TINY_T5_WORDS`, then single characters; lower-cases its input and appends </s>, as T5's does. For the tiny
    test models only: its ids mean nothing to a real T5."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -5.0) for w in TINY_T5_WORDS]
    vocab += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789-',."]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def t5_tokenizer(folder):
    """The T5 tokenizer in `folder` (``tokenizer.json`` or ``spiece.model``: a diffusers model's ``tokenizer_2/``
    (FLUX) or ``tokenizer_3/`` (SD3), or ComfyUI's ``comfy/text_encoders/t5_tokenizer/``), loaded offline."""
    from transformers import T5TokenizerFast

    folder = Path(folder).expanduser()
    if not any((folder / f).is_file() for f in T5_TOKENIZER_FILES):
        raise FileNotFoundError(
            f"T5 tokenizer folder {str(folder)!r} has none of {', '.join(T5_TOKENIZER_FILES)}: point it at the "
            "tokenizer_2/ (FLUX) or tokenizer_3/ (SD3) folder of the diffusers model, or at ComfyUI's "
            "comfy/text_encoders/t5_tokenizer/"
        )
    return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
