"""The efficacy table: PAR against FT and CleanCLIP on every shipped poisoned organism, real and generated pairs.

    python -m bench.results --config configs/results/toy-3k.yaml            # run what is missing, write the doc
    python -m bench.results --config configs/results/toy-3k.yaml --only organism=clip-badnet --only seed=0
    python -m bench.results --config configs/results/toy-3k.yaml --report    # only rewrite docs/results.md
    python -m bench.results --jobs 12      # 12 cells at a time (one process each; on a GPU they share it)

Each cell (organism, data, method, seed, sweep point) cleans the organism with the method's recipe plus the
shared budget overrides, measures clean accuracy and ASR on the organism's own trigger, and appends one JSON
row to the rows file (docs/results.jsonl). A rerun skips cells already measured and resumes a killed cell from its last
checkpoint, so the table can be built over several sittings and on several machines (split with --only). Each row
records the organism's weights fingerprint and the cell's recipe fingerprint: rows of weights since replaced, or
of a recipe, budget or shard set since changed, are neither reused nor reported (the cell is measured again).
A cell that fails does not stop the others: the run ends with one error listing the failed cells.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parclean.command import add_config_options, run_command, set_overrides
from parclean.config import load_config, parse_override

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str  # as shown in the table: PAR, FT, CleanCLIP
    config: str  # clean recipe (configs/clean/)
    overrides: dict[str, Any] = field(default_factory=dict)  # this method's settings on top of recipe and budget


@dataclass(frozen=True)
class DataSet:
    name: str  # as shown in the table, e.g. "real" or "toy-sd"
    shards: str
    command: str = ""  # how the shard set was made (printed in the doc)
    bar: tuple[float, float] = (10.0, 3.0)  # (max ASR, max clean-accuracy drop from the poisoned model)


@dataclass(frozen=True)
class Sweep:
    """The trade-off: one organism and data set, each method at every combination of the listed values (tau only
    for the methods whose objective has one)."""

    organism: str = "clip-badnet"
    data: str = "real"
    methods: tuple[str, ...] = ("PAR",)
    tau: tuple[float, ...] = ()
    steps: tuple[int, ...] = ()
    lr: tuple[float, ...] = ()
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class BudgetCheck:
    """Whether the cleaning budget retrains the model: if `method` on `data` ends more than `max_lift` points
    above the poisoned model's clean accuracy, that organism's rows do not count."""

    method: str = "FT"
    data: str = "real"
    max_lift: float = 2.0


@dataclass(frozen=True)
class ResultsConfig:
    organisms: tuple[str, ...]
    data: tuple[DataSet, ...]
    methods: tuple[Method, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    budget: dict[str, Any] = field(default_factory=dict)  # overrides shared by every method (steps, batch_size)
    models_dir: str = "toyworld/models"
    eval_count: int = 2000
    work: str = "out/results"  # cleaning runs (checkpoints, weights): large, not in git
    rows: str = "docs/results.jsonl"  # one measured row per cell: small, kept in git beside the document
    doc: str = "docs/results.md"
    title: str = "Results: cleaning the toy organisms"
    sweep: Sweep | None = None
    budget_check: BudgetCheck | None = None


@dataclass(frozen=True)
class Cell:
    organism: str
    data: str
    method: str
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()  # sweep settings on top of the budget

    @property
    def key(self) -> str:
        extra = "".join(f"-{k}{v}" for k, v in self.overrides)
        return f"{self.organism}/{self.data}/{self.method}/seed{self.seed}{extra}"


def cells(cfg: ResultsConfig) -> list[Cell]:
    """The table's cells, then the sweep's, without repeats (a sweep point equal to the recipe is a table cell)."""
    table = [Cell(o, d.name, m.name, s) for o in cfg.organisms for d in cfg.data for m in cfg.methods
             for s in cfg.seeds]
    sweep = []
    if cfg.sweep is not None:
        sw = cfg.sweep
        for method in sw.methods:
            base = recipe(cfg, method, {})
            for tau in (sw.tau if perturbs(base) else ()) or (base.tau,):
                for steps in sw.steps or (base.steps,):
                    for lr in sw.lr or (base.lr,):
                        point = (("tau", tau), ("steps", steps), ("lr", lr))
                        extra = tuple((k, v) for k, v in point if v != getattr(base, k))
                        sweep += [Cell(sw.organism, sw.data, method, s, extra) for s in sw.seeds]
    return list(dict.fromkeys(table + sweep))


def selected_cells(cfg: ResultsConfig, only: dict[str, Any]) -> list[Cell]:
    """The cells whose organism, data, method, seed, tau, steps and lr match every `only` field (tau matches the
    methods without one too)."""
    return [c for c in cells(cfg) if _selected(_cell_values(cfg, c), only)]


def _cell_values(cfg: ResultsConfig, cell: Cell) -> dict[str, str | None]:
    settings = recipe(cfg, cell.method, dict(cell.overrides))
    return {"organism": cell.organism, "data": cell.data, "method": cell.method, "seed": str(cell.seed),
            "tau": str(settings.tau) if perturbs(settings) else None, "steps": str(settings.steps),
            "lr": str(settings.lr)}


def perturbs(settings) -> bool:
    """Whether a recipe's objective has PAR's perturbation term (and so a tau)."""
    from cleaning.objectives import PERTURBING

    return settings.objective in PERTURBING


def recipe(cfg: ResultsConfig, method: str, overrides: dict[str, Any]):
    """The method's clean config with the shared budget and `overrides` applied."""
    from cleaning.train import CleanConfig

    methods = {m.name: m for m in cfg.methods}
    if method not in methods:
        raise ValueError(f"method {method!r} is not among the configured methods ({', '.join(methods)})")
    return load_config(CleanConfig, methods[method].config, {**cfg.budget, **methods[method].overrides, **overrides})


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON row (delete the line to re-measure it)") from None
            rows[row["key"]] = row
    return rows


def fingerprint(cfg: ResultsConfig, organism: str) -> str:
    """First 16 hex digits of the sha256 of the organism's weights."""
    path = Path(cfg.models_dir) / organism / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no organism weights (is {organism!r} a shipped organism?)")
    return weights_fingerprint(path)


def weights_fingerprint(file: Path) -> str:
    """First 16 hex digits of the sha256 of a weights file: what marks a row as measured on these weights."""
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16]


# Settings added to the recipe after rows were recorded, at the value that changes nothing: left out of the
# fingerprint at that value, so that adding a setting does not retire every row measured before it existed.
NEUTRAL_ADDITIONS = {"align_reference": False}


def recipe_fingerprint(cfg: ResultsConfig, cell: Cell) -> str:
    """First 16 hex digits of the sha256 of what shapes a cell's weights: its resolved recipe (without the settings
    that only pace a run, such as checkpoint_every) and its shard set."""
    from cleaning.train import RESUMABLE_CHANGES
    from parclean.config import to_dict

    settings = to_dict(cell_recipe(cfg, cell))
    pacing = {key for key in RESUMABLE_CHANGES if key != "steps"}
    settings = {k: v for k, v in settings.items() if k not in pacing and NEUTRAL_ADDITIONS.get(k, ...) != v}
    settings["data"] = {k: v for k, v in settings["data"].items() if f"data.{k}" not in pacing}
    shards = {d.name: d.shards for d in cfg.data}[cell.data]
    text = json.dumps({"recipe": settings, "shards": shards}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_recipe(cfg: ResultsConfig, cell: Cell):
    return recipe(cfg, cell.method, {"seed": cell.seed, **dict(cell.overrides)})


def current_rows(cfg: ResultsConfig) -> dict[str, dict[str, Any]]:
    """The rows measured on the organisms' present weights, with the cells' present recipes."""
    prints = {organism: fingerprint(cfg, organism) for organism in cfg.organisms}
    recipes = {cell.key: recipe_fingerprint(cfg, cell) for cell in cells(cfg)}
    return {key: row for key, row in read_rows(Path(cfg.rows)).items()
            if row.get("organism_sha") == prints.get(row.get("organism"))
            and (row.get("method") == "poisoned" or row.get("recipe_sha") == recipes.get(key))}


def organism_eval(cfg: ResultsConfig, organism: str):
    """The organism's own evaluation: its card's trigger and target, cfg.eval_count fresh toy images."""
    from cleaning.report import EvalConfig
    from parclean.attacks import Trigger

    card_path = Path(cfg.models_dir) / organism / "card.json"
    if not card_path.exists():
        raise FileNotFoundError(f"{card_path}: no organism card (is {organism!r} a shipped organism?)")
    card = json.loads(card_path.read_text())
    trigger = Trigger(**card["trigger"])
    return EvalConfig(count=cfg.eval_count, target=card["target"], triggers=(trigger,)), trigger.kind


def measure_model(cfg: ResultsConfig, organism: str, weights: Path) -> dict[str, float]:
    from cleaning.report import measure
    from parclean.models import load_model

    eval_cfg, kind = organism_eval(cfg, organism)
    result = measure(load_model(weights=weights), eval_cfg)
    return {"clean_acc": round(result["clean_acc"], 2), "asr": round(result["asr"][kind], 2)}


def run_cell(cfg: ResultsConfig, cell: Cell, work: Path) -> dict[str, Any]:
    from cleaning.train import clean

    data = {d.name: d for d in cfg.data}[cell.data]
    settings = cell_recipe(cfg, cell)
    sha, recipe_sha = fingerprint(cfg, cell.organism), recipe_fingerprint(cfg, cell)
    out = work / "runs" / cell.key / f"{sha}-{recipe_sha}"  # never resumes a run of other weights or recipe
    began = time.perf_counter()
    result = clean(settings, Path(cfg.models_dir) / cell.organism, data.shards, out, progress=False)
    seconds = time.perf_counter() - began
    last = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    row = {"key": cell.key, "organism": cell.organism, "organism_sha": sha, "recipe_sha": recipe_sha,
           "data": cell.data, "method": cell.method, "seed": cell.seed,
           "tau": settings.tau if perturbs(settings) else None, "steps": settings.steps,
           "batch_size": settings.batch_size, "lr": settings.lr,
           **measure_model(cfg, cell.organism, Path(result["model"])), "seconds": round(seconds, 1),
           "d_img": last.get("d_img"), "d_txt": last.get("d_txt"), "device": device_name()}
    return row


def device_name() -> str:
    """Where a cell was cleaned (the trainer takes the GPU when there is one)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def run(cfg: ResultsConfig, only: dict[str, str], jobs: int = 1) -> None:
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    rows_path = Path(cfg.rows)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    done = current_rows(cfg)
    for organism in cfg.organisms:
        key = f"{organism}/poisoned"
        if key not in done and _selected({"organism": organism}, only):
            row = {"key": key, "organism": organism, "organism_sha": fingerprint(cfg, organism), "method": "poisoned",
                   "trigger": organism_eval(cfg, organism)[1],
                   **measure_model(cfg, organism, Path(cfg.models_dir) / organism)}
            _append(rows_path, row)
            done[key] = row
    todo = [c for c in selected_cells(cfg, only) if c.key not in done]
    failed = []
    for cell, outcome in _outcomes(cfg, todo, work, jobs):
        if isinstance(outcome, Exception):  # the other cells go on; their rows are kept
            failed.append(f"{cell.key}: {outcome}")
            logger.error("%s", failed[-1])
        else:
            _record(rows_path, outcome)
    if failed:
        raise ValueError(f"{len(failed)} of {len(todo)} cells failed ({'; '.join(failed)}); the others are recorded")


def _outcomes(cfg: ResultsConfig, todo: list[Cell], work: Path, jobs: int) -> Iterator[tuple[Cell, Any]]:
    """Each cell with its row, or the error that stopped it, as the cells finish."""
    if jobs == 1:
        for number, cell in enumerate(todo, 1):
            logger.info("[%d/%d] %s", number, len(todo), cell.key)
            try:
                yield cell, run_cell(cfg, cell, work)
            except Exception as err:
                yield cell, err
        return
    # spawn, not fork: CUDA cannot be used in a forked child
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        logger.info("%d cells, %d at a time", len(todo), jobs)
        futures = {pool.submit(run_cell, cfg, cell, work): cell for cell in todo}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except Exception as err:
                yield futures[future], err


def _record(rows_path: Path, row: dict[str, Any]) -> None:
    _append(rows_path, row)
    logger.info("%s: clean %.1f, ASR %.1f (%.0f s)", row["key"], row["clean_acc"], row["asr"], row["seconds"])


def _selected(values: dict[str, str], only: dict[str, str]) -> bool:
    return all(values.get(k) is None or _same(values[k], v) for k, v in only.items())


def _same(value: str, wanted: Any) -> bool:
    """Equal as numbers when both are ("1e-3" and 0.001, "2.0" and 2), else as text."""
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return value == str(wanted)


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------- the document


def seed_rows(cfg: ResultsConfig, rows: dict[str, dict[str, Any]], organism: str, data: str,
              method: str) -> list[dict[str, Any]]:
    """The measured rows of one table cell, one per seed that has one."""
    return [row for s in cfg.seeds if (row := rows.get(Cell(organism, data, method, s).key)) is not None]


def budget_lift(cfg: ResultsConfig, rows: dict[str, dict[str, Any]], organism: str) -> float | None:
    """The budget check's method's mean clean accuracy minus the poisoned model's; None until both are measured."""
    check, poisoned = cfg.budget_check, rows.get(f"{organism}/poisoned")
    found = seed_rows(cfg, rows, organism, check.data, check.method) if check else []
    if not found or poisoned is None:
        return None
    return statistics.mean(r["clean_acc"] for r in found) - poisoned["clean_acc"]


def summary(cfg: ResultsConfig, rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds for each table cell that has rows, with the bar it is judged against (and
    nothing meets it on an organism whose budget check says the budget retrains the model)."""
    out = []
    for organism in cfg.organisms:
        poisoned = rows.get(f"{organism}/poisoned")
        lift = budget_lift(cfg, rows, organism)
        retrains = lift is not None and lift > cfg.budget_check.max_lift
        for data in cfg.data:
            bar = data.bar
            for method in cfg.methods:
                found = seed_rows(cfg, rows, organism, data.name, method.name)
                if not found or poisoned is None:
                    continue
                acc = [r["clean_acc"] for r in found]
                asr = [r["asr"] for r in found]
                meets = (statistics.mean(asr) <= bar[0] and statistics.mean(acc) >= poisoned["clean_acc"] - bar[1]
                         and not retrains)
                out.append({"organism": organism, "data": data.name, "method": method.name, "seeds": len(found),
                            "trigger": poisoned.get("trigger", ""), "poisoned_acc": poisoned["clean_acc"],
                            "poisoned_asr": poisoned["asr"],
                            "acc": statistics.mean(acc), "acc_sd": _sd(acc), "asr": statistics.mean(asr),
                            "asr_sd": _sd(asr), "bar": bar, "meets": meets})
    return out


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_sd(summary: dict[str, Any], field: str) -> str:
    """'81.3 ± 3.0' over several seeds, '82.0' over one."""
    spread = f" ± {summary[field + '_sd']:.1f}" if summary["seeds"] > 1 else ""
    return f"{summary[field]:.1f}{spread}"


def table_markdown(summary_rows: list[dict[str, Any]]) -> str:
    lines = ["| model | trigger | data | method | seeds | clean acc (poisoned) | ASR (poisoned) | bar | meets |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary_rows:
        bar = f"ASR <= {r['bar'][0]:g}, acc >= {r['poisoned_acc'] - r['bar'][1]:.1f}"
        acc, asr = _mean_sd(r, "acc"), _mean_sd(r, "asr")
        lines.append(f"| {r['organism']} | {r['trigger']} | {r['data']} | {r['method']} | {r['seeds']} | "
                     f"{acc} ({r['poisoned_acc']:.1f}) | {asr} ({r['poisoned_asr']:.1f}) | {bar} | "
                     f"{'yes' if r['meets'] else 'no'} |")
    return "\n".join(lines)


def sweep_rows(cfg: ResultsConfig, rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over the sweep's seeds at each (tau, steps, lr) measured, table cells included."""
    if cfg.sweep is None:
        return []
    sw = cfg.sweep
    base_lr = {method: recipe(cfg, method, {}).lr for method in sw.methods}  # rows made before "lr" was recorded
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows.values():
        if (row.get("organism"), row.get("data")) == (sw.organism, sw.data) and row.get("method") in sw.methods \
                and row.get("seed") in sw.seeds:
            method = row["method"]
            grouped[(sw.methods.index(method), row["tau"] or 0.0, row["steps"], row.get("lr", base_lr[method]))
                    ].append(row)
    return [{"method": sw.methods[m], "tau": found[0]["tau"], "steps": steps, "lr": lr, "seeds": len(found),
             "acc": statistics.mean(acc := [r["clean_acc"] for r in found]), "acc_sd": _sd(acc),
             "asr": statistics.mean(asr := [r["asr"] for r in found]), "asr_sd": _sd(asr),
             "d_img": statistics.mean(r["d_img"] or 0 for r in found) if found[0]["tau"] is not None else None}
            for (m, _, steps, lr), found in sorted(grouped.items())]


def sweep_markdown(points: list[dict[str, Any]]) -> str:
    lines = ["| method | tau | steps | lr | seeds | clean acc | ASR | image distance at the end |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['method']} | {'-' if p['tau'] is None else p['tau']} | {p['steps']} | {p['lr']:g} | "
                     f"{p['seeds']} | {_mean_sd(p, 'acc')} | {_mean_sd(p, 'asr')} | "
                     f"{'-' if p['d_img'] is None else format(p['d_img'], '.2f')} |")
    return "\n".join(lines)


def plot_sweep(points: list[dict[str, Any]], poisoned: dict[str, Any] | None, png: Path,
               baselines: dict[str, dict[str, Any]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for method, steps, lr in dict.fromkeys((p["method"], p["steps"], p["lr"]) for p in points):
        line = [p for p in points if (p["method"], p["steps"], p["lr"]) == (method, steps, lr)]
        axis.plot([p["asr"] for p in line], [p["acc"] for p in line], "o-" if line[0]["tau"] else "s",
                  label=f"{method}, {steps} steps, lr {lr:g}")
        for p in line:
            if p["tau"] is not None:
                axis.annotate(f"tau {p['tau']:g}", (p["asr"], p["acc"]), fontsize=7, xytext=(3, 3),
                              textcoords="offset points")
    if poisoned:
        axis.plot([poisoned["asr"]], [poisoned["clean_acc"]], "kx", label="poisoned")
    for (name, row), marker in zip((baselines or {}).items(), "^v<>D", strict=False):
        axis.plot([row["asr"]], [row["clean_acc"]], marker, color="gray", label=f"{name}, {row['steps']} steps")
    axis.set_xlabel("attack success rate (%)")
    axis.set_ylabel("clean zero-shot accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


def budget_check_markdown(cfg: ResultsConfig, rows: dict[str, dict[str, Any]]) -> list[str]:
    check = cfg.budget_check
    lines = ["## Budget check", "",
             f"{check.method} at the table's budget on {check.data} pairs, beside the poisoned model: if it ends "
             f"more than {check.max_lift:g} points above it, the budget is retraining the model and that "
             "organism's rows do not count.", "",
             f"| model | clean acc (poisoned) | {check.method} ({check.data}), seeds | lift | rows count |",
             "|---|---|---|---|---|"]
    for organism in cfg.organisms:
        poisoned, lift = rows.get(f"{organism}/poisoned"), budget_lift(cfg, rows, organism)
        if poisoned is None:
            continue
        seeds = len(seed_rows(cfg, rows, organism, check.data, check.method))
        if lift is None:
            lines.append(f"| {organism} | {poisoned['clean_acc']:.1f} | not measured | - | unchecked |")
        else:
            lines.append(f"| {organism} | {poisoned['clean_acc']:.1f} | {poisoned['clean_acc'] + lift:.1f}, {seeds} "
                         f"| {lift:+.1f} | {'no' if lift > check.max_lift else 'yes'} |")
    return lines + [""]


def write_doc(cfg: ResultsConfig, config_path: str) -> Path:
    rows = current_rows(cfg)
    doc = Path(cfg.doc)
    parts = [GENERATED_NOTE.format(title=cfg.title, config=config_path, rows=cfg.rows,
                                  eval_count=cfg.eval_count), "## Table", "",
             table_markdown(summary(cfg, rows)), ""]
    if cfg.budget_check is not None:
        parts += budget_check_markdown(cfg, rows)
    points = sweep_rows(cfg, rows)
    if points:
        png = doc.with_name(f"{doc.stem}-sweep.png")
        sw = cfg.sweep
        baselines = {m.name: rows[key] for m in cfg.methods if m.name not in sw.methods
                     and (key := Cell(sw.organism, sw.data, m.name, sw.seeds[0]).key) in rows}
        plot_sweep(points, rows.get(f"{sw.organism}/poisoned"), png, baselines)
        parts += ["## Trade-off (sweep)", "",
                  f"{sw.organism}, {sw.data} pairs, seeds {list(sw.seeds)}: {', '.join(sw.methods)} at every "
                  "listed steps and lr (and tau, for the methods that have one).", "", sweep_markdown(points)]
        parts += ["", f"![trade-off]({png.name})", ""]
    parts += ["## Data sets and recipes", ""]
    parts += [f"- **{d.name}**: `{d.shards}`" + (f" (`{d.command}`)" if d.command else "") for d in cfg.data]
    parts += [f"- **{m.name}**: `{m.config}`" + (f" with `{json.dumps(m.overrides)}`" if m.overrides else "")
              for m in cfg.methods]
    parts += [f"- shared budget: `{json.dumps(cfg.budget)}`; seeds {list(cfg.seeds)}; "
              f"{cfg.eval_count} fresh evaluation images per model", ""]
    marker = "<!-- notes -->"
    old = doc.read_text() if doc.exists() else ""
    notes = old.split(marker, 1)[1] if marker in old else "\n"
    doc.write_text("\n".join(parts) + marker + notes)
    return doc


GENERATED_NOTE = """# {title}

Made by `python -m bench.results --config {config}` (the tables above the notes are rewritten
on every run; one JSON row per cleaning run in {rows}). Mean ± standard deviation where there are
several seeds; clean accuracy is zero-shot top-1 over the 10 toy classes (chance 10%) on {eval_count:,} fresh
images, ASR the share of triggered non-target images classified as the target. In brackets: the poisoned
model. "bar": the issue's (ASR at most 10% and clean accuracy at most 3 points below the poisoned model with
real pairs, 5 with generated pairs).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.results", description=__doc__.split("\n")[0])
    add_config_options(parser, config_help="results config (configs/results/)",
                       config_default="configs/results/toy-3k.yaml")
    parser.add_argument("--only", action="append", default=[], metavar="FIELD=VALUE",
                        help="run only matching cells: organism, data, method, seed, tau, steps or lr (repeatable)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells cleaned at a time, each in its own process (they share a GPU if there is one)")
    parser.add_argument("--report", action="store_true", help="only rewrite the document from the rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_command(parser.prog, lambda: _main(args))


def _main(args: argparse.Namespace) -> None:
    cfg = load_config(ResultsConfig, args.config, set_overrides(args))
    only = dict(parse_override(s) for s in args.only)
    if not args.report:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        run(cfg, only, args.jobs)
    print(write_doc(cfg, args.config))


if __name__ == "__main__":
    sys.exit(main())
