"""The cleaning flow: evaluate the model -> clean it on a shard set -> evaluate the result -> publish the report.

The stage (cleaning/train.py, cleaning/report.py) does the work; the tasks here pass paths and small dicts.
The cleaning step runs in the flow's process, or, for several GPUs, as one task that runs
`accelerate launch --num_processes N -m cleaning.train ...` (one task for the whole launch, not one per rank).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cleaning.report import EvalConfig, Report, load_images, measure, plot_training
from cleaning.scan import ScanConfig, against_reference, scan, verdict_text
from cleaning.train import LOG_NAME, CleanConfig, clean
from flows import PERSISTED_RESULT
from flows.config import LAUNCHERS
from flows.progress import TrainingWatcher, artifact_key
from parclean.config import ConfigError, load_config, to_dict

logger = logging.getLogger(__name__)

MODEL_NAME = "model.safetensors"
PLOT_NAME = "training.png"
LAUNCH_CONFIG_NAME = "launch_config.yaml"
# A plot up to this size goes into the Markdown artifact as a data URI; a larger one is linked by its path.
EMBED_LIMIT_BYTES = 300_000


@task(name="evaluate", task_run_name="evaluate-{label}", cache_policy=NO_CACHE)
def evaluate_task(model: str, eval_cfg: EvalConfig, label: str, architecture: str | None = None,
                  pretrained: str | None = None) -> dict[str, Any]:
    """Clean accuracy and ASR per trigger of `model` (percent), and the seconds it took."""
    from parclean.models import load_source

    start = time.perf_counter()
    result = measure(load_source(model, architecture=architecture, pretrained=pretrained), eval_cfg)
    result["seconds"] = round(time.perf_counter() - start, 3)
    logger.info("%s: clean accuracy %.1f%%, %s", label, result["clean_acc"], asr_text(result["asr"]))
    return result


@task(name="scan", task_run_name="scan-{label}", cache_policy=NO_CACHE)
def scan_task(model: str, eval_cfg: EvalConfig, scan_cfg: ScanConfig, label: str, architecture: str | None = None,
              pretrained: str | None = None, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trigger-agnostic backdoor scan of `model` on the eval config's clean images; read against `reference`
    (the trusted model's scan, same images and seed; scan_cfg.reference is loaded to try the model's triggers in)
    when given, the model's own verdict then under "scan"."""
    from parclean.models import load_source

    loaded = load_source(model, architecture=architecture, pretrained=pretrained)
    trusted = None if reference is None else load_source(scan_cfg.reference, pretrained=scan_cfg.reference_pretrained)
    start = time.perf_counter()
    result = scan(loaded, load_images(eval_cfg, loaded.image_size), scan_cfg, eval_cfg.template_strings(), trusted)
    if reference is not None:
        result = against_reference(result, reference, scan_cfg.reference)
    result["seconds"] = round(time.perf_counter() - start, 3)
    trusted = " (the trusted model the verdicts are read against; its own scan)" if label == "reference" else ""
    logger.info("scan %s%s: %s", label, trusted, verdict_text(result))
    return result


@task(name="clean", task_run_name="clean", cache_policy=NO_CACHE)
def clean_task(model: str, shards: str, cfg: CleanConfig, out_dir: str, launcher: str = "in-process",
               num_processes: int = 1, accelerate_args: list[str] | None = None,
               artifact_prefix: str = "clean", architecture: str | None = None,
               pretrained: str | None = None) -> dict[str, Any]:
    """Run the cleaning stage, its progress in an artifact and the log; a rerun of out_dir resumes."""
    watcher = TrainingWatcher(Path(out_dir) / LOG_NAME, cfg.steps, cfg.batch_size,
                              key=artifact_key(artifact_prefix, "cleaning-progress"))
    model_args = [*(["--architecture", architecture] if architecture else []),
                  *(["--pretrained", pretrained] if pretrained else [])]
    with watcher:
        if launcher == "in-process":
            return clean(cfg, model, shards, out_dir, architecture=architecture, pretrained=pretrained,
                         progress=False)
        return launch_accelerate(cfg, model, shards, out_dir, num_processes, accelerate_args or [], model_args)


def asr_text(asr: dict[str, float]) -> str:
    """'ASR badnet 98.2%, blended 3.1%' (or 'no triggers named')."""
    if not asr:
        return "no triggers named"
    return "ASR " + ", ".join(f"{name} {value:.1f}%" for name, value in asr.items())


def launch_accelerate(cfg: CleanConfig, model: str, shards: str, out_dir: str, num_processes: int,
                      accelerate_args: list[str], model_args: list[str] | None = None) -> dict[str, Any]:
    """`accelerate launch --num_processes N -m cleaning.train ...` as a child process; its result.json.

    model_args: `--architecture`/`--pretrained` for `model`, as `parclean clean` takes them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / LAUNCH_CONFIG_NAME
    config_path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               *accelerate_args, "-m", "cleaning.train", "--config", str(config_path), "--model", model,
               *(model_args or []), "--shards", shards, "--out", str(out), "--no-progress"]
    logger.info("launching: %s", " ".join(command))
    completed = subprocess.run(command, env=dict(os.environ), check=False)
    if completed.returncode != 0:
        raise ChildProcessError(f"accelerate launch exited with {completed.returncode}; its output is in the flow "
                                f"log above. A rerun resumes from the latest checkpoint in {out}")
    return json.loads((out / "result.json").read_text())


@task(name="write-report", task_run_name="write-report", cache_policy=NO_CACHE)
def write_report_task(before: dict, after: dict, settings: dict, timings: dict, out_dir: str) -> str:
    """report.json, report.md and the training plot in out_dir; returns report.md's path."""
    out = Path(out_dir)
    report = Report(before=before, after=after, settings=settings, timings=timings)
    _, markdown_path = report.write(out)
    log_path = out / LOG_NAME
    if log_path.is_file() and log_path.stat().st_size:
        plot_training(log_path, out / PLOT_NAME)
    return str(markdown_path)


@task(name="publish-report", task_run_name="publish-report", cache_policy=NO_CACHE)
def publish_report_task(out_dir: str, artifact_prefix: str) -> str:
    """The report of out_dir (table, ASR per trigger, training plot) as Markdown and table artifacts of this
    run, keyed `<artifact_prefix>-cleaning-report[-table]`; returns report.md's path."""
    out = Path(out_dir)
    report = Report.read(out)
    markdown = report.markdown()
    if (out / PLOT_NAME).is_file():
        markdown += "\n## Training\n\n" + _image_markdown(out / PLOT_NAME, "loss terms")
    markdown += f"\nFiles: `{out / 'report.md'}`, `{out / MODEL_NAME}`\n"
    create_markdown_artifact(markdown, key=artifact_key(artifact_prefix, "cleaning-report"),
                             description=f"cleaning report: {out}")
    create_table_artifact(report.rows(), key=artifact_key(artifact_prefix, "cleaning-report-table"),
                          description="before / after")
    return str(out / "report.md")


@flow(name="clean-model", **PERSISTED_RESULT)
def clean_model_flow(
    model: str,
    shards: str,
    clean_config: str | Path | CleanConfig | dict[str, Any],
    eval_config: str | Path | EvalConfig | dict[str, Any],
    out_dir: str,
    launcher: str = "in-process",
    num_processes: int = 1,
    accelerate_args: list[str] | None = None,
    extra_settings: dict | None = None,
    extra_timings: dict | None = None,
    artifact_prefix: str | None = None,
    publish: bool = True,
    scan_config: str | Path | ScanConfig | dict[str, Any] | None = None,
    architecture: str | None = None,
    pretrained: str | None = None,
) -> str:
    """Evaluate `model`, clean it on `shards`, evaluate the result, publish the report; returns report.md's path.

    launcher: "in-process", or "accelerate" (`accelerate launch --num_processes num_processes`, for GPUs).
    extra_settings, extra_timings: more lines for the report (the pipeline adds the generator's).
    artifact_prefix: starts every artifact key (default: out_dir's name); publish: False leaves the report's
    artifacts to the calling flow (the pipeline publishes them on its own run).
    architecture, pretrained: for `model`, as `parclean clean --architecture/--pretrained` take them.
    """
    clean_cfg = load_config(CleanConfig, clean_config)
    eval_cfg = load_config(EvalConfig, eval_config)
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher={launcher!r}: use one of {', '.join(LAUNCHERS)}")
    model, shards, out = str(model), str(shards), str(out_dir)
    prefix = artifact_prefix or Path(out).resolve().name
    scan_cfg = None if scan_config is None else load_config(ScanConfig, scan_config)
    timings = dict(extra_timings or {})
    source = {"architecture": architecture, "pretrained": pretrained}
    reference = _reference_scan(eval_cfg, scan_cfg, timings)
    before = _measure(model, eval_cfg, scan_cfg, "before", timings, reference=reference, **source)
    start = time.perf_counter()
    result = clean_task(model, shards, clean_cfg, out, launcher, num_processes, accelerate_args, prefix, **source)
    timings["clean"] = round(time.perf_counter() - start, 3)
    after = _measure(str(Path(out) / MODEL_NAME), eval_cfg, scan_cfg, "after", timings, reference=reference)
    settings = report_settings(model if pretrained is None else f"{model} (pretrained {pretrained})", shards,
                               clean_cfg, eval_cfg, result, extra_settings)
    report_md = write_report_task(before, after, settings, timings, out)
    return publish_report_task(out, prefix) if publish else report_md


def _reference_scan(eval_cfg: EvalConfig, scan_cfg: ScanConfig | None, timings: dict[str, float]) -> dict | None:
    """The trusted reference model's scan, once for both verdicts, when the scan config names one."""
    if scan_cfg is None or scan_cfg.reference is None:
        return None
    reference = scan_task(scan_cfg.reference, eval_cfg, scan_cfg, label="reference",
                          pretrained=scan_cfg.reference_pretrained)
    timings["scan reference"] = reference.pop("seconds")
    return reference


def _measure(model: str, eval_cfg: EvalConfig, scan_cfg: ScanConfig | None, label: str, timings: dict[str, float],
             architecture: str | None = None, pretrained: str | None = None,
             reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Clean accuracy and ASR of `model`, and the scan's verdict when scan_cfg is set (read against the reference's
    scan when given); their seconds go to timings."""
    numbers = evaluate_task(model, eval_cfg, label=label, architecture=architecture, pretrained=pretrained)
    timings[f"evaluate {label}"] = numbers.pop("seconds")
    if scan_cfg is not None:
        numbers["scan"] = scan_task(model, eval_cfg, scan_cfg, label=label, architecture=architecture,
                                    pretrained=pretrained, reference=reference)
        timings[f"scan {label}"] = numbers["scan"].pop("seconds")
    return numbers


def report_settings(model: str, shards: str, clean_cfg: CleanConfig, eval_cfg: EvalConfig, result: dict,
                    extra: dict | None) -> dict[str, Any]:
    """What a reader needs to reproduce the numbers: model, data size, recipe, evaluation, poison when known."""
    from parclean.shards import read_manifest

    settings: dict[str, Any] = {"model": model, **_poison_of(model), "shards": shards,
                                "data size (pairs)": read_manifest(shards).get("total_samples")}
    recipe = ("objective", "tau", "steps", "batch_size", "lr", "schedule", "augment", "seed")
    settings.update({name: getattr(clean_cfg, name) for name in recipe})
    settings.update({"processes": result.get("processes"), "samples/s": result.get("samples_per_s"),
                     "eval data": eval_cfg.data, "eval images": eval_cfg.count, "target": eval_cfg.target,
                     "triggers": ", ".join(t.kind for t in eval_cfg.triggers) or "none"})
    settings.update(extra or {})
    return settings


def _poison_of(model: str) -> dict[str, Any]:
    """The poisoning recorded in a config.yaml beside the checkpoint (the toy organisms have one), else {}."""
    path = Path(model)
    if not path.exists():  # an architecture name with a pretrained tag
        return {}
    config_path = (path if path.is_dir() else path.parent) / "config.yaml"
    try:
        poison = (yaml.safe_load(config_path.read_text()) or {}).get("poison") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    if not isinstance(poison, dict) or not poison.get("trigger"):
        return {}
    return {"poison rate": poison.get("rate"), "poison target": poison.get("target")}


def _image_markdown(png: Path, alt: str) -> str:
    """The PNG inline as a data URI when small, else a link to the file."""
    data = png.read_bytes()
    if len(data) <= EMBED_LIMIT_BYTES:
        return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})\n"
    return f"[{alt}]({png.resolve().as_uri()}) ({len(data) // 1000} kB, too large to embed)\n"
