"""The CLIP BPE tokenizer shipped with the project (no hub access needed).

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
