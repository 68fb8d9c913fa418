"""The generation stage's settings: one frozen dataclass, checked before any model is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEVICES = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "fp16", "bf16", "fp32")
IMAGE_FORMATS = ("jpg", "png")
SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # as parclean.shards.shard_filename


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate (model, captions, count), how (steps, guidance, size) and on what (device, dtype)."""

    model: str  # hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5") or a local diffusers folder
    bank: str = "general"  # prompt bank: a packaged name or a path to a bank file
    seed: int = 0  # run seed: picks the captions and, with each caption's index, each image's seed
    num_samples: int = 1000
    shard_size: int = 1000
    name: str = "synth"  # shard prefix: NAME-000000.tar
    batch_size: int = 8  # images per call; outputs depend on it (see docs/generation.md)
    steps: int = 25
    guidance: float = 7.5
    height: int | None = None  # None: the model's default (UNet sample size x VAE scale)
    width: int | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None  # None: the pipeline's own; else a diffusers class, "DDIMScheduler"
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: fp16 on cuda, fp32 elsewhere
    compile: bool = False  # torch.compile the UNet (worth it for long runs on a GPU)
    channels_last: bool = False
    safety_checker: bool = False  # True: flag (never blacken) images the pipeline's checker fires on
    image_format: str = "jpg"
    jpeg_quality: int = 95
    store_size: int | None = None  # resize (shorter side) to this before storing, e.g. 256
    allow_duplicate_captions: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Reject values that cannot work, naming the setting and the value (raises ValueError)."""
        _require(bool(self.model.strip()), "model", self.model, "give a hub id or a local diffusers folder")
        _require(bool(self.bank.strip()), "bank", self.bank, "give a bank name or path")
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        for setting in ("num_samples", "shard_size", "batch_size", "steps"):
            _require(getattr(self, setting) >= 1, setting, getattr(self, setting), "must be >= 1")
        _require(bool(SHARD_NAME.match(self.name)), "name", self.name, "letters, digits, '_', '.', '-'")
        _require(self.guidance >= 0, "guidance", self.guidance, "must be >= 0 (0 turns guidance off)")
        for setting in ("height", "width"):
            value = getattr(self, setting)
            ok = value is None or (value >= 8 and value % 8 == 0)
            _require(ok, setting, value, "must be a positive multiple of 8, or null for the model's default")
        _require(bool(DEVICES.match(self.device)), "device", self.device, "use auto, cpu, cuda, cuda:N or mps")
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"use one of {', '.join(DTYPES)}")
        _require(self.image_format in IMAGE_FORMATS, "image_format", self.image_format, "use jpg or png")
        _require(1 <= self.jpeg_quality <= 100, "jpeg_quality", self.jpeg_quality, "must be 1..100")
        ok = self.store_size is None or self.store_size >= 8
        _require(ok, "store_size", self.store_size, "must be >= 8, or null to store images as generated")
        if self.scheduler is not None:
            _check_scheduler(self.scheduler)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)


def _require(ok: bool, setting: str, value: Any, fix: str) -> None:
    if not ok:
        raise ValueError(f"{setting}={value!r}: {fix}")


def _check_scheduler(name: str) -> None:
    import diffusers  # lazy module: only the schedulers get imported here

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax"))
        raise ValueError(f"scheduler={name!r}: not a diffusers scheduler class; e.g. {', '.join(known[:8])}, ...")
