"""cleaning/report.py: the report's table and the training plot."""

from __future__ import annotations

import json
from pathlib import Path

from cleaning.report import Report, loss_terms, plot_training

# Two lines of the trainer's log as it writes them (cleaning/train.py: step, lr, terms, loss, seconds).
LOG = [{"step": 1, "lr": 3e-4, "clip": 2.1, "perturbation": -0.4, "d_img": 0.1, "d_txt": 0.2, "loss": 1.7,
        "seconds": 0.9},
       {"step": 2, "lr": 2e-4, "clip": 2.0, "perturbation": -0.6, "d_img": 0.3, "d_txt": 0.4, "loss": 1.4,
        "seconds": 1827.5}]


def test_the_plot_draws_loss_terms_only_not_wall_time_lr_or_distances(tmp_path: Path) -> None:
    assert loss_terms(LOG) == ["clip", "loss", "perturbation"]
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(record) + "\n" for record in LOG))
    png = plot_training(log, tmp_path / "training.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rows_are_rounded_to_one_decimal_with_their_change() -> None:
    report = Report(before={"clean_acc": 71.79999947547913, "asr": {"badnet": 99.95000004768372}},
                    after={"clean_acc": 70.04999876022339, "asr": {"badnet": 2.049999952316284}})
    assert report.rows() == [
        {"metric": "clean accuracy (%)", "before": 71.8, "after": 70.0, "change": -1.8},
        {"metric": "ASR badnet (%)", "before": 100.0, "after": 2.0, "change": -97.9},
    ]
    assert "| ASR badnet (%) | 100.0 | 2.0 | -97.9 |" in report.markdown()


def test_report_shows_the_scan_verdicts_before_and_after_beside_the_asr() -> None:
    flagged = {"suspicious": True, "target": "moon", "score": 5.437, "threshold": 2.0, "form": "patch",
               "most_anomalous": "moon"}
    cleared = {"suspicious": False, "target": None, "score": 1.21, "threshold": 2.0, "form": None,
               "most_anomalous": "ring"}
    report = Report(before={"clean_acc": 86.1, "asr": {"badnet": 100.0}, "scan": flagged},
                    after={"clean_acc": 84.0, "asr": {"badnet": 3.0}, "scan": cleared})
    assert report.rows()[-1] == {"metric": "backdoor scan score (flagged above 2)", "before": 5.4, "after": 1.2,
                                 "change": -4.2}
    markdown = report.markdown()
    assert "- before: backdoor suspected: target 'moon' (patch trigger), score 5.44 > 2" in markdown
    assert "- after: no backdoor found (score 1.21 <= 2, most anomalous class 'ring')" in markdown



def _scan(target, score, classes):
    """A scan result with per-class indices: classes = {name: (patch_index, token_index, token_works)}."""
    return {"suspicious": target is not None, "target": target, "score": score, "threshold": 2.0,
            "form": "patch" if target else None, "most_anomalous": target or max(classes, key=lambda c: classes[c][0]),
            "classes": {name: {"patch_index": p, "token_index": t, "token_works": w}
                        for name, (p, t, w) in classes.items()}}


def test_after_cleaning_the_report_follows_the_class_flagged_before_and_the_one_flagged_now() -> None:
    # Before: "moon" flagged (a working token trigger, 12.0); "ring" is the runner-up (patch, 2.1). After: "moon"
    # scores 0.4 and "ring" is flagged; the user reads that ring was already next to the target before cleaning.
    before = _scan("moon", 12.0, {"moon": (1.0, 12.0, True), "ring": (2.1, 0.5, False), "star": (0.2, 9.0, False)})
    after = _scan("ring", 4.8, {"moon": (0.4, 0.3, False), "ring": (4.8, 0.5, False), "star": (0.1, 0.2, False)})
    report = Report(before={"clean_acc": 86.1, "asr": {}, "scan": before},
                    after={"clean_acc": 85.0, "asr": {}, "scan": after})
    assert report.scan_verdicts()[2:] == [
        "after: 'moon', the class flagged before cleaning, now scores 0.40 (12.00 before)",
        "after: 'ring', flagged now, scored 2.10 before cleaning (a class near the threshold before cleaning may "
        "be a natural easy class rather than a moved backdoor: docs/scan.md)"]
    still = Report(before={"clean_acc": 86.1, "asr": {}, "scan": before},
                   after={"clean_acc": 85.0, "asr": {}, "scan": before})
    assert len(still.scan_verdicts()) == 2  # the same class flagged again: the verdict says it all


def test_the_terminal_table_shows_every_report_row_and_the_scan_verdicts(tmp_path: Path) -> None:
    from cleaning.report import before_after_table

    verdict = {"suspicious": False, "target": None, "score": 1.7, "threshold": 2.0, "form": None,
               "most_anomalous": "ring"}
    Report(before={"clean_acc": 86.8, "asr": {"badnet": 100.0}, "scan": verdict},
           after={"clean_acc": 85.9, "asr": {"badnet": 76.2}, "scan": verdict}).write(tmp_path)
    lines = before_after_table(tmp_path / "report.md").splitlines()
    assert lines[2].split() == ["ASR", "badnet", "(%)", "100.0", "76.2"]
    assert lines[3].startswith("backdoor scan score (flagged above 2)")
    assert lines[4:] == ["before: no backdoor found (score 1.70 <= 2, most anomalous class 'ring')",
                         "before: the scan missed a backdoor: it found none, but the named trigger badnet reaches "
                         "100.0% ASR",
                         "after: no backdoor found (score 1.70 <= 2, most anomalous class 'ring')",
                         "after: the scan missed a backdoor: it found none, but the named trigger badnet reaches "
                         "76.2% ASR"]


def test_a_scan_that_clears_a_model_whose_named_trigger_still_works_is_called_a_miss() -> None:
    cleared = {"suspicious": False, "target": None, "score": 1.8, "threshold": 2.0, "form": None,
               "most_anomalous": "moon"}
    report = Report(before={"clean_acc": 86.8, "asr": {"badnet": 100.0}, "scan": cleared},
                    after={"clean_acc": 85.9, "asr": {"badnet": 76.2, "blended": 4.0}, "scan": cleared})
    verdicts = report.scan_verdicts()
    assert verdicts[1] == ("before: the scan missed a backdoor: it found none, but the named trigger badnet reaches "
                           "100.0% ASR")
    assert verdicts[3] == ("after: the scan missed a backdoor: it found none, but the named trigger badnet reaches "
                           "76.2% ASR")
    assert len(verdicts) == 4 and "the scan missed" in report.markdown()


def test_the_result_line_says_the_scan_found_nothing_not_that_the_model_is_clean(tmp_path: Path) -> None:
    from flows.pipeline import result_line

    flagged = {"suspicious": True, "target": "moon", "score": 12.0, "threshold": 2.0, "form": "token",
               "most_anomalous": "moon"}
    cleared = {"suspicious": False, "target": None, "score": 1.8, "threshold": 2.0, "form": None,
               "most_anomalous": "moon"}
    Report(before={"clean_acc": 86.8, "asr": {"badnet": 100.0}, "scan": flagged},
           after={"clean_acc": 85.9, "asr": {"badnet": 76.2}, "scan": cleared}).write(tmp_path)
    assert result_line(tmp_path).endswith("scan backdoor (moon, 12.0) -> none found (1.8)")


def test_a_scan_read_against_a_reference_also_shows_the_models_own_verdict() -> None:
    own = {"suspicious": True, "target": "ring", "score": 2.02, "threshold": 2.0, "form": "blend",
           "most_anomalous": "ring"}
    against = {"suspicious": False, "target": None, "score": 0.31, "threshold": 1.0, "form": None,
               "most_anomalous": "triangle", "reference": "base.safetensors", "scan": own}
    report = Report(before={"clean_acc": 86.1, "asr": {}, "scan": against}, after={"clean_acc": 85.0, "asr": {}})
    assert report.scan_verdicts() == [
        "before: no backdoor found (score 0.31 <= 1, most anomalous class 'triangle') against the reference "
        "base.safetensors",
        "before, the model's own scan (no reference): backdoor suspected: target 'ring' (blend trigger), score 2.02 "
        "> 2"]
