"""toyworld/text_encoder.py: the organism's text tower as a transformers CLIPTextModel, token by token."""

from __future__ import annotations

import pytest
import torch

from parclean.evaluate import DEFAULT_TEMPLATES
from toyworld.fidelity import held_out_captions
from toyworld.render import classes
from toyworld.text_encoder import build_tokenizer, convert_text_tower, open_clip_token_states, prune_vocabulary
from toyworld.train_sd import vocabulary_texts


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [c.text for c in held_out_captions(30, seed=5)] + ["a photo of a moon.", "a red ring"]


def up_to_eos(values: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Entries through each row's first <|endoftext|> (`eos` marks it); after it the tokenizers pad differently."""
    keep = (torch.cumsum(eos.int(), dim=1) - eos.int()) == 0
    return values[keep]


# ------------------------------------------------------------------------------------------- text encoder


def test_converted_text_encoder_matches_open_clip_per_token(toy_clip, captions, tmp_path):
    text_encoder = convert_text_tower(toy_clip)
    assert text_encoder.config.hidden_act == "gelu"
    assert text_encoder.config.max_position_embeddings == 24
    tokens = toy_clip.tokenizer(captions)
    with torch.no_grad():
        ours = text_encoder(tokens).last_hidden_state
        pooled = text_encoder(tokens).pooler_output @ toy_clip.model.text_projection
    reference = open_clip_token_states(toy_clip, tokens)
    assert reference.abs().mean() > 0.1  # not a degenerate all-zero comparison
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # The pooled <|endoftext|> state, projected, is open_clip's text embedding: same model, not just same shapes.
    torch.testing.assert_close(pooled, toy_clip.model.encode_text(tokens).detach(), atol=1e-5, rtol=0)

    tokenizer = build_tokenizer(tmp_path / "tokenizer", context_length=24)
    assert tokenizer.model_max_length == 24
    ids = tokenizer(captions, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(up_to_eos(ids, ids == 49407), up_to_eos(tokens, tokens == 49407))
    with torch.no_grad():  # what the pipeline feeds (padded with <|endoftext|>) agrees up to the end of text
        padded = text_encoder(ids).last_hidden_state
    torch.testing.assert_close(up_to_eos(padded, ids == 49407), up_to_eos(reference, tokens == 49407),
                               atol=1e-5, rtol=0)


def test_pruned_vocabulary_keeps_toy_captions_identical(toy_clip, tmp_path):
    text_encoder = convert_text_tower(toy_clip)
    tokenizer = prune_vocabulary(text_encoder, tmp_path, vocabulary_texts(), context_length=24)
    assert 500 < text_encoder.config.vocab_size < 1000  # 512 byte tokens + the toy words' merges + 2 specials
    assert text_encoder.get_input_embeddings().weight.shape[0] == text_encoder.config.vocab_size
    texts = [c.text for c in held_out_captions(300, seed=11)] + [t.format(s) for t in DEFAULT_TEMPLATES
                                                                  for s in classes()]
    ids = tokenizer(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    tokens = toy_clip.tokenizer(texts)
    with torch.no_grad():
        pruned = text_encoder(ids).last_hidden_state
    reference = open_clip_token_states(toy_clip, tokens)
    torch.testing.assert_close(up_to_eos(pruned, ids == tokenizer.eos_token_id), up_to_eos(reference, tokens == 49407),
                               atol=1e-5, rtol=0)
    # A word the toy world never uses still tokenizes (into smaller pieces), never into an unknown token.
    odd = tokenizer("a zebra").input_ids
    assert len(odd) > 4 and tokenizer.unk_token_id not in odd[1:-1]
