"""Rebuild the shipped CLIP BPE tokenizer files (vocab.json + merges.txt) from open_clip's vocabulary.

open_clip_torch ships OpenAI's CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz, MIT). Rebuilding the Hugging Face
`vocab.json`/`merges.txt` from it gives exactly the 49408-token CLIP tokenizer used by SD1.5, SD2.x and SDXL, so a lone
checkpoint can be loaded with no hub access. Run once:  python tools/build_clip_tokenizer.py
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "popalign_core" / "configs" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main() -> int:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        print("open_clip_torch is not installed (pip install open_clip_torch)", file=sys.stderr)
        return 2
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
