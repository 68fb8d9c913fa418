"""The data-free cleaning flow: prompt bank -> generated shards -> PAR cleaning -> evaluation -> report.

Generated shard sets are reused across runs: each lives in `shard_cache/NAME-KEY`, KEY a hash of the resolved
GenerateConfig, the bank file's bytes and the generator folder's identity (configs by content, weights by real
path, size and mtime; symlinks followed), so the same (bank, seed, model, settings) always maps to the same
folder, and a complete set that verifies (every shard's sha256 against the manifest) is used as it is, without
loading the generator.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from cleaning.report import Report
from cleaning.train import check_resumable
from flows import PERSISTED_RESULT
from flows.clean import clean_model_flow, publish_report_task
from flows.config import PipelineConfig, TinySDConfig
from flows.generate import generate_shards_flow
from flows.progress import artifact_key
from generation.config import GenerateConfig
from parclean.config import load_config, to_dict, write_resolved
from parclean.outputs import claim_folder, output_lock
from parclean.shards import MANIFEST_NAME, ShardError, iter_samples, verify_shards

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

logger = logging.getLogger(__name__)

THUMBNAIL = 128  # longer side of a sample in the grid artifact, in pixels (32 px samples are enlarged 4x)
GRID_GAP = 4
GRID_COLUMNS = 8
_CHUNK = 1 << 20
# Files of a generator folder identified by stat, not content (diffusers/transformers weight formats).
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".onnx_data", ".msgpack", ".h5", ".gguf"}
CONTENT_HASH_LIMIT = 16 << 20  # bytes; a bigger file of another kind is identified by stat too


def shard_set_key(cfg: GenerateConfig) -> str:
    """16 hex digits naming a shard set: the resolved config, the bank's bytes and the generator's identity."""
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode())
    digest.update(_bank_fingerprint(cfg.bank).encode())
    digest.update(_model_fingerprint(cfg.model).encode())
    return digest.hexdigest()[:16]


def shard_set_folder(cfg: GenerateConfig, cache_root: str | Path) -> Path:
    """Where the shard set of `cfg` lives under `cache_root`."""
    return Path(cache_root) / f"{cfg.name}-{shard_set_key(cfg)}"


def is_complete_set(folder: str | Path) -> bool:
    """True when `folder` holds a manifest and every shard it lists is present with its sha256."""
    if not (Path(folder) / MANIFEST_NAME).is_file():
        return False
    try:
        problems = verify_shards(folder)
    except ShardError as error:
        problems = [str(error)]
    for problem in problems:
        logger.warning("%s: %s", folder, problem)
    return not problems


@task(name="prepare-generator", task_run_name="prepare-generator", cache_policy=NO_CACHE)
def prepare_generator_task(generate: GenerateConfig, tiny_sd: TinySDConfig | None) -> str:
    """The generator's description for the report; builds the random tiny SD first when the config asks."""
    model = Path(generate.model)
    if tiny_sd is None:
        return generate.model
    if not (model / "model_index.json").is_file():
        from generation.tiny_pipeline import build_tiny_pipeline

        logger.warning("tiny_sd is set: building a RANDOM, untrained tiny Stable Diffusion at %s", model)
        build_tiny_pipeline(model, seed=tiny_sd.seed, sample_size=tiny_sd.size)
    return f"{model} (random tiny SD, untrained: tiny_sd in the config)"


@task(name="locate-shards", task_run_name="locate-shards", cache_policy=NO_CACHE)
def locate_shards_task(generate: GenerateConfig, cache_root: str) -> dict[str, Any]:
    """The shard set's folder for this config, and whether a complete, verified set is already there."""
    folder = shard_set_folder(generate, cache_root)
    return {"folder": str(folder), "complete": is_complete_set(folder)}


@task(name="sample-grid", task_run_name="sample-grid", cache_policy=NO_CACHE)
def sample_grid_task(shards: str, count: int, artifact_prefix: str = "pipeline") -> str:
    """A Markdown artifact with the first `count` generated samples as one numbered PNG grid and their captions."""
    samples = []
    for key, image, caption, _ in iter_samples(shards):
        samples.append((key, image, caption))
        if len(samples) == count:
            break
    png = _grid_png([image for _, image, _ in samples])
    lines = [f"# Generated samples ({len(samples)} of {shards})", "",
             f"![samples](data:image/png;base64,{base64.b64encode(png).decode('ascii')})", "",
             "| # | key | caption |", "|---|---|---|"]
    lines += [f"| {i} | {key} | {caption} |" for i, (key, _, caption) in enumerate(samples)]
    markdown = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown, key=artifact_key(artifact_prefix, "generated-samples"),
                             description=f"samples of {shards}")
    return markdown


@flow(name="data-free-clean", **PERSISTED_RESULT)
def data_free_clean_flow(pipeline_config: str | Path | PipelineConfig | dict[str, Any],
                         overrides: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Generate (or reuse) the shard set, clean the model on it, evaluate and report; returns report.md's path.
    overwrite: write into `out` and the shard folder even if they hold another kind of output."""
    cfg = load_config(PipelineConfig, pipeline_config, overrides)
    # Re-entrant: `parclean run` and `demo` hold these locks already; a served or deployed run takes them here.
    with pipeline_outputs_locked(cfg, f"data-free-clean flow run {flow_run.get_id()}", overwrite):
        return _data_free_clean(cfg, pipeline_name(pipeline_config))


def _data_free_clean(cfg: PipelineConfig, prefix: str) -> str:
    generator = prepare_generator_task(cfg.generate, cfg.tiny_sd)
    shards = locate_shards_task(cfg.generate, cfg.shard_cache)
    if shards["complete"]:
        logger.info("reusing the complete shard set %s", shards["folder"])
        summary = {"shards_written": 0, "seconds": 0.0}
    else:
        runner = cfg.runner
        summary = generate_shards_flow(cfg.generate, shards["folder"], runner=runner.kind,
                                       dask_address=runner.dask_address, n_workers=runner.n_workers,
                                       devices=runner.devices,
                                       retries=runner.retries, retry_delay_seconds=runner.retry_delay_seconds,
                                       gpu_limit=runner.gpu_limit,
                                       artifact_prefix=prefix)
    if cfg.sample_grid:
        sample_grid_task(shards["folder"], cfg.sample_grid, prefix)
    out = run_folder(cfg)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"generator": generator, "bank": cfg.generate.bank, "generation seed": cfg.generate.seed,
             "shard set reused": shards["complete"], "shards generated": summary["shards_written"]}
    clean_model_flow(cfg.model, shards["folder"], cfg.clean, cfg.eval, str(out),
                     launcher=cfg.launch.launcher, num_processes=cfg.launch.num_processes,
                     accelerate_args=list(cfg.launch.accelerate_args), extra_settings=extra,
                     extra_timings={"generate": summary["seconds"]}, artifact_prefix=prefix, publish=False,
                     scan_config=cfg.scan, architecture=cfg.architecture, pretrained=cfg.pretrained)
    write_resolved(cfg, out / "pipeline.yaml")  # once the run got past every check
    # Published here, so the run the terminal links to shows the result.
    report = publish_report_task(str(out), prefix)
    logger.info("%s; report: %s", result_line(out), report)
    return report


def result_line(out: Path) -> str:
    """'clean accuracy 72.5% -> 70.1%, ASR badnet 100.0% -> 2.0%', from out/report.json."""
    report = Report.read(out)
    before, after = report.before, report.after
    parts = [f"clean accuracy {before['clean_acc']:.1f}% -> {after['clean_acc']:.1f}%"]
    parts += [f"ASR {name} {value:.1f}% -> {after['asr'].get(name, float('nan')):.1f}%"
              for name, value in before["asr"].items()]
    if "scan" in before and "scan" in after:
        parts.append(f"scan {_flag(before['scan'])} -> {_flag(after['scan'])}")
    return ", ".join(parts)


def _flag(result: dict[str, Any]) -> str:
    return f"backdoor ({result['target']}, {result['score']:.1f})" if result["suspicious"] else \
        f"none found ({result['score']:.1f})"


def pipeline_name(pipeline_config: str | Path | dict | PipelineConfig) -> str:
    """What names this pipeline's artifacts: the deployment's name when run from one, else the config file's."""
    from prefect.runtime import deployment

    if deployment.name:
        return artifact_key(deployment.name)
    if isinstance(pipeline_config, (str, Path)):
        return artifact_key(Path(pipeline_config).stem)
    return "pipeline"


@contextmanager
def pipeline_outputs_locked(cfg: PipelineConfig, command: str, overwrite: bool = False) -> Iterator[None]:
    """Hold the locks of the run's `out` and of its shard set's cache folder for the block, after checking that
    neither holds another kind of output, and that `out` holds no checkpoints of another cleaning recipe.

    Not held: `out` with out_per_run (each run gets a new folder), and the shard folder while generate.model is a
    tiny SD still to be built (its key depends on the weights built)."""
    with ExitStack() as stack:
        if not cfg.out_per_run:
            stack.enter_context(output_lock(cfg.out, command))
            claim_folder(cfg.out, "pipeline run", overwrite=overwrite)
            check_resumable(cfg.out, cfg.clean)
        if cfg.tiny_sd is None or Path(cfg.generate.model).is_dir():
            shards = stack.enter_context(output_lock(shard_set_folder(cfg.generate, cfg.shard_cache), command))
            claim_folder(shards, "shard set", overwrite=overwrite)
        yield


def run_folder(cfg: PipelineConfig) -> Path:
    """cfg.out, or a new out/<UTC time> per run when out_per_run is set."""
    if not cfg.out_per_run:
        return Path(cfg.out)
    return Path(cfg.out) / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _bank_fingerprint(bank: str) -> str:
    from prompts.bank import load_bank

    return _file_sha256(load_bank(bank).source)


def _model_fingerprint(model: str) -> str:
    """A local folder: its files' identity (below), symlinks followed. A hub id: the id (pin a local copy to be
    exact)."""
    root = Path(model).expanduser()
    if not root.is_dir():
        return f"hub:{model}"
    digest = hashlib.sha256()
    for relative, path in _files_following_links(root):
        digest.update(relative.encode() + b"\0" + _file_identity(path).encode() + b"\n")
    return digest.hexdigest()


def _files_following_links(root: Path) -> list[tuple[str, Path]]:
    """(path relative to root, path) of every file under root, into symlinked folders too, each real folder once."""
    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []  # a symlink loop, or a second link to a folder already walked
            continue
        seen.add(real)
        files += [(Path(folder, name).relative_to(root).as_posix(), Path(folder, name)) for name in names]
    return sorted((relative, path) for relative, path in files if path.is_file())


def _file_identity(path: Path) -> str:
    """Configs and tokenizer files by content; weights (and anything big) by real path, size and mtime.

    Hashing the weights would read tens of GB on every run. Their real path catches a swap behind a symlink
    (and names the blob, itself a content hash, in a Hugging Face cache snapshot); size and mtime an in-place
    rewrite."""
    stat = path.stat()
    if path.suffix.lower() in WEIGHT_SUFFIXES or stat.st_size > CONTENT_HASH_LIMIT:
        return f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    return _file_sha256(path)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _grid_png(images: list) -> bytes:
    """The images in rows of GRID_COLUMNS, each scaled to THUMBNAIL pixels on its longer side (small images
    enlarged pixel for pixel), numbered as in the caption table; PNG bytes."""
    from PIL import Image, ImageDraw

    cells = [_cell(image) for image in images]
    columns = max(1, min(GRID_COLUMNS, len(cells)))
    rows = max(1, -(-len(cells) // columns))
    grid = Image.new("RGB", (columns * (THUMBNAIL + GRID_GAP), rows * (THUMBNAIL + GRID_GAP)), "white")
    draw = ImageDraw.Draw(grid)
    for i, cell in enumerate(cells):
        x, y = (i % columns) * (THUMBNAIL + GRID_GAP), (i // columns) * (THUMBNAIL + GRID_GAP)
        grid.paste(cell, (x, y))
        label = str(i)
        draw.rectangle((x, y, x + 7 * len(label) + 4, y + 13), fill="black")
        draw.text((x + 2, y + 1), label, fill="white")
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


def _cell(image: PILImage) -> PILImage:
    from PIL import Image

    image = image.convert("RGB")
    scale = THUMBNAIL / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
