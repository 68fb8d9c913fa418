"""What a cleaning run reports: clean accuracy and ASR per trigger before and after, as JSON and Markdown."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from parclean.attacks import Trigger
from parclean.eval_sets import TOY_WORLD, default_eval_set, describe_registered, eval_set_names, load_eval_set
from parclean.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_TEMPLATES, DEVICES, EvalData, LabelledImages, evaluate
from parclean.image_folder import image_folder
from parclean.imagenet import CLASSNAME_SETS, TEMPLATE_SETS, imagenet_classnames, named_templates
from parclean.models import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Where the labelled images come from, which classes and prompts, which triggers to test, and where to run.

    docs/evaluation.md describes every key, with an ImageFolder (ImageNet) example.
    """

    data: str | None = None  # an ImageFolder path (CLASS/IMAGE files) or a named eval set (parclean/eval_sets.py;
                             # "toyworld": the organism's). None: the toy world, for toy models only
    count: int = 2000  # images to use (toyworld: how many to render; folder: at most this many, a seeded choice)
    classnames: str | tuple[str, ...] | None = None  # None: the set's own (folder names; WordNet ids -> ImageNet
                                                     # names), "imagenet", or one name per class folder
    templates: str | tuple[str, ...] = DEFAULT_TEMPLATES  # format strings with {}, or "openai" / "simple"
    target: str | None = None  # the backdoor's target class, when known (needed for ASR)
    triggers: tuple[Trigger, ...] = ()
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE  # images per forward pass (and per decoded batch)
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda, cuda:N
    num_workers: int = 4  # ImageFolder: DataLoader processes that decode images

    def __post_init__(self) -> None:
        if isinstance(self.classnames, str) and self.classnames not in CLASSNAME_SETS:
            raise ValueError(f"classnames: {self.classnames!r}: use {', '.join(CLASSNAME_SETS)}, or a list of names")
        if isinstance(self.templates, str) and self.templates not in TEMPLATE_SETS:
            raise ValueError(f"templates: {self.templates!r}: use {' or '.join(TEMPLATE_SETS)}, or a list of "
                             "strings with {}")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"device: {self.device!r}: use {', '.join(DEVICES)} or cuda:N")
        if self.count < 1 or self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("count and batch_size must be at least 1, num_workers at least 0")

    def template_strings(self) -> tuple[str, ...]:
        """The templates as format strings (a named set expanded)."""
        return named_templates(self.templates) if isinstance(self.templates, str) else self.templates


def open_eval_data(cfg: EvalConfig, image_size: int, architecture: str | None = None) -> EvalData:
    """The labelled evaluation images at the model's input size, in [0, 1], read in batches.

    architecture: the model's, to choose the default eval set (the toy world, for toy models only); None takes
    the toy world.
    """
    name = cfg.data or (default_eval_set(architecture) if architecture else TOY_WORLD)
    if name in eval_set_names():
        data = load_eval_set(name, cfg.count, image_size)
        return replace(data, classnames=_named_classnames(cfg.classnames)) if cfg.classnames else data
    if not Path(name).is_dir():
        raise FileNotFoundError(f"{name}: evaluation image folder not found (expected CLASS/IMAGE files, or the "
                                f"name of an eval set; {describe_registered()})")
    return image_folder(name, image_size, count=cfg.count, seed=cfg.seed, classnames=cfg.classnames,
                        num_workers=cfg.num_workers)


def load_images(cfg: EvalConfig, image_size: int) -> LabelledImages:
    """The labelled evaluation images held in memory (for the scan; measure() streams them)."""
    data = open_eval_data(cfg, image_size)
    if isinstance(data, LabelledImages):
        return data
    images, labels = zip(*data.batches(cfg.batch_size), strict=True)
    return LabelledImages(torch.cat(images), torch.cat(labels), data.classnames)


def _named_classnames(classnames: str | tuple[str, ...]) -> tuple[str, ...]:
    return imagenet_classnames() if classnames == "imagenet" else classnames


def named_triggers(triggers: tuple[Trigger, ...]) -> dict[str, Trigger]:
    """Name triggers by kind; repeats get a suffix."""
    names: dict[str, Trigger] = {}
    for trigger in triggers:
        name = trigger.kind
        suffix = 2
        while name in names:
            name, suffix = f"{trigger.kind}_{suffix}", suffix + 1
        names[name] = trigger
    return names


def measure(loaded: LoadedModel, cfg: EvalConfig, data: EvalData | None = None) -> dict[str, Any]:
    """{"clean_acc": %, "asr": {trigger: %}} for one model, on cfg.device (the GPU when there is one)."""
    data = data if data is not None else open_eval_data(cfg, loaded.image_size, loaded.architecture)
    raw = evaluate(loaded, data, named_triggers(cfg.triggers), cfg.target, cfg.template_strings(), cfg.seed,
                   batch_size=cfg.batch_size, device=cfg.device)
    return {"clean_acc": raw["clean_acc"],
            "asr": {k.removeprefix("asr_"): v for k, v in raw.items() if k.startswith("asr_")},
            "eval_images": len(data), "chance_acc": 100 / len(data.classnames)}


BACKDOOR_ASR = 10.0  # a named trigger above this ASR means the model is still backdoored (the bar)


def _scan_misses(numbers: dict[str, Any]) -> list[str]:
    """Named triggers that still work although the scan found no backdoor: the scan missed them."""
    if numbers["scan"]["suspicious"]:
        return []
    return [f"the scan missed a backdoor: it found none, but the named trigger {name} reaches {asr:.1f}% ASR"
            for name, asr in numbers.get("asr", {}).items() if asr > BACKDOOR_ASR]


def _scan_follow_up(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """When cleaning changed the flagged class: the score now of the class flagged before, and the score before of
    the class flagged now (a natural easy class was already near the threshold; a moved backdoor was not)."""
    from cleaning.scan import class_score

    target, flagged = before["target"], after["target"]
    if target is None or flagged == target:
        return []
    lines = []
    if (now := class_score(after, target)) is not None:
        lines.append(f"{target!r}, the class flagged before cleaning, now scores {now:.2f} "
                     f"({class_score(before, target):.2f} before)")
    if flagged is not None and (earlier := class_score(before, flagged)) is not None:
        lines.append(f"{flagged!r}, flagged now, scored {earlier:.2f} before cleaning (a class near the threshold "
                     "before cleaning may be a natural easy class rather than a moved backdoor: docs/scan.md)")
    return lines


@dataclass
class Report:
    """Before/after numbers of one cleaning run and the settings that produced them."""

    before: dict[str, Any]
    after: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    data_errors: dict[str, int] | None = None  # None: read from result.json beside the report by write()

    def rows(self) -> list[dict[str, Any]]:
        """One row per measure: clean accuracy, then ASR per trigger; percentages to one decimal."""
        rows = [("clean accuracy (%)", self.before["clean_acc"], self.after["clean_acc"])]
        rows += [(f"ASR {name} (%)", value, self.after["asr"].get(name)) for name, value in self.before["asr"].items()]
        if "scan" in self.before:
            threshold = self.before["scan"]["threshold"]
            rows.append((f"backdoor scan score (flagged above {threshold:g})", self.before["scan"]["score"],
                         self.after.get("scan", {}).get("score")))
        return [{"metric": metric, "before": _round(before), "after": _round(after),
                 "change": _round(after - before) if after is not None else None} for metric, before, after in rows]

    def markdown(self) -> str:
        lines = ["# parclean cleaning report", "", "| metric | before | after | change |", "|---|---|---|---|"]
        for row in self.rows():
            lines.append(f"| {row['metric']} | {row['before']:.1f} | {row['after']:.1f} | {row['change']:+.1f} |")
        lines += self._scan_lines()
        lines += ["", f"Evaluation: {self.after.get('eval_images')} images, chance "
                  f"{self.after.get('chance_acc', 0):.1f}%. ASR counts triggered images whose true class is not "
                  "the target.", "", "## Settings", ""]
        lines += [f"- {key}: `{value}`" for key, value in self.settings.items()]
        if self.data_errors and any(self.data_errors.values()):
            lines += ["", "## Damaged data (data.on_error: skip)", ""]
            lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in self.data_errors.items()]
        if self.timings:
            lines += ["", "## Timings", ""] + [f"- {key}: {value:.1f} s" for key, value in self.timings.items()]
        return "\n".join(lines) + "\n"

    def scan_verdicts(self) -> list[str]:
        """'before: ...' and 'after: ...', the scan's verdicts (the trigger not assumed known), if the run scanned;
        each followed by a warning when the scan found nothing but a named trigger still works; then, when cleaning
        changed the flagged class, how the class flagged before and the one flagged now scored on the other scan."""
        from cleaning.scan import verdict_text

        lines = []
        for label, numbers in (("before", self.before), ("after", self.after)):
            if "scan" in numbers:
                lines.append(f"{label}: {verdict_text(numbers['scan'])}")
                if "scan" in numbers["scan"]:  # read against a reference: the model's own verdict too
                    own = verdict_text(numbers["scan"]["scan"])
                    lines.append(f"{label}, the model's own scan (no reference): {own}")
                lines += [f"{label}: {miss}" for miss in _scan_misses(numbers)]
        if "scan" in self.before and "scan" in self.after:
            lines += [f"after: {line}" for line in _scan_follow_up(self.before["scan"], self.after["scan"])]
        return lines

    def _scan_lines(self) -> list[str]:
        verdicts = self.scan_verdicts()
        if not verdicts:
            return []
        return ["", "## Backdoor scan (trigger not known; docs/scan.md)", ""] + [f"- {line}" for line in verdicts]

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """report.json and report.md in `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.data_errors is None and (out_dir / "result.json").is_file():
            self.data_errors = json.loads((out_dir / "result.json").read_text()).get("data_errors")
        data = {"before": self.before, "after": self.after, "settings": self.settings, "timings": self.timings,
                "data_errors": self.data_errors}
        json_path, md_path = out_dir / "report.json", out_dir / "report.md"
        json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        md_path.write_text(self.markdown())
        return json_path, md_path

    @classmethod
    def read(cls, out_dir: str | Path) -> Report:
        """The report that write() left in `out_dir` (report.json)."""
        data = json.loads((Path(out_dir) / "report.json").read_text())
        return cls(before=data["before"], after=data["after"], settings=data.get("settings", {}),
                   timings=data.get("timings", {}), data_errors=data.get("data_errors"))


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 1)


# Columns of the trainer's log that are not loss terms: they get their own axes, or none.
NOT_LOSS_TERMS = {"step", "lr", "seconds", "time", "d_img", "d_txt"}


def loss_terms(records: list[dict[str, Any]]) -> list[str]:
    """The numeric columns of a training log that are loss terms (not step, lr, wall time or distances)."""
    keys = sorted({key for record in records for key in record} - NOT_LOSS_TERMS)
    return [key for key in keys if all(isinstance(r.get(key), (int, float)) for r in records)]


def plot_training(log_path: str | Path, png_path: str | Path) -> Path:
    """Loss terms and perturbation distances against step, from the trainer's JSONL log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{log_path}: empty training log")
    steps = [r["step"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in loss_terms(records):
        left.plot(steps, [r[key] for r in records], label=key)
    left.set_xlabel("step")
    left.set_title("loss terms")
    left.legend(fontsize=8)
    for key in ("d_img", "d_txt"):
        if key in records[0]:
            right.plot(steps, [r[key] for r in records], label=key)
    right.set_xlabel("step")
    right.set_title("distance to the starting model" if "d_img" in records[0] else "learning rate")
    if "d_img" not in records[0] and "lr" in records[0]:
        right.plot(steps, [r["lr"] for r in records], label="lr")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return Path(png_path)


def before_after_table(report_md: str | Path) -> str:
    """The report's before/after rows as a plain-text table (from report.json beside report.md), with the scan's
    verdicts when the run scanned."""
    report = Report.read(Path(report_md).parent)
    lines = [f"{'metric':<40}{'before':>8}{'after':>8}"]
    lines += [f"{row['metric']:<40}{row['before']:>8.1f}{row['after']:>8.1f}" for row in report.rows()]
    return "\n".join(lines + report.scan_verdicts())
