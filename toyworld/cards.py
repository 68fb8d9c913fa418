"""Summarise the shipped organisms: a Markdown table from their cards and one plot of their training curves.

    python -m toyworld.cards            # prints the table for docs/organism.md, writes docs/organism-curves.png
    python -m toyworld.cards v2 out/v2-plateau-check   # the v2 set: docs/organism-v2-curves.png, -v2-base.png
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


def plot(found: dict[str, dict], png: Path, models: Path = MODELS, base: str | None = None) -> None:
    """Each organism's curves; `base` (a clean model the others were fine-tuned from) is drawn as its final
    accuracy and the regime's bar 2 points below it, not as a curve of its own much longer training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    if base is not None:
        final = found[base]["clean_acc"]
        left.axhline(final, color="grey", label=f"{base} (base), {final:.1f}")
        left.axhline(final - 2, color="grey", linestyle="--", label="base - 2 (the regime's bar)")
    for name in (n for n in found if n != base):
        points = [json.loads(line) for line in (models / name / "curve.jsonl").read_text().splitlines()]
        steps = [p["step"] for p in points]
        left.plot(steps, [p["clean_acc"] for p in points], marker=".", label=name)
        if "asr_trigger" in points[0]:
            right.plot(steps, [p["asr_trigger"] for p in points], marker=".", label=name)
    left.set(title="clean zero-shot accuracy (%)", xlabel="step")
    right.set(title="attack success rate (%)", xlabel="step of poisoned fine-tuning")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def plot_base_curve(png: Path, plateau_check: Path | None = None, models: Path = MODELS) -> None:
    """The v2 base's whole pretraining: v1's 3,000 steps, v2's 6,000 more, and the plateau check after them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("v1 clip-clean (2,000 eval images)", models / "clip-clean", 0),
             ("v2 clip-clean, trained on (5,000 eval images)", models / "v2" / "clip-clean", 3000)]
    if plateau_check is not None and (plateau_check / "curve.jsonl").is_file():
        parts.append(("plateau check: 10% more samples at lr 1e-4", plateau_check, 9000))
    fig, axis = plt.subplots(figsize=(7, 3.5))
    for label, folder, offset in parts:
        points = [json.loads(line) for line in (folder / "curve.jsonl").read_text().splitlines()]
        axis.plot([offset + p["step"] for p in points], [p["clean_acc"] for p in points], marker=".", label=label)
    axis.set(title="clean base: zero-shot accuracy (%) over its pretraining", xlabel="step (x 256 pairs)")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    docs = Path(__file__).parent.parent / "docs"
    if argv[:1] == ["v2"]:  # python -m toyworld.cards v2 [PLATEAU_CHECK_FOLDER]
        found = cards(MODELS / "v2")
        plot(found, docs / "organism-v2-curves.png", MODELS / "v2", base="clip-clean")
        plot_base_curve(docs / "organism-v2-base.png", Path(argv[1]) if len(argv) > 1 else None)
    else:
        found = cards()
        plot(found, docs / "organism-curves.png")
    print(table(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
