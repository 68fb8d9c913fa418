"""The cleaning trainer: PAR (Perturb and Recover), and the FT and CleanCLIP baselines, in one Accelerate loop.

    parclean clean --config configs/clean/toy-cpu.yaml --model MODEL --shards DIR --out DIR
    accelerate launch --multi_gpu --num_processes 4 -m cleaning.train --config configs/clean/vit-b-32.yaml ...

One readable loop (`clean`): every process holds a slice of the global batch; features are gathered with their
gradient so the loss is the global batch's (losses.py), and Accelerate/DDP averages the gradients. A rerun of
the same --out resumes from the latest checkpoint exactly. docs/cleaning.md describes the loss, the settings
and every deviation from the official code (nmndeep/PerturbAndRecover).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from cleaning.augment import cleanclip_image_view, cleanclip_text_view, par_augment
from cleaning.command import add_arguments
from cleaning.losses import (
    DEFAULT_CLIP_WEIGHT,
    DEFAULT_INMODAL_WEIGHT,
    DEFAULT_TAU,
    FeatureBatch,
    aligned_reference,
    gather_features,
)
from cleaning.objectives import OBJECTIVES
from cleaning.provenance import provenance
from parclean import console
from parclean.command import run_command, set_overrides
from parclean.config import load_config, to_dict, write_resolved
from parclean.models import LoadedModel, load_source, normalize, save_model
from parclean.outputs import claim_folder, follow_umask, output_lock
from parclean.run_log import append_record, truncate_after
from parclean.schedules import cosine, warmup_cosine
from parclean.shards import absolute_location

logger = logging.getLogger(__name__)

SCHEDULES = ("official", "cosine", "constant")
PRECISIONS = ("no", "fp16", "bf16")
CHECKPOINTS = "checkpoints"
LOG_NAME = "train_log.jsonl"
SCHEDULER_NAME = "scheduler.json"  # the lr scheduler's state in a checkpoint (JSON: nothing to unpickle)
START_NAME = "start.json"  # the starting weights' digest, checked before a resume
# Settings a rerun may change and still resume; any other change needs a new --out.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_checkpoints", "threads", "data.num_workers", "data.on_error",
                     "data.verify"}


@dataclass(frozen=True)
class DataConfig:
    """Where the clean pairs come from and how they are read (cleaning/data.py)."""

    shards: str | None = None  # shard set folder or URL; --shards overrides
    num_workers: int = 0
    on_error: str = "fail"  # fail | skip: damaged shards or samples (and shards whose sha256 is not the manifest's)
    verify: bool = True  # check every shard's sha256 against the manifest before training (reads the set once)
    shuffle_buffer: int = 2000


@dataclass(frozen=True)
class CleanConfig:
    """One cleaning recipe. Defaults: the paper's ViT-B/32 recipe (official trigger.sh and train.py)."""

    objective: str = "par"  # a name in cleaning/objectives.py: par | ft | cleanclip | par_cleanclip
    tau: float = DEFAULT_TAU  # PAR's cap on each modality's mean squared embedding distance
    steps: int = 244  # optimizer steps (official: 2 epochs of 250k pairs at 4 x 512 = 122 steps per epoch)
    batch_size: int = 2048  # global contrastive batch per step: all processes and micro-batches together
    grad_accum: int = 1  # micro-batches per step and process; the loss still sees the whole batch (feature cache)
    lr: float = 3e-5  # the first step's lr ("official": official --lr-start; "cosine": the peak)
    lr_end: float = 1e-9  # the last lr (official --lr-end)
    schedule: str = "official"  # official | cosine | constant
    linear_fraction: float = 0.5  # official: share of steps for the linear phase (official --warmup-epochs 0.5 * 2)
    linear_to: float = 0.1  # official: the linear phase ends at lr * linear_to (3e-5 -> 3e-6, official --lr)
    warmup_steps: int = 0  # cosine: linear warm-up from 0 to lr
    weight_decay: float = 1e-4  # not on gains, biases, norms or the (frozen) logit scale
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    mixed_precision: str = "no"  # no | fp16 | bf16 (official: fp16 autocast with a GradScaler)
    augment: bool = True  # PAR's augmentation of the (first) view for par, ft and par_cleanclip
    clip_weight: float = DEFAULT_CLIP_WEIGHT  # cleanclip: lambda1
    inmodal_weight: float = DEFAULT_INMODAL_WEIGHT  # cleanclip: lambda2
    checkpoint_every: int = 100  # steps; the last step is always checkpointed
    keep_checkpoints: int = 2
    seed: int = 0
    threads: int = 0  # torch CPU threads per process; 0: torch's default (1 is faster on a busy CPU)
    # A variant of PAR, not the paper's: the distance to the reference is taken after the rotation that best aligns
    # the reference's embeddings with the current ones (losses.aligned_reference), so rotating the shared embedding
    # space, which keeps every similarity and a backdoor, does not count as a perturbation (docs/results-v2.md).
    align_reference: bool = False
    frozen: tuple[str, ...] = ()  # parameter-name prefixes kept fixed, e.g. ["visual.proj", "text_projection"]
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        for name, value, options in (("objective", self.objective, OBJECTIVES), ("schedule", self.schedule, SCHEDULES),
                                     ("mixed_precision", self.mixed_precision, PRECISIONS),
                                     ("data.on_error", self.data.on_error, ("fail", "skip"))):
            if value not in options:
                raise ValueError(f"{name}={value!r}: use one of {', '.join(options)}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be at least 1")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be 0 (torch's default) or more")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.lr_end < 0 or self.tau <= 0:
            raise ValueError(f"lr={self.lr}, lr_end={self.lr_end}, tau={self.tau}: lr and tau must be positive, "
                             "lr_end non-negative")
        if not 0 < self.linear_fraction < 1 or not 0 < self.linear_to <= 1:
            raise ValueError(f"linear_fraction={self.linear_fraction} must be in (0, 1), linear_to={self.linear_to} "
                             "in (0, 1]")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")


def learning_rate(cfg: CleanConfig, step: int) -> float:
    """The lr of step `step` (0-based)."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "official":
        # Official utils.cosine_scheduler: np.linspace(lr_start, lr, n1) over the first epoch, then cosine from
        # lr to lr_end over the rest (train.py: warmup_epochs = 0.5 * epochs, start_warmup_value = lr_start).
        n1 = max(1, int(cfg.linear_fraction * cfg.steps))
        middle = cfg.lr * cfg.linear_to
        if step < n1:
            return cfg.lr + (middle - cfg.lr) * step / max(1, n1 - 1)
        return cosine(middle, cfg.lr_end, step - n1, cfg.steps - n1)
    return warmup_cosine(cfg.lr, cfg.warmup_steps, step, cfg.steps, cfg.lr_end)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only; none on gains, biases, norms, embeddings' 1-d vectors.

    Official train.py: `p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n` gets no decay; every norm parameter
    and every bias in open_clip models is 1-d, so `ndim < 2` alone decides. Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or infinite; training stopped before the update."""


def clean(cfg: CleanConfig, model: str | Path | LoadedModel, shards: str | Path | None, out_dir: str | Path, *,
          pretrained: str | None = None, architecture: str | None = None, stop_after: int | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Fine-tune `model` on the pairs in `shards` with cfg.objective; write out_dir/model.safetensors.

    `model`: a local checkpoint (file or folder; `architecture` for one that does not name its own), an
    architecture name with `pretrained`, or a LoadedModel (trained in place). A rerun with the same out_dir
    resumes from its latest checkpoint. `stop_after` ends the run after that many steps (checkpointed), as if it
    had been interrupted there.
    Returns steps, seconds, samples/s and the final loss terms.
    """
    # One process locks --out for the run: the main one (the others write only through Accelerate's barriers).
    # The process state is set up here as the Accelerator below asks for it (on the CPU when there is no GPU).
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    with output_lock(out_dir, f"parclean clean --out {out_dir}") if main else nullcontext():
        return _clean(cfg, model, shards, Path(out_dir), pretrained, architecture, stop_after, progress)


def _clean(cfg: CleanConfig, model: str | Path | LoadedModel, shards: str | Path | None, out: Path,
           pretrained: str | None, architecture: str | None, stop_after: int | None, progress: bool) -> dict[str, Any]:
    if not (shards or cfg.data.shards):
        raise ValueError("no shard set: pass --shards DIR (or set data.shards in the config)")
    cfg = with_shards(cfg, shards or cfg.data.shards)
    shards = cfg.data.shards
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    local_batch = _local_batch_size(cfg, world)
    set_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # The model to clean (train mode, logit scale frozen) and, for PAR, the frozen reference: a second copy of
    # the same poisoned weights, in eval mode, without gradients.
    in_memory = isinstance(model, LoadedModel)
    loaded = model if in_memory else _load(model, pretrained, architecture)
    reference = None
    if OBJECTIVES[cfg.objective].needs_reference:
        reference = copy.deepcopy(loaded.model) if in_memory else _load(model, pretrained, architecture).model
        reference.eval().requires_grad_(False).to(accelerator.device)
    loaded.model.logit_scale.requires_grad_(False)  # official train.py uses logit_scale.exp().item(): a constant
    _freeze(loaded.model, cfg.frozen)
    starting_weights = weights_digest(loaded.model)
    source = provenance(model, loaded.architecture, pretrained, shards) if accelerator.is_main_process else {}
    optimizer = torch.optim.AdamW(parameter_groups(loaded.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.eps)
    scheduler = LambdaLR(optimizer, lambda step: learning_rate(cfg, step) / cfg.lr)
    # The scheduler is not prepared (Accelerate would step it once per process) nor registered for checkpointing
    # (Accelerate unpickles registered objects with weights_only=False): its state goes to scheduler.json.
    net, optimizer = accelerator.prepare(loaded.model, optimizer)
    logit_scale = float(accelerator.unwrap_model(net).logit_scale.exp())

    start = _start_or_resume(accelerator, out, cfg, {"weights_sha256": starting_weights, **source}, scheduler)
    end = max(start, min(cfg.steps, stop_after if stop_after is not None else cfg.steps))
    failing = _check_shards(accelerator, shards, cfg.data) if start < end and cfg.data.verify else 0
    main = accelerator.is_main_process
    if main:
        logger.info("%s on %d process(es), %s: steps %d..%d of %d, batch %d (%d per process, %d micro-batches)",
                 cfg.objective, world, accelerator.device, start, end, cfg.steps, cfg.batch_size, local_batch,
                 cfg.grad_accum)
    chunks = _chunks(local_batch, cfg.grad_accum)
    terms: dict[str, float] = {}
    began = time.perf_counter()
    net.train()
    with _batches(cfg, shards, loaded, start, end, rank, world) as stream, \
            tqdm(total=end, initial=start, desc=f"clean ({cfg.objective})", unit="step",
                 disable=not (main and progress) or None) as bar:
        for step in range(start, end):
            batch = next(stream)
            views = _views(cfg, loaded, batch.images.to(accelerator.device), batch.tokens.to(accelerator.device),
                           step, offset=rank * local_batch)
            with torch.no_grad(), accelerator.autocast():
                reference_features = None if reference is None else _gathered(
                    [_encode(reference, views[:1], rows)[0] for rows in chunks])
                # Gradient accumulation the open_clip way: features of every micro-batch without gradient...
                cached = [_encode(net, views, rows) for rows in chunks] if len(chunks) > 1 else None
            for j, rows in enumerate(chunks):
                # ...then each micro-batch again with gradient, spliced into the cached features, so that every
                # micro-step's loss is the whole batch's. Gradients are synchronised on the last one only.
                sync = j == len(chunks) - 1
                with nullcontext() if sync else accelerator.no_sync(net):
                    fresh = _encode(net, views, rows)
                    features = fresh if cached is None else _splice(cached, fresh, j)
                    total, parts = _objective(cfg, features, reference_features, logit_scale)
                    terms = {**{name: float(value) for name, value in parts.items()}, "loss": float(total.detach())}
                    _stop_if_not_finite(step, terms)
                    accelerator.backward(total)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            if main:
                elapsed = round(time.perf_counter() - began, 3)
                append_record(out / LOG_NAME, {"step": done, "lr": lr, **terms, "seconds": elapsed})
                bar.set_postfix({name: f"{value:.4g}" for name, value in terms.items()}, refresh=False)
                bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == end:
                _save_checkpoint(accelerator, out, done, cfg.keep_checkpoints, scheduler)
    seconds = time.perf_counter() - began
    data_errors = _data_errors(accelerator, getattr(stream, "stats", None), failing)

    result = {"objective": cfg.objective, "steps": end, "steps_run": end - start, "resumed_from": start,
              "seconds": round(seconds, 3), "samples_per_s": round((end - start) * cfg.batch_size / seconds, 2)
              if end > start else None, "processes": world, "final": terms, "finished": end == cfg.steps,
              "data_errors": data_errors}
    if main and end == cfg.steps:
        trained = LoadedModel(accelerator.unwrap_model(net), loaded.architecture, loaded.tokenizer,
                              loaded.image_size, loaded.mean, loaded.std)
        metadata = {"cleaning": json.dumps({"objective": cfg.objective, "tau": cfg.tau, "steps": cfg.steps, **source})}
        result["model"] = str(save_model(trained, out / "model.safetensors", extra_metadata=metadata))
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return result


# ------------------------------------------------------------------------------------------------ set-up


def _load(model: str | Path, pretrained: str | None, architecture: str | None) -> LoadedModel:
    return load_source(model, architecture=architecture, pretrained=pretrained)


def with_shards(cfg: CleanConfig, shards: str | Path) -> CleanConfig:
    """`cfg` as config.yaml records it: data.shards is the shard set the run reads (a local folder absolute)."""
    return replace(cfg, data=replace(cfg.data, shards=absolute_location(shards)))


def _freeze(model: torch.nn.Module, prefixes: tuple[str, ...]) -> None:
    parameters = dict(model.named_parameters())
    for prefix in prefixes:
        matched = [parameter for name, parameter in parameters.items() if name.startswith(prefix)]
        if not matched:
            examples = ", ".join(list(parameters)[:3])
            raise ValueError(f"frozen: no parameter name starts with {prefix!r} (e.g. {examples})")
        for parameter in matched:
            parameter.requires_grad_(False)


def _local_batch_size(cfg: CleanConfig, world: int) -> int:
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} does not divide into {world} process(es) x grad_accum "
                         f"{cfg.grad_accum}: use a multiple of {world * cfg.grad_accum}")
    return cfg.batch_size // world


def _chunks(local_batch: int, grad_accum: int) -> list[slice]:
    size = local_batch // grad_accum
    return [slice(i * size, (i + 1) * size) for i in range(grad_accum)]


def _batches(cfg: CleanConfig, shards: str, loaded: LoadedModel, start: int, end: int, rank: int,
             world: int) -> AbstractContextManager[Iterator[Any]]:
    """This process's batch stream from step `start` (a context manager that stops its workers)."""
    if start >= end:
        return nullcontext(iter(()))  # nothing to train: do not open the shard set
    from cleaning.data import batches  # webdataset and open_clip transforms: imported when data is read

    data = cfg.data
    return batches(shards, image_size=loaded.image_size, tokenizer=loaded.tokenizer,
                   global_batch_size=cfg.batch_size, seed=cfg.seed, start_step=start, rank=rank, world_size=world,
                   num_workers=data.num_workers, on_error=data.on_error, shuffle_buffer=data.shuffle_buffer)


def _check_shards(accelerator: Accelerator, shards: str, data: DataConfig) -> int:
    """Shards whose size or sha256 is not the manifest's (the main process reads them, the others are told):
    with on_error=fail, a ShardError naming the first; with skip, a warning each, and their count."""
    from accelerate.utils import broadcast_object_list

    from parclean.shards import ShardError, read_manifest, verify_shards

    found: list[list[str] | None] = [None]
    if accelerator.is_main_process:
        listed = {shard["filename"] for shard in read_manifest(shards)["shards"]}
        found = [[p for p in verify_shards(shards) if p.split(":")[0] in listed]]
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    problems = found[0] or []
    if problems and data.on_error == "fail":
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ShardError(f"{shards}: {problems[0]}{more}: the set changed after its manifest was written; regenerate "
                         "it, or set data.on_error=skip to train on it anyway")
    for problem in problems:
        logger.warning("%s: %s; training on it anyway (data.on_error=skip)", shards, problem)
    return len({p.split(":")[0] for p in problems})


def _data_errors(accelerator: Accelerator, stats: Any, failing: int) -> dict[str, int]:
    """What on_error=skip let through in this run (since the step it resumed from), for result.json."""
    replaced = torch.tensor(getattr(stats, "samples_replaced", 0), device=accelerator.device)
    # Every process indexes the whole set (same shard losses) but reads and decodes only its own samples.
    return {"shards_failing_sha256": failing, "damaged_shards": getattr(stats, "damaged_shards", 0),
            "samples_skipped": getattr(stats, "samples_skipped", 0),
            "samples_replaced": int(accelerator.reduce(replaced, reduction="sum"))}


# ------------------------------------------------------------------------------------------------ one step


def _views(cfg: CleanConfig, loaded: LoadedModel, images: Tensor, tokens: Tensor, step: int,
           offset: int) -> list[tuple[Tensor, Tensor]]:
    """Model inputs (normalised images, tokens): the first view, then CleanCLIP's augmented one when the objective
    reads it. PAR's augmentation (cfg.augment) applies to the first view when the objective asks for it."""
    mean, std = loaded.mean, loaded.std
    objective = OBJECTIVES[cfg.objective]
    if cfg.augment and objective.augment_first_view:
        first = (par_augment(images, mean, std, seed=cfg.seed, step=step, offset=offset), tokens)
    else:
        first = (normalize(images, mean, std), tokens)
    if not objective.cleanclip_view:
        return [first]
    augmented = cleanclip_image_view(images, seed=cfg.seed, step=step, offset=offset)
    augmented_tokens = cleanclip_text_view(tokens, seed=cfg.seed, step=step, offset=offset)
    return [first, (normalize(augmented, mean, std), augmented_tokens)]


def _encode(model: torch.nn.Module, views: list[tuple[Tensor, Tensor]], rows: slice) -> list[tuple[Tensor, Tensor]]:
    """Unit image and text features of `rows` of every view, in one forward call (so DDP sees one forward)."""
    images = torch.cat([image[rows] for image, _ in views])
    tokens = torch.cat([token[rows] for _, token in views])
    output = model(image=images, text=tokens)
    if isinstance(output, dict):  # open_clip models built with output_dict=True
        output = (output["image_features"], output["text_features"])
    image_features, text_features = output[0].float().chunk(len(views)), output[1].float().chunk(len(views))
    return list(zip(image_features, text_features, strict=True))


def _splice(cached: list[list[tuple[Tensor, Tensor]]], fresh: list[tuple[Tensor, Tensor]],
            j: int) -> list[tuple[Tensor, Tensor]]:
    """Per view, the features of all micro-batches in order, micro-batch j's with gradient."""
    chunks = [fresh if i == j else part for i, part in enumerate(cached)]
    return [(torch.cat([c[v][0] for c in chunks]), torch.cat([c[v][1] for c in chunks])) for v in range(len(fresh))]


def _gathered(per_chunk: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One view's (image, text) features over all micro-batches and processes (reference: no gradient)."""
    return (gather_features(torch.cat([image for image, _ in per_chunk])),
            gather_features(torch.cat([text for _, text in per_chunk])))


def _objective(cfg: CleanConfig, features: list[tuple[Tensor, Tensor]], reference: tuple[Tensor, Tensor] | None,
               logit_scale: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The global batch's loss and its terms (every process computes the same values)."""
    (image, text), *others = [(gather_features(i), gather_features(t)) for i, t in features]
    if reference is not None and cfg.align_reference:
        reference = aligned_reference(image, text, *reference)
    batch = FeatureBatch(image, text, augmented=others[0] if others else None, reference=reference)
    return OBJECTIVES[cfg.objective].loss(batch, logit_scale, cfg)


def _stop_if_not_finite(step: int, terms: dict[str, float]) -> None:
    bad = [name for name, value in terms.items() if not math.isfinite(value)]  # the parts come before the total
    if bad:
        values = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
        raise NonFiniteLoss(f"step {step + 1}: loss term {bad[0]} is {terms[bad[0]]} ({values}); stopped before the "
                            "update. Lower lr (or use bf16 rather than fp16); a rerun resumes from the last checkpoint")


# ------------------------------------------------------------------------------------------------ state


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place once written), oldest first."""
    found = []
    for path in (out / CHECKPOINTS).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def check_resumable(out: str | Path, cfg: CleanConfig) -> None:
    """ValueError when `out` holds checkpoints of another recipe: what a resume refuses, checked before any work."""
    out = Path(out)
    if complete_checkpoints(out) and (out / "config.yaml").is_file():
        _check_same_recipe(out / "config.yaml", cfg)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes and bytes): which model a run started from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _provenance_comments(start: dict[str, Any]) -> list[str]:
    """config.yaml's header: what the run started from, by sha256 (start.json has the same, as JSON)."""
    if "source" not in start:
        return []
    digest = f"sha256 {start['source_sha256']}" if start["source_sha256"] else f"pretrained {start['pretrained']}"
    return [f"source: {start['source']} ({digest})", f"architecture: {start['architecture']}",
            f"shards: {start['shards']} (manifest sha256 {start['manifest_sha256']})"]


def _start_or_resume(accelerator: Accelerator, out: Path, cfg: CleanConfig, start: dict[str, Any],
                     scheduler: LambdaLR) -> int:
    """Write the resolved config and start.json (`start`: the starting weights' digest and, on the main process,
    the provenance); load the latest checkpoint of `out` if any; return the steps already done.

    Checkpoints are resumed only by the recipe and the starting weights that made them."""
    starting_weights = start["weights_sha256"]
    config_path, start_path = out / "config.yaml", out / START_NAME
    found = complete_checkpoints(out)
    check_resumable(out, cfg)
    if found and start_path.is_file():
        before = json.loads(start_path.read_text()).get("weights_sha256")
        if before != starting_weights:
            raise ValueError(f"{out}: holds checkpoints of a run from other weights (sha256 {str(before)[:16]}, now "
                             f"{starting_weights[:16]}); use a new --out, or delete it to start over")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, config_path, _provenance_comments(start))
        start_path.write_text(json.dumps(start, indent=2) + "\n")
    if not found:
        if accelerator.is_main_process:
            (out / LOG_NAME).unlink(missing_ok=True)
        return 0
    step, path = found[-1]
    _check_pickles(path)
    if accelerator.is_main_process:
        _upgrade_legacy_checkpoint(path)
    accelerator.wait_for_everyone()
    accelerator.load_state(str(path))
    scheduler.load_state_dict(json.loads((path / SCHEDULER_NAME).read_text()))
    if accelerator.is_main_process:
        logger.info("resumed from %s (step %d)", path, step)
        truncate_after(out / LOG_NAME, step)
    return step


def _check_pickles(checkpoint: Path) -> None:
    """Refuse a checkpoint with a pickle that is not plain tensors and numbers, before Accelerate reads it.

    Accelerate reads the optimizer, RNG and scaler states with weights_only=True (and would silently skip bad
    RNG states); reading each here first turns a refusal into one line that names the file."""
    from accelerate.utils import load

    for path in sorted(checkpoint.iterdir()):
        if path.suffix not in (".bin", ".pkl", ".pt"):
            continue
        try:
            load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling fails in many types; the user needs one line
            reason = str(err).strip().splitlines()[-1][:160] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: refused to resume from it: not a plain tensor state, unpickling it could run "
                             f"code ({reason}); delete {checkpoint} to resume from an earlier checkpoint") from None


def _upgrade_legacy_checkpoint(checkpoint: Path) -> None:
    """A checkpoint from before scheduler.json: its scheduler pickle (checked tensor-free) becomes scheduler.json.

    Accelerate would read any custom_checkpoint_*.pkl with weights_only=False, so none is left in place."""
    legacy = checkpoint / "custom_checkpoint_0.pkl"
    others = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*") if p != legacy)
    if others:
        raise ValueError(f"{checkpoint / others[0]}: not written by parclean; delete it, or delete {checkpoint} to "
                         "resume from an earlier checkpoint")
    target = checkpoint / SCHEDULER_NAME
    if legacy.is_file() and not target.is_file():
        state = torch.load(legacy, map_location="cpu", weights_only=True)  # checked by _check_pickles
        try:
            target.write_text(json.dumps(state) + "\n")
        except TypeError as err:
            raise ValueError(f"{legacy}: not an lr scheduler's state ({err})") from None
    if not target.is_file():
        raise ValueError(f"{checkpoint}: no {SCHEDULER_NAME}; delete it to resume from an earlier checkpoint")
    legacy.unlink(missing_ok=True)


def _check_same_recipe(path: Path, cfg: CleanConfig) -> None:
    import yaml

    before = _flatten(yaml.safe_load(path.read_text()) or {})
    now = _flatten(to_dict(cfg))
    # A caller that does not know the shard set yet (the pipeline, before generating), or a config.yaml written before
    # it recorded the set read: the set is compared when the run itself starts.
    if before.get("data.shards") is None or now.get("data.shards") is None:
        before.pop("data.shards", None)
        now.pop("data.shards", None)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(f"{path.parent}: holds checkpoints of another recipe ({detail}); use a new --out, or delete "
                         f"{path.parent / CHECKPOINTS} to start over")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def _save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int, scheduler: LambdaLR) -> None:
    """accelerate save_state (and scheduler.json) into checkpoints/checkpoint-{step}, under a temporary name first."""
    final = out / CHECKPOINTS / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / SCHEDULER_NAME).write_text(json.dumps(scheduler.state_dict()) + "\n")
        follow_umask(partial)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for _, old in complete_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def run(args: argparse.Namespace) -> int:
    """`parclean clean`: load the recipe, claim --out, clean, print the result as JSON (main process)."""
    cfg = load_config(CleanConfig, args.config, set_overrides(args))
    claim_folder(args.out, "cleaning run", overwrite=args.overwrite)
    result = clean(cfg, args.model, args.shards, args.out, pretrained=args.pretrained,
                   architecture=args.architecture, stop_after=args.stop_after, progress=not args.no_progress)
    if PartialState().is_main_process:
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch -m cleaning.train` entry point: the arguments of `parclean clean`."""
    parser = argparse.ArgumentParser(prog="python -m cleaning.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    console.configure(verbose=False)  # our lines; Accelerate's per-checkpoint lines only with `parclean -v`
    return run_command("cleaning.train", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
