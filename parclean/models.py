"""open_clip model I/O: build by architecture, load pretrained tags or local safetensors, save safetensors.

A parclean checkpoint is one `.safetensors` file whose metadata names the open_clip architecture and, for
architectures open_clip does not ship (our toy ones), carries the architecture's JSON config too, so the
file is self-describing. Pickled checkpoints are untrusted and only read with `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from parclean.outputs import follow_umask

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "model_configs"
# huggingface_hub retries an unreachable hub for about a minute per file; a TCP connection decides in seconds.
HUB_PROBE_SECONDS = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@dataclass
class LoadedModel:
    """A CLIP model with what is needed to feed it."""

    model: torch.nn.Module
    architecture: str
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Images in [0, 1] as the model reads them: (images - mean) / std per channel (LoadedModel.mean, .std)."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


@lru_cache(maxsize=1)
def register_configs() -> None:
    """Make parclean's own architectures (parclean/model_configs/*.json) known to open_clip."""
    open_clip.add_model_config(CONFIG_DIR)


def architecture_config(architecture: str) -> dict[str, Any]:
    register_configs()
    config = open_clip.get_model_config(architecture)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {architecture!r} (see open_clip.list_models()); pass "
                         "--architecture")
    return config


def create_model(architecture: str, *, seed: int | None = None) -> LoadedModel:
    """A randomly initialised model of `architecture` (seeded when `seed` is given)."""
    register_configs()
    if seed is not None:
        torch.manual_seed(seed)
    # open_clip warns "initialized randomly" for every model built without a pretrained tag, including the ones
    # whose weights we load next; silence that one call.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(architecture, pretrained=None, load_weights=False)
    finally:
        logging.disable(previous)
    return _wrap(model, architecture)


def load_source(model: str | Path, *, architecture: str | None = None, pretrained: str | None = None) -> LoadedModel:
    """The model a user names: a local checkpoint (`architecture` for one that does not name its own), or an
    open_clip architecture name with a `pretrained` tag."""
    if pretrained is None:
        return load_model(architecture, weights=model)
    if architecture is not None:
        raise ValueError(f"architecture={architecture!r} and pretrained={pretrained!r}: with a pretrained tag the "
                         "model is the architecture name; give architecture only for a checkpoint file")
    return load_model(str(model), pretrained=pretrained)


def load_model(architecture: str | None = None, *, weights: str | Path | None = None,
               pretrained: str | None = None) -> LoadedModel:
    """Load from a local checkpoint (`weights`) or an open_clip pretrained tag (hub download)."""
    if weights is not None:
        return _load_local(Path(weights), architecture)
    if architecture is None or pretrained is None:
        raise ValueError("load_model needs weights=PATH, or architecture and pretrained tag")
    register_configs()
    built = pretrained_architecture(architecture, pretrained)
    try:
        with _offline_unless_hub_reachable():
            model = open_clip.create_model(architecture, pretrained=pretrained,
                                           force_quick_gelu=built != architecture)
    except Exception as err:  # noqa: BLE001 - hub failures come in many types; the user needs one line
        reason = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load {architecture} pretrained={pretrained!r}: {reason}. Offline? Pass a local "
                         "checkpoint with --model PATH instead") from None
    return _wrap(model, built)


def pretrained_architecture(architecture: str, pretrained: str) -> str:
    """The architecture a pretrained tag's weights were trained as: `X-quickgelu` for a tag open_clip marks
    QuickGELU (the `openai` weights, among others) when `X` itself builds GELU, else `architecture`.

    open_clip 3.x builds `ViT-B-32` and `RN50` with GELU and only warns when a QuickGELU tag is loaded into them;
    the `-quickgelu` name also makes the saved (cleaned) checkpoint rebuild the right activation.
    """
    from open_clip.pretrained import get_pretrained_cfg

    if not get_pretrained_cfg(architecture, pretrained).get("quick_gelu"):
        return architecture
    if architecture_config(architecture).get("quick_gelu"):
        return architecture
    name = f"{architecture}-quickgelu"
    if open_clip.get_model_config(name) is None:  # open_clip ships one for every QuickGELU tag it lists (3.3)
        open_clip.factory._MODEL_CONFIGS[name] = {**architecture_config(architecture), "quick_gelu": True}
    return name


@contextmanager
def _offline_unless_hub_reachable() -> Iterator[None]:
    """huggingface_hub in offline mode (cached files only, no retries) when the hub does not answer."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _hub_reachable(constants.ENDPOINT):
        yield
        return
    logger.warning("%s does not answer: using only the local hub cache", constants.ENDPOINT)
    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    # open_clip logs its own error before raising it; the caller's one line says it already.
    disabled = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
        logging.disable(disabled)


def _hub_reachable(endpoint: str) -> bool:
    """A TCP connection to the hub within HUB_PROBE_SECONDS (behind a proxy: assumed, the proxy decides)."""
    from urllib.parse import urlsplit

    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        return False
    return True


def checkpoint_file(path: str | Path) -> Path:
    """The weights file a local checkpoint names: the file, or a folder's model.safetensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model checkpoint not found")
    if not path.is_dir():
        return path
    if _is_transformers_clip(path):
        raise ValueError(f"{path}: {TRANSFORMERS_REFUSAL}")
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors in this folder")
    return path / "model.safetensors"


# transformers' CLIPModel names its towers vision_model / text_model; open_clip's are visual / transformer.
TRANSFORMERS_PREFIXES = ("vision_model.", "text_model.")
TRANSFORMERS_REFUSAL = ("a Hugging Face transformers CLIPModel checkpoint, which is not supported: use the open_clip "
                        "form of the same weights (an open_clip architecture with --pretrained TAG, e.g. --model "
                        "ViT-B-32 --pretrained openai, or the hub repo's open_clip_model.safetensors with "
                        "--architecture), or convert it to an open_clip state dict")


def _is_transformers_clip(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "CLIPModel" in (config.get("architectures") or [])


def _load_local(path: Path, architecture: str | None) -> LoadedModel:
    path = checkpoint_file(path)
    if path.suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
    else:
        state, metadata = _read_pickle_safely(path), {}
    if any(key.startswith(TRANSFORMERS_PREFIXES) for key in state):
        raise ValueError(f"{path}: {TRANSFORMERS_REFUSAL}")
    named = metadata.get("architecture")
    if architecture and named and architecture != named:
        raise ValueError(f"{path}: weights do not match architecture {architecture}: the file is a {named}")
    architecture = architecture or named
    if architecture is None:
        raise ValueError(f"{path}: checkpoint does not name its architecture; pass --architecture (in a pipeline "
                         "config: architecture:)")
    if "architecture_config" in metadata:
        _register_embedded(architecture, _embedded_config(path, architecture, metadata["architecture_config"]))
    loaded = _create_for(path, architecture)
    try:
        missing, unexpected = loaded.model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape: the first mismatch is enough to name
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ValueError(f"{path}: weights do not match architecture {architecture} ({detail[:200]})") from None
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match architecture {architecture} "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return loaded


def _embedded_config(path: Path, architecture: str, text: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: the architecture_config of {architecture!r} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the architecture_config of {architecture!r} is not a JSON object")
    return config


def _create_for(path: Path, architecture: str) -> LoadedModel:
    """The model a checkpoint names; an architecture open_clip cannot build is the checkpoint's error."""
    try:
        architecture_config(architecture)  # unknown names: one line, without open_clip's list of every model
    except ValueError as err:
        raise ValueError(f"{path}: names {err}") from None
    try:
        return create_model(architecture)
    except Exception as err:  # noqa: BLE001 - a bad embedded config fails inside open_clip in many types
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ValueError(f"{path}: cannot build architecture {architecture!r} from its metadata "
                         f"({type(err).__name__}: {reason}); pass --architecture") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def _read_pickle_safely(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint, with code execution disabled; open_clip's `state_dict` wrapper unwrapped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: refused to load: it is not a plain tensor checkpoint and unpickling it could "
                         f"run code ({str(err).splitlines()[0]}). Convert it to safetensors you trust") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _register_embedded(architecture: str, config: dict[str, Any]) -> None:
    register_configs()
    known = open_clip.get_model_config(architecture)
    if known is not None and known != config:
        raise ValueError(f"checkpoint's architecture {architecture!r} differs from the installed config of "
                         "that name")
    open_clip.factory._MODEL_CONFIGS[architecture] = config


def save_model(loaded: LoadedModel, path: str | Path, extra_metadata: dict[str, str] | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Save weights as safetensors with the architecture (and its config) in the metadata; atomic.

    `dtype` (e.g. torch.float16) casts floating-point tensors for storage; loading casts them back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"architecture": loaded.architecture,
                "architecture_config": json.dumps(architecture_config(loaded.architecture)),
                **(extra_metadata or {})}
    state = {k: _stored(v, dtype) for k, v in loaded.model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    follow_umask(tmp).replace(path)
    return path


def _wrap(model: torch.nn.Module, architecture: str) -> LoadedModel:
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return LoadedModel(model, architecture, open_clip.get_tokenizer(architecture), image_size, mean, std)


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()
