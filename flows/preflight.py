"""Preflight of the data-free pipeline: its models, data, eval set, triggers and outputs checked before anything
runs, from headers and metadata (no model is built, no image generated). `parclean run --dry-run` prints the
summary; `parclean run`, `demo` and `serve` check first.

Relative paths are read from the working directory (parclean/paths.py), and a missing one is named as written
and where it was looked for.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

from cleaning.report import EvalConfig, load_images, named_triggers
from cleaning.train import check_resumable
from flows.config import PipelineConfig, TinySDConfig
from flows.pipeline import shard_set_folder
from generation.config import GenerateConfig
from generation.pipeline import HUB_ID
from parclean.eval_sets import default_eval_set, describe_registered, eval_set_names
from parclean.outputs import claim_folder, kinds_in
from parclean.paths import looked_for
from parclean.shards import MANIFEST_NAME

MODEL_FILE = "model.safetensors"  # what a checkpoint folder holds (parclean.models reads the same name)
# Pipeline components parclean never loads unless asked: the safety checker and its image processor (only with
# generate.safety_checker), an IP-Adapter's image encoder.
UNLOADED_COMPONENTS = {"safety_checker", "feature_extractor", "image_encoder"}
SAFETY_COMPONENTS = ("safety_checker", "feature_extractor")


class PreflightError(ValueError):
    """An input or output of the pipeline that cannot work; one line naming the setting, the path and the fix."""


def preflight(cfg: PipelineConfig, *, overwrite: bool = False) -> list[str]:
    """Check every input and output of `cfg`; one summary line per check (PreflightError at the first problem)."""
    return check_inputs(cfg) + check_outputs(cfg, overwrite=overwrite)


def check_inputs(cfg: PipelineConfig) -> list[str]:
    """The CLIP checkpoint, the generator, the prompt bank, the eval set and the triggers."""
    clip, image_size, architecture = check_clip(cfg.model, cfg.architecture, cfg.pretrained)
    return [f"CLIP model: {clip}",
            *check_scan_reference(cfg, image_size),
            f"generator: {check_generator(cfg.generate, cfg.tiny_sd)}",
            f"prompt bank: {check_bank(cfg.generate)}",
            f"eval set: {check_eval_set(with_eval_data(cfg.eval, architecture), image_size)}",
            f"triggers: {check_triggers(cfg.eval, image_size)}"]


def check_scan_reference(cfg: PipelineConfig, image_size: int) -> list[str]:
    """The scan's trusted reference model, when the config names one: a CLIP that reads the model's image size."""
    if cfg.scan is None or cfg.scan.reference is None:
        return []
    try:
        summary, reference_size, _ = check_clip(cfg.scan.reference, None, cfg.scan.reference_pretrained)
    except PreflightError as err:
        raise PreflightError(f"scan.reference: {str(err).removeprefix('model: ')}") from None
    if reference_size != image_size:
        raise PreflightError(f"scan.reference: {cfg.scan.reference} reads {reference_size} px images, the model "
                             f"{image_size} px; the reference must be of the model's architecture")
    return [f"scan reference: {summary}"]


def check_clip(model: str, architecture: str | None = None,
               pretrained: str | None = None) -> tuple[str, int, str]:
    """(summary, image size, architecture) of a CLIP checkpoint in any form `clean` reads: an open_clip pretrained
    tag, a safetensors file or folder (only its header is read), or a pickled state dict with `architecture`."""
    from parclean.models import TRANSFORMERS_PREFIXES, TRANSFORMERS_REFUSAL, checkpoint_file

    if pretrained is not None:
        return _check_pretrained(model, pretrained)
    if not Path(model).expanduser().exists():
        raise PreflightError(f"model: CLIP checkpoint {model} not found{looked_for(model)}")
    try:
        path = checkpoint_file(Path(model).expanduser())
    except (FileNotFoundError, ValueError) as err:
        raise PreflightError(f"model: {err}") from None
    if path.suffix != ".safetensors":
        return _check_pickled(path, architecture)
    metadata, parameters, names = _safetensors_header(path)
    if any(name.startswith(TRANSFORMERS_PREFIXES) for name in names):
        raise PreflightError(f"model: {path}: {TRANSFORMERS_REFUSAL}")
    architecture = architecture or metadata.get("architecture")
    if not architecture:
        raise PreflightError(f"model: {path}: its metadata does not name an open_clip architecture; set "
                             "architecture: in the pipeline config")
    if not any(name.startswith("visual.") for name in names):
        raise PreflightError(f"model: {path}: no visual.* tensors: not an open_clip CLIP state dict")
    config = _architecture_config(path, architecture, metadata.get("architecture_config"))
    image_size = _image_size(config)
    return f"{path} ({architecture}, {parameters / 1e6:.1f}M parameters, {image_size} px)", image_size, architecture


def _check_pickled(path: Path, architecture: str | None) -> tuple[str, int, str]:
    """An open_clip epoch_N.pt or a bare state dict: it names no architecture, so the config must."""
    if not architecture:
        raise PreflightError(f"model: {path}: a pickled checkpoint does not name its architecture; set "
                             "architecture: in the pipeline config (e.g. ViT-B-32)")
    image_size = _image_size(_architecture_config(path, architecture, None))
    summary = f"{path} ({architecture}, pickled state dict, read with weights_only=True, {image_size} px)"
    return summary, image_size, architecture


def _check_pretrained(architecture: str, tag: str) -> tuple[str, int, str]:
    import open_clip

    config = _architecture_config(Path(architecture), architecture, None)
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    if tag not in tags:
        raise PreflightError(f"pretrained: {architecture} has no pretrained tag {tag!r}; open_clip knows "
                             f"{', '.join(tags) or 'none'}")
    summary = f"{architecture} pretrained={tag} (open_clip tag; weights from the hub or its cache)"
    return summary, _image_size(config), architecture


def _safetensors_header(path: Path) -> tuple[dict[str, str], int, list[str]]:
    """(metadata, parameter count, tensor names), from the header: no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            parameters = sum(math.prod(handle.get_slice(name).get_shape()) for name in names)
            return handle.metadata() or {}, parameters, names
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise PreflightError(f"model: {path}: not a readable safetensors file ({err})") from None


def _architecture_config(path: Path, architecture: str, embedded: str | None) -> dict:
    if embedded is not None:
        try:
            config = json.loads(embedded)
        except ValueError as err:
            raise PreflightError(f"model: {path}: its architecture_config is not valid JSON ({err})") from None
        if isinstance(config, dict) and isinstance(config.get("vision_cfg"), dict):
            return config
        raise PreflightError(f"model: {path}: its architecture_config has no vision_cfg")
    from parclean.models import architecture_config

    try:
        return architecture_config(architecture)
    except ValueError:
        raise PreflightError(f"model: {path}: names architecture {architecture!r}, which open_clip does not know "
                             "(open_clip.list_models())") from None


def _image_size(config: dict) -> int:
    size = config["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def check_generator(generate: GenerateConfig, tiny_sd: TinySDConfig | None) -> str:
    """A diffusers folder with model_index.json and the components parclean loads, or a hub id."""
    model = generate.model
    path = Path(model).expanduser()
    if tiny_sd is not None and not path.exists():
        return f"{model}: a RANDOM tiny Stable Diffusion is built there (tiny_sd in the config)"
    if path.is_dir():
        return _check_diffusers_folder(path, model, generate.safety_checker)
    if path.exists():
        raise PreflightError(f"generate.model: {model} is a file, not a diffusers pipeline folder")
    if model.startswith((".", "/", "~")) or not HUB_ID.match(model):
        raise PreflightError(f"generate.model: diffusers pipeline folder {model} not found{looked_for(model)}")
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    where = "in the local hub cache" if cached else "not in the local hub cache: downloaded when generation starts"
    return f"hub id {model} ({where})"


def _check_diffusers_folder(path: Path, model: str, safety_checker: bool) -> str:
    index = path / "model_index.json"
    if not index.is_file():
        raise PreflightError(f"generate.model: {model}: not a diffusers pipeline folder (no model_index.json)")
    try:
        listed = json.loads(index.read_text())
    except ValueError as err:
        raise PreflightError(f"generate.model: {index}: not valid JSON ({err})") from None
    components = sorted(name for name, value in listed.items()
                        if not name.startswith("_") and isinstance(value, list) and value[0] is not None)
    skipped = UNLOADED_COMPONENTS - (set(SAFETY_COMPONENTS) if safety_checker else set())
    for name in components:
        if name not in skipped and not (path / name).is_dir():
            why = " (generate.safety_checker is true)" if name in SAFETY_COMPONENTS else ""
            raise PreflightError(f"generate.model: {model}: no {name}/ folder, which model_index.json lists{why}")
    loaded = [name for name in components if name not in skipped]
    return f"{model} ({listed.get('_class_name', 'diffusers pipeline')}: {', '.join(loaded)})"


def check_bank(generate: GenerateConfig) -> str:
    """The bank loads and expands into generate.num_samples captions."""
    from prompts.bank import BankError, load_bank
    from prompts.expand import expand

    try:
        bank = load_bank(generate.bank)
        captions = expand(bank, generate.num_samples, generate.seed, generate.allow_duplicate_captions)
    except BankError as err:
        raise PreflightError(f"generate.bank: {err}") from None
    return f"{bank.name} ({bank.source}): {len(captions)} captions"


def with_eval_data(cfg: EvalConfig, architecture: str) -> EvalConfig:
    """The eval config with the data a run would use: the toy world for toy models, and a refusal for a real CLIP
    whose config names no eval set."""
    if cfg.data is not None:
        return cfg
    try:
        return replace(cfg, data=default_eval_set(architecture))
    except ValueError as err:
        raise PreflightError(f"eval.data: {err}") from None


def check_eval_set(cfg: EvalConfig, image_size: int) -> str:
    """A registered eval set, or an ImageFolder that exists; one image loaded through the real loader; the
    target among the classes."""
    registered = cfg.data in eval_set_names()
    if not registered and not Path(cfg.data).expanduser().is_dir():
        raise PreflightError(f"eval.data: {cfg.data} is neither a registered eval set ({describe_registered()}) "
                             f"nor an image folder{looked_for(cfg.data)}")
    try:
        classnames = load_images(replace(cfg, count=1, num_workers=0), image_size).classnames
    except (OSError, ValueError) as err:
        raise PreflightError(f"eval.data: {err}") from None
    if cfg.target is not None and cfg.target not in classnames:
        shown = ", ".join(classnames[:10]) + (", ..." if len(classnames) > 10 else "")
        raise PreflightError(f"eval.target: {cfg.target!r} is not one of the {len(classnames)} eval classes "
                             f"({shown})")
    kind = "registered eval set" if registered else "image folder"
    target = f", target {cfg.target!r}" if cfg.target is not None else ""
    return f"{kind} {cfg.data}: {len(classnames)} classes, up to {cfg.count} images{target}"


def check_triggers(cfg: EvalConfig, image_size: int) -> str:
    """Each trigger applied to one grey image at the model's input size."""
    import torch

    from parclean.attacks import apply_trigger, patch_size

    triggers = named_triggers(cfg.triggers)
    if not triggers:
        return "none (clean accuracy only)"
    grey = torch.full((1, 3, image_size, image_size), 0.5)
    for name, trigger in triggers.items():
        if trigger.kind in ("badnet", "badnet_stripes", "image_patch") and patch_size(trigger, image_size) > image_size:
            raise PreflightError(f"eval.triggers: {name}: patch_size={trigger.patch_size} is larger than the "
                                 f"model's {image_size} px images")
        try:
            apply_trigger(grey, trigger, [0])
        except (OSError, ValueError, RuntimeError) as err:
            raise PreflightError(f"eval.triggers: {name}: cannot be applied ({err})") from None
    note = "" if cfg.target is not None else " (no eval.target: ASR is not measured)"
    return ", ".join(triggers) + note


def check_outputs(cfg: PipelineConfig, *, overwrite: bool = False) -> list[str]:
    """`out` and `shard_cache` can be created and written, and hold no other kind of output (unless overwrite)."""
    lines = [f"output: {_check_folder('out', cfg.out)}"]
    if not cfg.out_per_run:
        _claim("out", cfg.out, "pipeline run", overwrite)
        try:
            check_resumable(cfg.out, cfg.clean)
        except ValueError as err:
            raise PreflightError(f"out: {err}") from None
    lines.append(f"shard cache: {_check_folder('shard_cache', cfg.shard_cache)}")
    if cfg.tiny_sd is None or Path(cfg.generate.model).is_dir():  # a tiny SD still to build has no key yet
        shards = shard_set_folder(cfg.generate, cfg.shard_cache)
        _claim("shard_cache", shards, "shard set", overwrite)
        there = "a shard set is there (reused if it verifies)" if (shards / MANIFEST_NAME).is_file() else \
            f"{cfg.generate.num_samples} samples to generate"
        lines.append(f"shard set: {shards} ({there})")
    return lines


def _check_folder(setting: str, folder: str) -> str:
    """`folder` exists as a writable folder, or can be created: its nearest existing parent is one."""
    path = Path(os.path.abspath(Path(folder).expanduser()))
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise PreflightError(f"{setting}: cannot use {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{setting}: cannot write {folder}: {existing} is not writable{looked_for(folder)}")
    if existing != path:
        return f"{folder} (to be created)"
    found = ", ".join(kinds_in(path)) or "nothing parclean wrote"
    return f"{folder} (exists, holds {found})"


def _claim(setting: str, folder: str | Path, kind: str, overwrite: bool) -> None:
    try:
        claim_folder(folder, kind, overwrite=overwrite)
    except ValueError as err:
        raise PreflightError(f"{setting}: {err}") from None
