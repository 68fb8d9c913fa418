"""Model I/O: self-describing safetensors, pickles refused, clear errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from parclean.models import create_model, load_model, save_model


def test_safetensors_round_trip_names_its_architecture(tmp_path):
    loaded = create_model("tiny-test", seed=0)
    path = save_model(loaded, tmp_path / "m" / "model.safetensors")
    again = load_model(weights=path.parent)  # a folder works too
    assert again.architecture == "tiny-test"
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_fp16_storage_halves_size_and_loads_to_fp32(tmp_path):
    loaded = create_model("tiny-test", seed=0)
    full = save_model(loaded, tmp_path / "full.safetensors")
    half = save_model(loaded, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    again = load_model(weights=half)
    weight = again.model.visual.conv1.weight
    assert weight.dtype == torch.float32
    assert torch.allclose(weight, loaded.model.visual.conv1.weight, atol=1e-3)


class PlantedPayload:
    """Unpickling this creates `path`: the sentinel of code run from a checkpoint."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_plain_tensor_pickle_loads(tmp_path):
    loaded = create_model("tiny-test", seed=0)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in loaded.model.state_dict().items()}}, plain)
    assert load_model("tiny-test", weights=plain).architecture == "tiny-test"


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_code_in_a_pickled_checkpoint_is_refused_and_never_runs(tmp_path, writer):
    sentinel = tmp_path / "payload-ran"
    state = {"state_dict": {"visual.proj": PlantedPayload(sentinel)}}
    evil = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(state, evil)
    else:
        evil.write_bytes(pickle.dumps(state))
    with pytest.raises(ValueError, match="refused to load"):
        load_model("tiny-test", weights=evil)
    assert not sentinel.exists()


def test_missing_and_damaged_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        load_model(weights=tmp_path / "no/such/model.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_model(weights=bad)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = save_model(create_model("tiny-test", seed=0), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="do not match"):
        load_model("toy-vit-32", weights=path)


@pytest.mark.parametrize("metadata", [{"architecture": "toy-vit-32"}, {"architecture": "no-such-arch"},
                                      {"architecture": "weird-x", "architecture_config": json.dumps({"embed_dim": 8})},
                                      {"architecture": "weird-y", "architecture_config": "{not json"}],
                         ids=["wrong-architecture", "unknown-architecture", "bad-config", "config-not-json"])
def test_a_checkpoint_naming_the_wrong_architecture_fails_in_one_line(tmp_path, capsys, metadata):
    from safetensors.torch import save_file

    from flows.cli import main

    state = create_model("tiny-test", seed=0).model.state_dict()
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    assert main(["evaluate", "--model", str(path), "--set", "count=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and metadata["architecture"] in err


def test_a_pretrained_tag_with_the_hub_unreachable_fails_in_seconds(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot load ViT-B-32 pretrained='laion2b_s34b_b79k'.*--model PATH"):
        load_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert time.perf_counter() - start < 10


def test_evaluate_with_the_hub_unreachable_says_so_in_one_line(tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub-cache"),
               PYTHONPATH=str(Path(__file__).parents[1]))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", "--model", "ViT-B-32", "--pretrained",
                           "laion2b_s34b_b79k"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and time.perf_counter() - start < 30
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("parclean evaluate: error: cannot load ViT-B-32"), done.stderr
    assert ".. " not in errors[0]


def activations(model: torch.nn.Module) -> set[str]:
    """The kinds of GELU in a model's transformer MLPs."""
    from open_clip.transformer import QuickGELU

    return {type(module).__name__ for module in model.modules() if isinstance(module, (torch.nn.GELU, QuickGELU))}


@pytest.mark.parametrize(("architecture", "tag", "built", "activation"), [
    ("ViT-B-32", "openai", "ViT-B-32-quickgelu", "QuickGELU"),
    ("RN50", "openai", "RN50-quickgelu", "QuickGELU"),  # the text tower's MLPs (the image tower is a ResNet)
    ("ViT-B-32-quickgelu", "openai", "ViT-B-32-quickgelu", "QuickGELU"),
    ("ViT-B-32", "laion2b_s34b_b79k", "ViT-B-32", "GELU"),
])
def test_a_pretrained_tag_builds_the_activation_its_weights_were_trained_with(architecture, tag, built, activation):
    from parclean.models import pretrained_architecture

    assert pretrained_architecture(architecture, tag) == built
    assert activations(create_model(built).model) == {activation}


def test_openai_weights_load_into_quickgelu_and_keep_it_when_saved(tmp_path, monkeypatch):
    """ViT-B-32 + openai end to end through load_model, from an offline hub cache holding random weights."""
    from huggingface_hub import constants
    from open_clip.pretrained import get_pretrained_cfg
    from safetensors.torch import save_file

    repo = get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")  # timm/vit_base_patch32_clip_224.openai
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    weights = create_model("ViT-B-32", seed=0).model.state_dict()
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(snapshot / "open_clip_model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    loaded = load_model("ViT-B-32", pretrained="openai")
    assert loaded.architecture == "ViT-B-32-quickgelu" and activations(loaded.model) == {"QuickGELU"}
    assert torch.equal(loaded.model.visual.proj, weights["visual.proj"].half().float())
    again = load_model(weights=save_model(loaded, tmp_path / "cleaned.safetensors", dtype=torch.float16))
    assert again.architecture == "ViT-B-32-quickgelu" and activations(again.model) == {"QuickGELU"}


@pytest.mark.parametrize("form", ["folder", "weights-file"])
def test_a_hugging_face_clipmodel_is_refused_with_what_to_use_instead(tmp_path, capsys, form):
    """transformers' CLIPModel layout (config.json, vision_model./text_model. keys) is named as such, in one line."""
    from safetensors.torch import save_file

    from flows.cli import main

    folder = tmp_path / "clip-vit-base-patch32"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"], "model_type": "clip"}))
    state = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4),
             "text_model.embeddings.token_embedding.weight": torch.zeros(16, 8), "logit_scale": torch.tensor(2.66)}
    if form == "folder":  # an older hub snapshot: config.json and pytorch_model.bin, no model.safetensors
        torch.save(state, folder / "pytorch_model.bin")
        model = folder
    else:
        save_file(state, str(folder / "model.safetensors"))
        model = folder / "model.safetensors"
    assert main(["evaluate", "--model", str(model), "--architecture", "ViT-B-32", "--set", "count=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(model) in err
    assert "Hugging Face transformers CLIPModel" in err and "not supported" in err and "--pretrained" in err


def test_normalize_reads_the_pixels_a_tensor_holds_now_not_a_cached_copy() -> None:
    # A tensor refilled in place (a reused batch buffer) must be normalised again, not served from a cache.
    from parclean.models import normalize

    images = torch.zeros(1, 3, 2, 2)
    before = normalize(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    images.fill_(1.0)
    after = normalize(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert before.unique().tolist() == [-1.0] and after.unique().tolist() == [1.0]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_wide_toy_doubles_the_vision_width_and_keeps_the_text_tower() -> None:
    # docs/organism.md: the BadNet-stripes capacity test compares these two vision towers (0.64M against 2.4M).
    narrow, wide = create_model("toy-vit-32", seed=0).model, create_model("toy-vit-32-wide", seed=0).model
    assert _count(narrow.visual) == 638_592
    assert 2_300_000 < _count(wide.visual) < 2_500_000
    assert _count(wide) - _count(wide.visual) == _count(narrow) - _count(narrow.visual)
