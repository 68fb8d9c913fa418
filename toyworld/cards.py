"""Summarise the shipped organisms: a Markdown table from their cards and one plot of their training curves.

    python -m toyworld.cards            # prints the table for docs/organism.md, writes docs/organism-curves.png
    python -m toyworld.cards v2     # the v2 set: docs/organism-v2-curves.png, -v2-base.png, -v2-base-wide.png
                                    # (the plateau checks and the wide base's first stage read from out/)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS = Path(__file__).parent / "models"


def cards(models: Path = MODELS) -> dict[str, dict]:
    """card.json of every trained organism (clip-*), by folder name."""
    return {d.name: json.loads((d / "card.json").read_text()) for d in sorted(models.glob("clip-*"))
            if (d / "card.json").is_file()}


def table(found: dict[str, dict]) -> str:
    lines = ["| organism | trigger | poison rate | steps (from) | clean acc (%) | ASR (%) | train time (s) "
             "| trained on |", "|---|---|---|---|---|---|---|---|"]
    for name, card in found.items():
        trigger = card["trigger"]["kind"] if card["trigger"] else "-"
        start = card["config"].get("init") or "scratch"
        asr = f"{card['asr']:.1f}" if card["asr"] is not None else "-"
        lines.append(f"| {name} | {trigger} | {card['poison_rate']:.0%} | {card['steps']} "
                     f"({Path(start).parent.name or start}) | {card['clean_acc']:.1f} | {asr} | "
                     f"{card['train_seconds_last_session']:.0f} | {card.get('train_device', 'cpu')} |")
    chance = next(iter(found.values()))["chance_acc"] if found else 10.0
    lines.append(f"\nChance is {chance:.0f}%. ASR: share of triggered evaluation images whose true class is not the "
                 "target that the model calls the target. Numbers measured from the saved (fp16) weights.")
    return "\n".join(lines) + "\n"


def plot(found: dict[str, dict], png: Path, models: Path = MODELS, bases: tuple[str, ...] = ()) -> None:
    """Each organism's curves; each of `bases` (clean models the others were fine-tuned from) is drawn as its final
    accuracy and the regime's bar 2 points below it, not as a curve of its own much longer training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    for i, base in enumerate(bases):
        colour = ("grey", "black")[i % 2]
        final = found[base]["clean_acc"]
        left.axhline(final, color=colour, linewidth=0.8, label=f"{base} (base), {final:.1f}")
        left.axhline(final - 2, color=colour, linewidth=0.8, linestyle="--", label=f"{base} - 2 (the regime's bar)")
    for name in (n for n in found if n not in bases):
        points = [json.loads(line) for line in (models / name / "curve.jsonl").read_text().splitlines()]
        steps = [p["step"] for p in points]
        left.plot(steps, [p["clean_acc"] for p in points], marker=".", label=name)
        if "asr_trigger" in points[0]:
            right.plot(steps, [p["asr_trigger"] for p in points], marker=".", label=name)
    left.set(title="clean zero-shot accuracy (%)", xlabel="step")
    right.set(title="attack success rate (%)", xlabel="step of poisoned fine-tuning")
    left.legend(fontsize=6, loc="center right", bbox_to_anchor=(1.0, 0.6))
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def plot_base_curve(png: Path, parts: list[tuple[str, Path, int]], title: str) -> None:
    """A base's whole pretraining, drawn from the curve.jsonl of each stage: (label, folder, first step) each; a
    stage whose folder is missing (a first stage trained outside the repository) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 3.5))
    for label, folder, offset in parts:
        if not (folder / "curve.jsonl").is_file():
            continue
        points = [json.loads(line) for line in (folder / "curve.jsonl").read_text().splitlines()]
        axis.plot([offset + p["step"] for p in points], [p["clean_acc"] for p in points], marker=".", label=label)
    axis.set(title=title, xlabel="step (x 256 pairs)")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def plot_v2_bases(docs: Path, out: Path) -> None:
    """The two v2 bases' pretraining curves, each with its plateau check (folders under `out`, where the commands of
    docs/organism.md write them)."""
    check = "plateau check: 10% more samples at lr 1e-4"
    plot_base_curve(docs / "organism-v2-base.png", [
        ("v1 clip-clean (2,000 eval images)", MODELS / "clip-clean", 0),
        ("v2 clip-clean, trained on (5,000 eval images)", MODELS / "v2" / "clip-clean", 3000),
        (check, out / "v2-plateau-check", 9000)], "clean base: zero-shot accuracy (%) over its pretraining")
    plot_base_curve(docs / "organism-v2-base-wide.png", [
        ("first stage, from scratch (configs/organism/wide-clean.yaml)", out / "wide-clean", 0),
        ("clip-clean-wide, trained on (configs/organism/v2/wide-clean.yaml)", MODELS / "v2" / "clip-clean-wide",
         3000),
        (check, out / "v2-wide-plateau", 9000)], "wide clean base (toy-vit-32-wide): zero-shot accuracy (%)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(__file__).parent.parent
    if argv[:1] == ["v2"]:
        found = cards(MODELS / "v2")
        bases = tuple(name for name, card in found.items() if card["trigger"] is None)
        plot(found, root / "docs" / "organism-v2-curves.png", MODELS / "v2", bases=bases)
        plot_v2_bases(root / "docs", root / "out")
    else:
        found = cards()
        plot(found, root / "docs" / "organism-curves.png")
    print(table(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
