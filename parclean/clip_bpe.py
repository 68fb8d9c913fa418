"""open_clip's bundled CLIP BPE as the files transformers' CLIPTokenizer reads (no hub access needed).

Shared by the tiny diffusers pipeline (generation/tiny_pipeline.py) and the toy text encoder
(toyworld/text_encoder.py): both need a CLIPTokenizer whose ids equal open_clip's.
"""

from __future__ import annotations

import json
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_clip_bpe(folder: str | Path) -> Path:
    """Write open_clip's bundled CLIP BPE as `vocab.json` + `merges.txt` (the files CLIPTokenizer reads)."""
    from open_clip.tokenizer import SimpleTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = SimpleTokenizer()
    encoder = dict(bpe.encoder)
    # open_clip names the special tokens differently; the ids (49406, 49407) stay the same.
    encoder[BOS] = encoder.pop("<start_of_text>")
    encoder[EOS] = encoder.pop("<end_of_text>")
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False))
    merges = sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])
    lines = ["#version: 0.2"] + [f"{left} {right}" for (left, right), _ in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_clip_tokenizer(folder: str | Path):
    """A transformers CLIPTokenizer over open_clip's BPE; ids equal open_clip's tokenizer (before padding)."""
    from transformers import CLIPTokenizer

    folder = write_clip_bpe(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MODEL_MAX_LENGTH)
