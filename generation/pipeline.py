"""Load a diffusers text-to-image pipeline (hub id or local folder) and set it up for batch generation."""

from __future__ import annotations

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
    if dtype == "fp16" and device.type == "cpu":
        logger.warning("dtype=fp16 on CPU is slow and not always supported; fp32 or bf16 is the usual choice")
    return DTYPES[dtype]


def load_pipeline(cfg: GenerateConfig) -> DiffusionPipeline:
    """Load `cfg.model` through `DiffusionPipeline.from_pretrained` and apply the settings' levers."""
    from diffusers import DiffusionPipeline

    source = resolve_model_source(cfg.model)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    index = _model_index(source)
    kwargs: dict = {DTYPE_ARGUMENT: dtype}
    if "safety_checker" in index and not cfg.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # also skips loading its weights
    logger.info("loading %s (%s) on %s as %s", source, index.get("_class_name", "?"), device, dtype)
    if not logger.isEnabledFor(logging.DEBUG):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars: only in debug output
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as err:
        if Path(source).exists():
            raise
        raise _not_available(source, err) from None
    return prepare_pipeline(pipe, cfg, device)


def prepare_pipeline(pipe: DiffusionPipeline, cfg: GenerateConfig, device: torch.device) -> DiffusionPipeline:
    """Move to the device and apply scheduler, channels_last, compile and safety-checker settings."""
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
        # In place; fullgraph off. The batch size and resolution stay fixed (images.py pads the last
        # batch), so it compiles once.
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


def _not_available(source: str, err: OSError) -> FileNotFoundError:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return FileNotFoundError(
        f"model {source!r}: no such local folder ({Path(source).resolve()}), and as a hub id its weights are "
        f"not available offline (not in the Hugging Face cache; hub unreachable). Pass a local diffusers "
        f"folder (model: /path/with/model_index.json) or download the weights first. [{first}]"
    )
