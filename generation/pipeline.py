"""Load a diffusers text-to-image pipeline (hub id or local folder) and set it up for batch generation."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.utils import deprecation_utils

from generation.config import GenerateConfig

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# diffusers renamed from_pretrained's torch_dtype to dtype (the old name warns); older releases know only torch_dtype.
DTYPE_ARGUMENT = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
# The pipeline's own safety checker is moved here so it can flag without blackening (see images.nsfw_flags).
FLAG_ONLY_CHECKER = "parclean_flag_only_safety_checker"


def resolve_model_source(model: str) -> str:
    """A local pipeline folder (checked) or a hub id; a missing local path raises one clear error."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model {str(path)!r}: not a diffusers pipeline folder (no model_index.json in {path.resolve()})"
            )
        return str(path)
    if model.startswith((".", "/", "~")) or not HUB_ID.match(model):
        raise FileNotFoundError(f"model {model!r}: no such folder ({path.resolve()})")
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine; use device: cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def settings_for_device(cfg: GenerateConfig, device: torch.device) -> GenerateConfig:
    """The GPU recipe on a CPU: fp16 becomes fp32 and compile goes off, said in one log line.

    fp16 kernels on CPUs are slow or missing, and compiling the UNet there takes minutes without a word.
    The shards still record the settings as given (the config names what was asked, as with device: auto).
    """
    if device.type != "cpu":
        return cfg
    changes, said = {}, []
    if cfg.dtype == "fp16":
        changes["dtype"] = "fp32"
        said.append("fp32 instead of fp16 (fp16 is slow or unsupported on CPUs)")
    if cfg.compile:
        changes["compile"] = False
        said.append("compile off (compiling on a CPU takes minutes and gains little)")
    if changes:
        logger.info("on the CPU: %s", "; ".join(said))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_pipeline(cfg: GenerateConfig, device: str | None = None) -> DiffusionPipeline:
    """Load `cfg.model` through `DiffusionPipeline.from_pretrained` and apply the settings' levers.

    device: where this copy runs, instead of cfg.device (one worker of several, each on its own GPU).
    """
    from diffusers import DiffusionPipeline

    source = resolve_model_source(cfg.model)
    device = resolve_device(device or cfg.device)
    cfg = settings_for_device(cfg, device)
    dtype = resolve_dtype(cfg.dtype, device)
    index = _model_index(source)
    kwargs: dict = {DTYPE_ARGUMENT: dtype, **absent_components(source, index)}
    if cfg.safety_checker:
        check_safety_checker_parts(source, index)
    elif "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # also skips loading its weights
    logger.info("loading %s (%s) on %s as %s", source, index.get("_class_name", "?"), device, dtype)
    if not logger.isEnabledFor(logging.DEBUG):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # "Loading pipeline components" and the text encoder's "Loading weights" bars: only in debug output
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as err:
        if Path(source).exists():
            raise
        raise _not_available(source, err) from None
    return prepare_pipeline(pipe, cfg, device)


def prepare_pipeline(pipe: DiffusionPipeline, cfg: GenerateConfig, device: torch.device) -> DiffusionPipeline:
    """Move to the device and apply scheduler, channels_last, compile and safety-checker settings."""
    cfg = settings_for_device(cfg, device)
    checker = getattr(pipe, "safety_checker", None)
    if checker is not None:
        pipe.safety_checker = None  # the pipeline would blacken flagged images; we only flag them
    if cfg.safety_checker:
        if checker is None:
            logger.warning("safety_checker=true but %s has no safety checker: nothing is flagged", cfg.model)
        setattr(pipe, FLAG_ONLY_CHECKER, checker.to(device) if checker is not None else None)
    pipe.to(device)
    if cfg.scheduler is not None:
        pipe.scheduler = swap_scheduler(pipe, cfg.scheduler)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if cfg.channels_last and denoiser is not None:
        denoiser.to(memory_format=torch.channels_last)
    if cfg.compile and denoiser is not None:
        # In place; fullgraph off. The resolution is fixed; a run's one short batch (the end of a shard or of
        # the run) costs one more compile, after which the batch dimension is dynamic.
        denoiser.compile(fullgraph=False)
    pipe.set_progress_bar_config(disable=True)  # we draw one bar over all images ourselves
    if denoiser is not None:
        processors = sorted({type(p).__name__ for p in getattr(denoiser, "attn_processors", {}).values()})
        logger.debug("attention processors: %s", processors)
    return pipe


def swap_scheduler(pipe: DiffusionPipeline, name: str):
    """`name`'s class built from the pipeline's scheduler config (keeps betas, prediction type, ...)."""
    import diffusers

    cls = getattr(diffusers, name)
    compatible = {c.__name__ for c in getattr(pipe.scheduler, "compatibles", [])}
    if compatible and name not in compatible and name != type(pipe.scheduler).__name__:
        logger.warning("scheduler %s is not listed as compatible with %s", name, type(pipe.scheduler).__name__)
    return cls.from_config(pipe.scheduler.config)


def _model_index(source: str) -> dict:
    """The pipeline's model_index.json from the folder or the local hub cache; {} if not cached yet."""
    from diffusers import DiffusionPipeline

    if Path(source).exists():
        return dict(DiffusionPipeline.load_config(source))
    try:
        # Cache only: asking the hub here would retry for ~20 s when it cannot be reached.
        return dict(DiffusionPipeline.load_config(source, local_files_only=True))
    except OSError:
        return {}  # not cached: from_pretrained downloads it if the hub can be reached


def absent_components(source: str, index: dict) -> dict[str, None]:
    """Optional components (feature_extractor, safety_checker, ...) that model_index.json lists but the local
    folder lacks, as None: partial copies of a pipeline then load instead of failing on the missing folder."""
    import diffusers

    folder = Path(source)
    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    optional = getattr(pipeline_class, "_optional_components", [])
    if not folder.is_dir():
        return {}
    return {name: None for name in optional if name in index and not (folder / name).is_dir()}


def check_safety_checker_parts(source: str, index: dict) -> None:
    """safety_checker=true needs the checker and the feature extractor it sees the images through."""
    folder = Path(source)
    if not folder.is_dir():
        return  # a hub id: its index says what it has (prepare_pipeline warns when there is no checker)
    if not (_listed(index, "safety_checker") and (folder / "safety_checker").is_dir()):
        raise FileNotFoundError(
            f"safety_checker=true: {folder} has no safety checker (no safety_checker/ folder, or model_index.json "
            f"lists none); set safety_checker: false, or use a pipeline folder that has one"
        )
    if not (_listed(index, "feature_extractor") and (folder / "feature_extractor").is_dir()):
        raise FileNotFoundError(
            f"safety_checker=true: {folder} has no feature_extractor/, which the safety checker needs to see the "
            f"images; copy it from the original pipeline, or set safety_checker: false"
        )


def _listed(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and any(part is not None for part in entry)


def _not_available(source: str, err: OSError) -> FileNotFoundError:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return FileNotFoundError(
        f"model {source!r}: no such local folder ({Path(source).resolve()}), and as a hub id its weights are "
        f"not available offline (not in the Hugging Face cache; hub unreachable). Pass a local diffusers "
        f"folder (model: /path/with/model_index.json) or download the weights first. [{first}]"
    )
