"""The data-free pipeline's settings: the stage configs it chains, where outputs go, how it scales and when it runs.

One YAML file (configs/pipeline/*.yaml) holds a whole run: `generate` (a GenerateConfig), `clean` (a
CleanConfig), `eval` (an EvalConfig), plus the settings below. Loaded by parclean.config, so unknown keys are
rejected and the stage configs check their own values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cleaning.report import EvalConfig
from cleaning.scan import ScanConfig
from cleaning.train import CleanConfig
from generation.config import GenerateConfig

RUNNERS = ("local", "dask")
LAUNCHERS = ("in-process", "accelerate")
CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z?LW#]+$")


@dataclass(frozen=True)
class TinySDConfig:
    """Build a RANDOM (untrained) tiny Stable Diffusion at generate.model when that folder is missing.

    For tests and development only: its images are not pictures of anything. The report says so.
    """

    seed: int = 0
    size: int = 32  # image side in pixels (multiple of 16)

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 16:
            raise ValueError(f"tiny_sd.size={self.size}: must be a multiple of 16")


@dataclass(frozen=True)
class RunnerConfig:
    """Where the generation tasks run: this machine (one worker per device), or a Dask cluster (one per GPU)."""

    kind: str = "local"  # local: one worker per entry of devices | dask: a Dask cluster
    devices: str | tuple[str, ...] = "auto"  # local: auto = every visible GPU (else generate.device), or [cpu, cpu]
    dask_address: str | None = None  # dask: an existing scheduler, "tcp://host:8786"; None: a LocalCluster
    n_workers: int = 2  # dask without an address: LocalCluster worker processes (one thread each)
    gpu_limit: str | None = None  # a Prefect global concurrency limit each shard task holds a slot of
    retries: int = 2  # per shard, on transient errors (CUDA OOM, I/O)
    retry_delay_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in RUNNERS:
            raise ValueError(f"runner.kind={self.kind!r}: use one of {', '.join(RUNNERS)}")
        if self.n_workers < 1 or self.retries < 0 or self.retry_delay_seconds < 0:
            raise ValueError("runner: n_workers must be >= 1, retries and retry_delay_seconds >= 0")
        from generation.workers import worker_devices

        worker_devices("auto", self.devices)  # a bad list is named now, not when generation starts


@dataclass(frozen=True)
class LaunchConfig:
    """How the cleaning step runs: in the flow's process, or as `accelerate launch` over several GPUs."""

    launcher: str = "in-process"  # in-process | accelerate
    num_processes: int = 1  # accelerate: one per GPU
    accelerate_args: tuple[str, ...] = ()  # more `accelerate launch` options, e.g. ["--mixed_precision", "bf16"]

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launch.launcher={self.launcher!r}: use one of {', '.join(LAUNCHERS)}")
        if self.num_processes < 1:
            raise ValueError(f"launch.num_processes={self.num_processes}: must be >= 1")


@dataclass(frozen=True)
class ScheduleConfig:
    """When `parclean serve` (or `prefect deploy`) runs the pipeline."""

    cron: str  # "0 2 * * *": every day at 02:00
    timezone: str = "UTC"
    deployment: str = "nightly"  # the deployment's name: data-free-clean/<deployment>

    def __post_init__(self) -> None:
        fields = self.cron.split()
        if len(fields) != 5 or not all(CRON_FIELD.match(part) for part in fields):
            raise ValueError(f"schedule.cron={self.cron!r}: expected 5 cron fields, e.g. '0 2 * * *'")


@dataclass(frozen=True)
class PipelineConfig:
    """bank -> generate -> clean -> evaluate -> report, in one run."""

    # The CLIP to clean: the checkpoint forms `parclean clean --model` takes (docs/cleaning.md): a parclean
    # .safetensors file or folder, an open_clip epoch_N.pt or bare state dict with `architecture`, or an open_clip
    # architecture name with `pretrained` (a tag, e.g. ViT-B-32 + openai).
    model: str
    generate: GenerateConfig
    architecture: str | None = None  # of a `model` checkpoint that does not name its own, e.g. ViT-B-32
    pretrained: str | None = None  # an open_clip pretrained tag: then `model` is the architecture name
    clean: CleanConfig = field(default_factory=CleanConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = "runs/data-free-clean"  # cleaned model, report, artifacts
    out_per_run: bool = False  # true: each run writes into out/<UTC time> (scheduled runs keep their history)
    shard_cache: str = "runs/shard-cache"  # generated shard sets, one folder per (bank, seed, model, settings)
    tiny_sd: TinySDConfig | None = None  # set: generate.model is a random tiny SD, built there when missing
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    sample_grid: int = 16  # generated samples shown in the run's artifact (0: none)
    # The trigger-agnostic backdoor scan before and after cleaning (docs/scan.md); null: no scan. It costs about a
    # minute per toy model on one core; on a 1000-class set it scales with the classes (docs/scan.md).
    scan: ScanConfig | None = field(default_factory=ScanConfig)
    schedule: ScheduleConfig | None = None  # for `parclean serve` / `prefect deploy`

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("model: give the CLIP checkpoint to clean")
        if self.architecture is not None and self.pretrained is not None:
            raise ValueError(f"architecture={self.architecture!r} and pretrained={self.pretrained!r}: with a "
                             "pretrained tag, model is the architecture name; architecture is for checkpoint files")
        if self.sample_grid < 0:
            raise ValueError(f"sample_grid={self.sample_grid}: must be >= 0")
