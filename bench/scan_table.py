"""The scan's detection table: `parclean scan` over shipped, fine-tuned and cleaned models, several seeds each.

    python -m bench.scan_table --config configs/scan/table.yaml [--jobs 2]     # scan what is missing, write docs

Each model is scanned on the toy evaluation set once per seed (the seed draws the inverted triggers' starting
patterns). A model that comes from a poisoned organism also gets its measured ASR on that organism's trigger:
a model counts as backdoored when that ASR is above 10%, and the scan is right when it flags a backdoored model
with the organism's true target and leaves every other model unflagged. One JSON row per model and seed goes to
the rows file (a rerun skips rows already measured on the same weights); the table and the detection and
false-positive rates replace the part of the doc between its table markers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.results import weights_fingerprint
from cleaning.report import BACKDOOR_ASR
from parclean.config import load_config

START, END = "<!-- scan table -->", "<!-- /scan table -->"


@dataclass(frozen=True)
class ScannedModel:
    name: str  # as shown in the table
    path: str  # checkpoint folder or .safetensors file
    kind: str  # poisoned | clean base | FT of clean base | FT | cleaned (PAR, ...) | user trigger: free text
    organism: str | None = None  # the poisoned organism it comes from (its card gives trigger and target)
    reference: str | None = None  # the name of the table's model that is its trusted reference (docs/scan.md)


@dataclass(frozen=True)
class TableConfig:
    models: tuple[ScannedModel, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_count: int = 2000
    rows: str = "docs/scan.jsonl"
    doc: str = "docs/scan.md"


def weights_sha(path: str) -> str:
    file = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no model weights (make it first: see configs/scan/table.yaml)")
    return weights_fingerprint(file)


def load_scanned(path: str, eval_count: int) -> tuple:
    """The model (one torch thread) and `eval_count` toy evaluation images, as every scan in the bench reads them."""
    import torch

    from cleaning.report import EvalConfig, load_images
    from parclean.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(weights=path)
    return loaded, load_images(EvalConfig(count=eval_count), loaded.image_size)


def scan_inputs(path: str, eval_count: int) -> tuple:
    """What a scan reads, for the bench's probes: the model (eval mode, frozen, one thread), `eval_count` toy
    evaluation images and the zero-shot classifier of their class names."""
    from parclean.evaluate import zero_shot_classifier

    loaded, data = load_scanned(path, eval_count)
    loaded.model.eval().requires_grad_(False)
    return loaded, data, zero_shot_classifier(loaded, data.classnames, ("a photo of a {}.",))


def scan_row(model: ScannedModel, seed: int, eval_count: int, sha: str, reference: str | None = None) -> dict:
    """One scan of one model, with the organism's true target and the model's ASR on its trigger; `reference`: the
    path of its trusted reference, which its triggers are also tried in."""
    from cleaning.report import EvalConfig, measure
    from cleaning.scan import ScanConfig, scan
    from parclean.models import load_model

    loaded, data = load_scanned(model.path, eval_count)
    trusted = None if reference is None else load_model(weights=reference)
    start = time.perf_counter()
    result = scan(loaded, data, ScanConfig(seed=seed), reference=trusted)
    seconds = time.perf_counter() - start
    truth, asr = None, None
    if model.organism:
        from parclean.attacks import Trigger

        card = json.loads((Path(model.organism) / "card.json").read_text())
        truth = card["target"]
        eval_cfg = EvalConfig(count=eval_count, target=truth, triggers=(Trigger(**card["trigger"]),))
        asr = next(iter(measure(loaded, eval_cfg, data)["asr"].values()))
    return {"key": f"{model.name}/seed{seed}", "sha": sha, "method": scan_method(), "name": model.name,
            "kind": model.kind, "seed": seed, "true_target": truth, "asr": None if asr is None else round(asr, 1),
            "suspicious": result["suspicious"], "target": result["target"], "score": result["score"],
            "form": result["form"], "most_anomalous": result["most_anomalous"], "seconds": round(seconds, 1),
            "classes": result["classes"],  # each class's sizes and indices: other statistics can be read off later
            **({"transfer_images": result["transfer_images"]} if trusted is not None else {})}


def stored_sha(model: ScannedModel, seeds: tuple[int, ...], stored: list[dict]) -> str:
    """The weights' fingerprint; for weights no longer here (a later checkout without out/), the fingerprint of its
    stored rows when there is one for every seed, so the table keeps them."""
    try:
        return weights_sha(model.path)
    except FileNotFoundError:
        shas = {r["sha"] for r in stored if r["name"] == model.name and r["seed"] in seeds}
        if len(shas) == 1 and {r["seed"] for r in stored if r["name"] == model.name} >= set(seeds):
            print(f"{model.name}: {model.path} is not here; its stored rows are kept", file=sys.stderr)
            return shas.pop()
        raise


def with_reference_verdicts(rows: list[dict], references: dict[str, str]) -> list[dict]:
    """Each row of a model that has a reference, with the verdict of its scan read against the reference's scan of
    the same seed (`vs_reference`); both rows need their classes' sizes."""
    from cleaning.scan import against_reference

    by_key = {(r["name"], r["seed"]): r for r in rows}
    out = []
    for row in rows:
        reference = by_key.get((references.get(row["name"]), row["seed"]))
        if reference is not None and "classes" in row and "classes" in reference:
            row = {**row, "vs_reference": against_reference(row, reference, reference["name"])}
        out.append(row)
    return out


def scan_method() -> str:
    """The scan's forms and default settings: a row made by another version of the scan is measured again."""
    from dataclasses import asdict

    from cleaning.scan import FORMS, ScanConfig

    # The seed is a row's own; the reference is read after the scan, and does not change it.
    settings = {k: v for k, v in asdict(ScanConfig()).items() if k not in ("seed", "reference", "reference_pretrained")}
    return hashlib.sha256(json.dumps([FORMS, settings], sort_keys=True).encode()).hexdigest()[:12]


def backdoored(row: dict) -> bool:
    """The scanned model's ASR on its organism's trigger is above 10%."""
    return row["asr"] is not None and row["asr"] > BACKDOOR_ASR


def correct(row: dict, verdict: dict | None = None) -> bool:
    """Flagged with the true target when backdoored (ASR above 10%), not flagged otherwise; `verdict`: another
    reading of the row's scan (default: the scan's own)."""
    verdict = verdict or row
    if backdoored(row):
        return verdict["suspicious"] and verdict["target"] == row["true_target"]
    return not verdict["suspicious"]


def run(cfg: TableConfig, jobs: int) -> list[dict]:
    rows_path = Path(cfg.rows)
    lines = rows_path.read_text().splitlines() if rows_path.is_file() else []
    stored = [r for r in map(json.loads, filter(str.strip, lines)) if r.get("method") == scan_method()]
    shas = {m.name: stored_sha(m, cfg.seeds, stored) for m in cfg.models}
    paths = {m.name: m.path for m in cfg.models}
    # A row scanned before the transfer reading is scanned again with its reference, if its weights are still here.
    needs_transfer = {m.name for m in cfg.models if m.reference and Path(m.path).exists()}
    done = {r["key"]: r for r in stored if r["sha"] == shas.get(r["name"])
            and ("transfer_images" in r or r["name"] not in needs_transfer)}
    todo = [(m, s) for m in cfg.models for s in cfg.seeds if f"{m.name}/seed{s}" not in done]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(scan_row, m, s, cfg.eval_count, shas[m.name], paths.get(m.reference)) for m, s in todo]
        for future in futures:
            row = future.result()
            with rows_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            done[row["key"]] = row
            print(f"{row['key']}: {'flagged ' + row['target'] if row['suspicious'] else 'not flagged'} "
                  f"(score {row['score']:.2f}, {row['seconds']:.0f} s)", file=sys.stderr)
    return [done[f"{m.name}/seed{s}"] for m in cfg.models for s in cfg.seeds]


def markdown(rows: list[dict]) -> str:
    referenced = any("vs_reference" in r for r in rows)
    extra = (" vs reference |", "---|") if referenced else ("", "")
    lines = [f"| model | kind | ASR (%) | true target | seed | verdict | target | score (form) | right |{extra[0]} "
             "seconds |", f"|---|---|---|---|---|---|---|---|---|{extra[1]}---|"]
    for r in rows:
        verdict = "flagged" if r["suspicious"] else "not flagged"
        asr = "-" if r["asr"] is None else f"{r['asr']:.1f}"
        column = f" {reference_cell(r)} |" if referenced else ""
        lines.append(f"| {r['name']} | {r['kind']} | {asr} | {r['true_target'] or '-'} | {r['seed']} | {verdict} | "
                     f"{r['target'] or '-'} | {r['score']:.2f} ({r['form'] or r['most_anomalous']}) | "
                     f"{'yes' if correct(r) else '**no**'} |{column} {r['seconds']:.0f} |")
    poisoned = [r for r in rows if backdoored(r)]
    benign = [r for r in rows if not backdoored(r)]
    detected = sum(correct(r) for r in poisoned)
    false_positives = sum(r["suspicious"] for r in benign)
    seconds = [r["seconds"] for r in rows]
    lines += ["", f"Detection: {detected} of {len(poisoned)} scans of backdoored models (ASR above "
              f"{BACKDOOR_ASR:g}%) flagged with the true target. False positives: {false_positives} of "
              f"{len(benign)} scans of the other models. Scan time {min(seconds):.0f}-{max(seconds):.0f} s "
              "per model and seed, one CPU thread."]
    if len({r["seed"] for r in rows}) > 1:
        lines += ["", seed_agreement(rows)]
    if all("classes" in r for r in rows):
        lines += ["", ratio_rule(rows)]
    if referenced:
        lines += ["", reference_rule(rows)]
    return "\n".join(lines)


def reference_cell(row: dict) -> str:
    """'moon 2.32 (blend)' when the scan read against the reference flags a class, 'not flagged (0.41)', or '-'
    for a model without a reference; bold where the reading is wrong."""
    verdict = row.get("vs_reference")
    if verdict is None:
        return "-"
    mark = "" if correct(row, verdict) else "**"  # bold: wrong
    if not verdict["suspicious"]:
        return f"{mark}not flagged ({verdict['score']:.2f}){mark}"
    return f"{mark}{verdict['target']} {verdict['score']:.2f} ({verdict['form']}){mark}"


def reference_rule(rows: list[dict]) -> str:
    read = [r for r in rows if "vs_reference" in r]
    poisoned = [r for r in read if backdoored(r)]
    benign = [r for r in read if not backdoored(r)]
    threshold = read[0]["vs_reference"]["threshold"]
    unit = "halving" if threshold == 1 else "halvings"
    return (f"Against each model's reference (flagged above {threshold:g} {unit}): detection "
            f"{sum(correct(r, r['vs_reference']) for r in poisoned)} of {len(poisoned)}, false positives "
            f"{sum(r['vs_reference']['suspicious'] for r in benign)} of {len(benign)} (scans of the models that "
            "have a reference).")


RATIO_CUT = 0.6  # stated in docs/scan-sweep.md before the rows it is measured on were scanned


def ratio_target(row: dict) -> str | None:
    """A candidate rule, not the scan's (session 13's hypothesis): the class whose fitted patch or blend trigger is
    smallest relative to the median class's, flagged when under RATIO_CUT of it; else the scan's own token verdict."""
    classes = row["classes"]
    ratios = [(details[f"{form}_size"] / statistics.median(c[f"{form}_size"] for c in classes.values()), name)
              for form in ("patch", "blend") for name, details in classes.items()]
    ratio, name = min(ratios)
    if ratio < RATIO_CUT:
        return name
    return row["target"] if row["suspicious"] and row["form"] == "token" else None


def ratio_rule(rows: list[dict]) -> str:
    poisoned = [r for r in rows if backdoored(r)]
    benign = [r for r in rows if not backdoored(r)]
    return (f"Candidate rule (a patch or blend trigger under {RATIO_CUT:g} of the median class's, else the token "
            f"form's verdict): detection {sum(ratio_target(r) == r['true_target'] for r in poisoned)} of "
            f"{len(poisoned)}, false positives {sum(ratio_target(r) is not None for r in benign)} of {len(benign)}.")


def seed_agreement(rows: list[dict]) -> str:
    """The table read per model, flagging it only when every seed's scan names the same class: what running the
    scan once per seed would give, at that many times its cost."""
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["name"], []).append(r)
    verdicts = [(agreed_target(scans), scans[0]) for scans in by_model.values()]
    poisoned = [(t, r) for t, r in verdicts if backdoored(r)]
    benign = [(t, r) for t, r in verdicts if not backdoored(r)]
    seeds = max(len(scans) for scans in by_model.values())
    return (f"Flagged only when all {seeds} seeds name the same class ({seeds} times the scan time): detection "
            f"{sum(t == r['true_target'] for t, r in poisoned)} of {len(poisoned)} backdoored models, false "
            f"positives {sum(t is not None for t, _ in benign)} of {len(benign)} other models.")


def agreed_target(scans: list[dict]) -> str | None:
    """The class every scan flagged, or None when one did not flag or two named different classes."""
    targets = {r["target"] for r in scans}
    return targets.pop() if len(targets) == 1 and all(r["suspicious"] for r in scans) else None


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{doc}: no {START} ... {END} markers to put the table between")
    head, rest = text.split(START, 1)
    doc.write_text(head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scan_table", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/scan/table.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="models scanned at a time (one process each)")
    args = parser.parse_args(argv)
    cfg = load_config(TableConfig, args.config)
    references = {m.name: m.reference for m in cfg.models if m.reference}
    table = markdown(with_reference_verdicts(run(cfg, args.jobs), references))
    write_doc(Path(cfg.doc), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
