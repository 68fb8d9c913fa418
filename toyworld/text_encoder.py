"""The toy CLIP's text tower as a transformers `CLIPTextModel` (+ tokenizer): the toy Stable Diffusion's frozen
text encoder, exactly as SD 1.5 conditions on OpenAI CLIP's.

The weights map one to one (open_clip fuses q/k/v into `in_proj`; transformers keeps three linears), so the
converted model's `last_hidden_state` equals open_clip's `ln_final(transformer(...))` per token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from parclean.clip_bpe import BOS, EOS, write_clip_bpe
from parclean.models import LoadedModel, architecture_config

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

BOS_ID, EOS_ID = 49406, 49407


def text_config(loaded: LoadedModel):
    """The `CLIPTextConfig` of `loaded`'s text tower (width, depth, heads, context, activation)."""
    from transformers import CLIPTextConfig

    model = loaded.model
    blocks = model.transformer.resblocks
    width = model.token_embedding.embedding_dim
    return CLIPTextConfig(
        vocab_size=model.token_embedding.num_embeddings,
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        projection_dim=model.text_projection.shape[1],
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=model.positional_embedding.shape[0],
        hidden_act=_activation(loaded),
        layer_norm_eps=model.ln_final.eps,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,  # CLIPTokenizer pads with <|endoftext|>, as SD 1.5's does
    )


def _activation(loaded: LoadedModel) -> str:
    """transformers' name for the MLP activation: exact gelu unless the architecture says quick_gelu."""
    from open_clip.transformer import QuickGELU

    quick = bool(architecture_config(loaded.architecture).get("quick_gelu", False))
    act = loaded.model.transformer.resblocks[0].mlp.gelu
    if quick != isinstance(act, QuickGELU) or (not quick and getattr(act, "approximate", "none") != "none"):
        raise ValueError(f"{loaded.architecture}: text MLP activation {act!r} does not match quick_gelu={quick}")
    return "quick_gelu" if quick else "gelu"


def _check_convertible(loaded: LoadedModel) -> None:
    model = loaded.model
    if not hasattr(model, "token_embedding") or not hasattr(model.transformer, "resblocks"):
        raise ValueError(f"{loaded.architecture}: only open_clip CLIP models with the built-in text tower convert")
    block = model.transformer.resblocks[0]
    if not isinstance(block.attn, nn.MultiheadAttention) or not isinstance(block.ls_1, nn.Identity):
        raise ValueError(f"{loaded.architecture}: text blocks with layer scale or custom attention do not convert")
    if model.attn_mask is None:
        raise ValueError(f"{loaded.architecture}: the text tower has no causal mask; CLIPTextModel always has one")


def convert_text_tower(loaded: LoadedModel) -> CLIPTextModel:
    """A `CLIPTextModel` (fp32, eval mode) holding `loaded`'s text tower weights."""
    from transformers import CLIPTextModel

    _check_convertible(loaded)
    source = {k: v.detach().float() for k, v in loaded.model.state_dict().items()}
    config = text_config(loaded)
    state = {
        "embeddings.token_embedding.weight": source["token_embedding.weight"],
        "embeddings.position_embedding.weight": source["positional_embedding"],
        "final_layer_norm.weight": source["ln_final.weight"],
        "final_layer_norm.bias": source["ln_final.bias"],
    }
    for i in range(config.num_hidden_layers):
        old, new = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q_w, k_w, v_w = source[old + "attn.in_proj_weight"].chunk(3)
        q_b, k_b, v_b = source[old + "attn.in_proj_bias"].chunk(3)
        for name, weight, bias in (("q_proj", q_w, q_b), ("k_proj", k_w, k_b), ("v_proj", v_w, v_b)):
            state[f"{new}self_attn.{name}.weight"], state[f"{new}self_attn.{name}.bias"] = weight, bias
        pairs = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
        for ours, theirs in pairs:
            for kind in ("weight", "bias"):
                state[f"{new}{theirs}.{kind}"] = source[f"{old}{ours}.{kind}"]
    model = CLIPTextModel(config)
    # transformers 4 nests the transformer as `text_model`; 5 keeps it inline. The keys below it are the same.
    missing, unexpected = getattr(model, "text_model", model).load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise AssertionError(f"text tower conversion left out {missing[:3]}, or invented {unexpected[:3]}")
    return model.eval()


@torch.no_grad()
def open_clip_token_states(loaded: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's per-token text states, `ln_final(transformer(embed(tokens)))`: (N, context, width)."""
    model = loaded.model
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def build_tokenizer(folder: str | Path, context_length: int) -> CLIPTokenizer:
    """The CLIP BPE tokenizer (open_clip's bundled files) with `model_max_length` = the CLIP's context."""
    from transformers import CLIPTokenizer

    folder = write_clip_bpe(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=context_length)


def toy_vocabulary(texts: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The CLIP BPE tokens and merges `texts` need, in the original id / rank order, plus all 512 byte tokens.

    BPE on a word only ever applies the lowest-ranked merge among the pairs present; keeping every merge that
    the full BPE applies to `texts` (and their order) therefore reproduces its tokenization of `texts` exactly,
    and any other text still tokenizes (down to bytes, which are all kept).
    """
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    used: set[tuple[str, str]] = set()
    for text in texts:
        for word in bpe.pat.findall(bpe.clean_fn(text)):
            used |= _merges_applied("".join(bpe.byte_encoder[b] for b in word.encode("utf-8")), bpe.bpe_ranks)
    merges = sorted(used, key=bpe.bpe_ranks.__getitem__)
    base = [token for token, index in sorted(bpe.encoder.items(), key=lambda item: item[1]) if index < 512]
    return base + ["".join(pair) for pair in merges] + [BOS, EOS], merges


def _merges_applied(word: str, ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """The merges CLIP's BPE applies to one (byte-encoded) word, the last symbol carrying `</w>`."""
    parts = [*word[:-1], word[-1] + "</w>"]
    applied = set()
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        applied.add(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return applied


def prune_vocabulary(text_encoder: CLIPTextModel, folder: str | Path, texts: list[str],
                     context_length: int) -> CLIPTokenizer:
    """Shrink the token embedding (and the tokenizer written to `folder`) to the tokens `texts` use.

    The full CLIP vocabulary holds 49,408 rows, almost all never trained in the toy CLIP (its captions use about
    50 words). Rows are copied from the full table by their old ids, so on `texts` the outputs are unchanged.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tokens, merges = toy_vocabulary(texts)
    encoder = SimpleTokenizer().encoder
    # open_clip names the special tokens <start_of_text> / <end_of_text>; their ids are CLIP's.
    old_ids = [encoder[token] for token in tokens[:-2]] + [BOS_ID, EOS_ID]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = text_encoder.get_input_embeddings().weight.data[torch.tensor(old_ids)].clone()
    embedding = nn.Embedding(len(tokens), table.shape[1])
    embedding.weight.data.copy_(table)
    text_encoder.set_input_embeddings(embedding)
    bos, eos = len(tokens) - 2, len(tokens) - 1
    text_encoder.config.update({"vocab_size": len(tokens), "bos_token_id": bos, "eos_token_id": eos,
                                "pad_token_id": eos})
    logger.info("text vocabulary pruned from %d to %d tokens", len(encoder), len(tokens))
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=context_length)
