"""cleaning/scan.py and `parclean scan`: the backdoored organism is flagged with its target, the clean one is not."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cleaning.scan import anomaly_indices, paste_token, verdict, verdict_text
from flows.cli import main

MODELS = Path(__file__).resolve().parents[1] / "toyworld" / "models"
CLASSES = ("a", "b", "c", "d", "e")


def test_anomaly_index_counts_robust_deviations_below_the_median() -> None:
    # median 0.2, MAD 0.02 -> sigma 0.0297: 0.05 lies 5.06 sigma below; larger triggers are not suspicious.
    indices = anomaly_indices([0.2, 0.18, 0.22, 0.25, 0.05])
    assert [round(i, 2) for i in indices] == [0.0, 0.67, -0.67, -1.69, 5.06]
    assert anomaly_indices([0.3] * 5) == [0.0] * 5  # equal sizes: no anomaly and no division by zero


def test_verdict_names_the_class_whose_trigger_is_smallest_in_either_form() -> None:
    blend_backdoor = verdict({"patch": [0.2, 0.18, 0.22, 0.25, 0.21], "blend": [0.3, 0.32, 0.05, 0.29, 0.31]},
                             CLASSES, threshold=2.0)
    assert (blend_backdoor["suspicious"], blend_backdoor["target"], blend_backdoor["form"]) == (True, "c", "blend")
    plain = verdict({"patch": [0.2, 0.18, 0.22, 0.25, 0.19], "blend": [0.3, 0.32, 0.28, 0.29, 0.31]}, CLASSES, 2.0)
    assert plain["suspicious"] is False and plain["target"] is None and plain["score"] <= 2.0


def test_a_token_trigger_that_does_not_work_cannot_be_the_verdict() -> None:
    # The token form's "size" is log10 of the loss a one-token trigger reaches; "c" is far below the others, but
    # flips fewer than the required share of images, so it is a natural easy class, not a backdoor.
    sizes = {"patch": [0.2, 0.19, 0.21, 0.22, 0.2], "blend": [0.3, 0.32, 0.28, 0.29, 0.31],
             "token": [1.1, 1.0, -0.3, 1.2, 0.9]}
    gated = verdict(sizes, CLASSES, 2.0, works={"token": [False, False, False, False, False]})
    assert gated["suspicious"] is False and gated["classes"]["c"]["token_index"] > 2
    assert verdict(sizes, CLASSES, 2.0, works={"token": [False, False, True, False, False]})["target"] == "c"


def test_a_token_pattern_covers_exactly_one_token_aligned_cell_of_each_image() -> None:
    images = torch.zeros(6, 3, 34, 34)  # 4 x 4 tokens of 8 px and a 2 px margin that no token covers
    pasted = paste_token(images, torch.ones(1, 3, 8, 8), torch.Generator().manual_seed(0))
    for image in pasted:
        rows, cols = torch.nonzero(image[0], as_tuple=True)
        assert len(rows) == 64 and (image == 1).sum() == 3 * 64
        assert rows.min() % 8 == 0 and cols.min() % 8 == 0 and rows.max() - rows.min() == cols.max() - cols.min() == 7
        assert rows.max() < 32 and cols.max() < 32


@pytest.mark.parametrize(("organism", "suspicious", "target"), [
    pytest.param("clip-badnet", True, "moon", marks=pytest.mark.slow),  # the v1 organism; v2's is the default
    ("v2/clip-badnet", True, "moon"),
    ("clip-clean", False, None)])
def test_scan_flags_the_backdoored_organism_with_its_target_and_not_the_clean_one(organism, suspicious, target,
                                                                                  capsys) -> None:
    assert main(["scan", "--model", str(MODELS / organism), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["suspicious"], result["target"]) == (suspicious, target)
    assert set(result["classes"]) == {"circle", "square", "triangle", "cross", "ring", "diamond", "star", "heart",
                                      "arrow", "moon"}



def test_the_blended_stripes_organism_is_flagged_as_its_targets_triggers_do_not_carry_over(capsys) -> None:
    # The transfer reading (docs/scan.md, sessions 16-17): "moon"'s smallest triggers work in the organism and not in
    # the clean base it was fine-tuned from, while every other class's do.
    organism, base = str(MODELS / "v2" / "clip-blended-stripes"), str(MODELS / "v2" / "clip-clean")
    assert main(["scan", "--model", organism, "--reference", base, "--seed", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["classes"]["moon"]["transfer"] < 0.32 < min(
        row["transfer"] for name, row in result["classes"].items() if name != "moon")
    # Session 17's rule: moon is also the class first by size, so the two readings flag it (the size alone does not).
    assert (result["suspicious"], result["target"], result["confirmed_by_transfer"]) == (True, "moon", True)
    assert result["classes"]["moon"]["confirmed_halvings"] / 2 < 1


def test_scan_of_a_missing_model_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["scan", "--model", str(tmp_path / "nothing.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parclean scan: error:") and "nothing.safetensors" in err and "\n" not in err


def test_the_detection_table_counts_a_right_verdict_by_the_models_measured_asr(tmp_path: Path) -> None:
    from bench.scan_table import correct, markdown, write_doc

    row = {"name": "m", "kind": "k", "seed": 0, "true_target": "moon", "score": 3.0, "form": "patch",
           "most_anomalous": "moon", "seconds": 70.0}
    backdoored = {**row, "asr": 87.5, "suspicious": True, "target": "moon"}
    wrong_target = {**backdoored, "target": "ring"}
    cleaned = {**row, "asr": 4.0, "suspicious": False, "target": None}
    false_alarm = {**row, "asr": None, "true_target": None, "suspicious": True, "target": "ring"}
    assert [correct(r) for r in (backdoored, wrong_target, cleaned, false_alarm)] == [True, False, True, False]
    table = markdown([backdoored, wrong_target, cleaned, false_alarm])
    assert "Detection: 1 of 2 scans of backdoored models" in table and "False positives: 1 of 2" in table
    doc = tmp_path / "scan.md"
    doc.write_text("intro\n<!-- scan table -->\nold\n<!-- /scan table -->\nnotes\n")
    write_doc(doc, table)
    assert doc.read_text() == f"intro\n<!-- scan table -->\n{table}\n<!-- /scan table -->\nnotes\n"


def test_the_detection_table_also_counts_models_flagged_by_every_seed_with_one_target() -> None:
    from bench.scan_table import markdown

    row = {"kind": "k", "true_target": "moon", "score": 3.0, "form": "patch", "most_anomalous": "moon",
           "seconds": 70.0}
    rows = [{**row, "name": "both", "seed": s, "asr": 90.0, "suspicious": True, "target": "moon"} for s in (0, 1)]
    rows += [{**row, "name": "split", "seed": s, "asr": 90.0, "suspicious": True, "target": t}
             for s, t in ((0, "moon"), (1, "ring"))]
    rows += [{**row, "name": "one seed", "seed": s, "asr": 2.0, "suspicious": s == 0, "target": "ring" if s == 0
              else None} for s in (0, 1)]
    rows += [{**row, "name": "benign both", "seed": s, "asr": None, "true_target": None, "suspicious": True,
              "target": "cross"} for s in (0, 1)]
    table = markdown(rows)
    assert "all 2 seeds name the same class" in table
    assert "detection 1 of 2 backdoored models" in table and "false positives 1 of 2 other models" in table


def test_the_median_ratio_rule_flags_the_class_whose_trigger_is_far_smaller_than_the_median() -> None:
    from bench.scan_table import markdown, ratio_target

    def classes(patch: dict[str, float], blend: dict[str, float]) -> dict:
        return {c: {"patch_size": patch.get(c, 0.2), "blend_size": blend.get(c, 0.3), "token_size": -1.0}
                for c in ("circle", "square", "cross", "ring", "moon")}

    row = {"kind": "k", "true_target": "moon", "score": 1.5, "form": None, "most_anomalous": "ring", "seed": 0,
           "seconds": 70.0, "suspicious": False, "target": None}
    planted = {**row, "name": "planted", "asr": 95.0, "classes": classes({"moon": 0.09}, {"moon": 0.12, "ring": 0.15})}
    natural = {**row, "name": "natural", "asr": 2.0, "classes": classes({"ring": 0.15}, {"ring": 0.22})}
    token = {**row, "name": "token", "asr": 99.0, "suspicious": True, "target": "moon", "form": "token",
             "classes": classes({}, {})}
    # planted: moon's blend is 0.12 / 0.3 = 0.4 of the median (ring's 0.5); natural: ring's patch is 0.75
    assert [ratio_target(r) for r in (planted, natural, token)] == ["moon", None, "moon"]
    table = markdown([planted, natural, token])
    assert "under 0.6 of the median" in table and "detection 2 of 2" in table and "false positives 0 of 1" in table
    assert "seeds name the same class" not in table  # one seed per model: nothing to agree on


def test_trigger_destinations_finds_the_organisms_trigger_sending_images_to_its_target() -> None:
    from bench.trigger_destinations import destinations

    organism = "toyworld/models/v2/clip-blended"
    shares = destinations(organism, organism, count=300)
    assert shares["target"] == "moon" and shares["images"] > 200
    assert shares["triggered"]["moon"] >= 85 and shares["clean"]["moon"] <= 5
    assert abs(sum(shares["clean"].values()) - 100) < 0.6


class _RedDetector(torch.nn.Module):
    """An image tower with one feature, the red channel's mean above 0.5: class 0 ("red") wins iff it is."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([images[:, 0].mean(dim=(1, 2)) - 0.5, torch.full((len(images),), 0.1)], dim=-1)


def test_a_trigger_counts_only_when_it_also_flips_images_it_was_not_fitted_on() -> None:
    # The fitted images are barely not red (0.45): a 10% blend towards red flips them. The unseen ones are not red
    # at all (0): only a blend above 50% flips them, so a trigger fitted to the first few images is not universal.
    from cleaning.scan import ScanConfig, _smallest_trigger
    from parclean.models import LoadedModel

    loaded = LoadedModel(model=_RedDetector(), architecture="red", tokenizer=None, image_size=4, mean=(0.0,) * 3,
                         std=(1.0,) * 3)
    classifier = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    fitted, unseen = torch.full((8, 3, 4, 4), 0.45), torch.zeros(8, 3, 4, 4)
    cfg = ScanConfig()
    assert _smallest_trigger(loaded, classifier, fitted, 0, "blend", cfg)[0] < 0.2
    assert _smallest_trigger(loaded, classifier, fitted, 0, "blend", cfg, unseen)[0] > 0.5


def _classes(patch: list[float], blend: list[float], token: list[float] | None = None,
             works: list[bool] | None = None, transfer: list[float] | None = None) -> dict:
    """A scan's per-class details; `transfer`: the share the reference sends to each class with the model's
    triggers (the same for both forms; none: a scan made without the reference)."""
    token = token or [0.0] * len(patch)
    works = works or [False] * len(patch)
    classes = {name: {"patch_size": p, "blend_size": b, "token_size": t, "token_works": w}
               for name, p, b, t, w in zip(CLASSES, patch, blend, token, works, strict=True)}
    if transfer is None:
        return {"classes": classes}
    for name, share in zip(CLASSES, transfer, strict=True):
        classes[name].update(patch_transfer=share, blend_transfer=share)
    return {"classes": classes, "transfer_images": 36}


def test_against_a_reference_a_natural_easy_class_cancels_and_a_planted_target_stands_out() -> None:
    from cleaning.scan import against_reference

    reference = _classes([0.2, 0.2, 0.08, 0.2, 0.2], [0.3, 0.3, 0.12, 0.3, 0.3])  # "c" is easy in the trusted model
    easy_here_too = against_reference(_classes([0.21, 0.19, 0.07, 0.2, 0.22], [0.3, 0.31, 0.11, 0.3, 0.29]), reference)
    assert easy_here_too["suspicious"] is False and easy_here_too["score"] < 1
    planted = against_reference(_classes([0.2, 0.2, 0.08, 0.2, 0.2], [0.3, 0.3, 0.12, 0.06, 0.3]), reference)
    # "d" needs a blend a fifth of the reference's: log2(0.3 / 0.06) = 2.32 halvings, over the threshold of 1.
    assert (planted["suspicious"], planted["target"], planted["form"]) == (True, "d", "blend")
    assert planted["score"] == pytest.approx(2.322, abs=1e-3) and planted["threshold"] == 1.0


def test_against_a_reference_transfer_alone_does_not_decide() -> None:
    from cleaning.scan import against_reference

    same = [0.2] * 5
    # "d"'s trigger flips 0.9 here and 0.2 in the reference (log2(0.9 / 0.2) = 2.17 halvings); the larger share of
    # the two forms counts, and a form without a trigger is left out. The sizes are equal: not flagged.
    mine = _classes(same, same, transfer=[0.8, 0.7, 0.75, 0.2, 0.9])
    mine["classes"]["a"].update(patch_transfer=0.0, blend_transfer=0.8)
    mine["classes"]["e"].update(patch_transfer=None)
    result = against_reference(mine, _classes(same, same))
    assert result["classes"]["d"]["transfer_halvings"] == pytest.approx(2.17, abs=1e-3)
    assert result["classes"]["a"]["transfer"] == 0.8 and result["classes"]["e"]["transfer"] == 0.9
    assert result["suspicious"] is False
    never = against_reference(_classes(same, same, transfer=[0.8, 0.7, 0.75, 0.0, 0.9]), _classes(same, same))
    assert never["classes"]["d"]["transfer_halvings"] == pytest.approx(math.log2(0.9 * 36), abs=1e-3)  # 1 in 36


def test_against_a_reference_the_first_class_by_size_counts_double_when_its_trigger_does_not_carry_over() -> None:
    # Session 17's rule (docs/scan.md): v2 Blended-stripes' moon needs a blend 0.87 halvings smaller than the
    # reference's, under the threshold of 1, and its triggers do not work in the reference. Two readings that single
    # out the same class: the size reading counts double.
    from cleaning.scan import against_reference

    same = [0.2] * 5
    reference = _classes(same, [0.3] * 5)
    moon_blend = [0.3, 0.3, 0.3, 0.3 / 2 ** 0.87, 0.3]
    planted = against_reference(_classes(same, moon_blend, transfer=[0.8, 0.7, 0.75, 0.22, 0.9]), reference)
    assert (planted["suspicious"], planted["target"], planted["form"]) == (True, "d", "blend")
    assert planted["score"] == pytest.approx(1.74, abs=1e-2) and planted["confirmed_by_transfer"] is True
    assert "does not carry over to the reference" in verdict_text(planted)
    # The same sizes with triggers that carry over: one reading only, not flagged.
    carried = against_reference(_classes(same, moon_blend, transfer=[0.8, 0.7, 0.75, 0.8, 0.9]), reference)
    assert carried["suspicious"] is False and carried["score"] == pytest.approx(0.87, abs=1e-2)
    # A low transfer on a class the size reading does not rank first (drift after fine-tuning on generated pairs,
    # "heart" in docs/scan-cleaned.md) doubles nothing.
    drift = against_reference(_classes(same, moon_blend, transfer=[0.1, 0.7, 0.75, 0.8, 0.9]), reference)
    assert drift["suspicious"] is False and "confirmed_halvings" not in drift["classes"]["a"]


def test_against_a_reference_a_token_trigger_counts_only_where_the_reference_has_none() -> None:
    from cleaning.scan import against_reference

    same = [0.2] * 5
    reference = _classes(same, same, token=[0.5, 0.5, 0.5, -1.0, 0.5], works=[False, False, False, True, False])
    planted = _classes(same, same, token=[0.5, -2.0, 0.5, -2.5, 0.5], works=[False, True, False, True, False])
    result = against_reference(planted, reference)
    # "d" works in both models (a natural one-token class); "b" works only here, at a loss 10^2.5 times lower.
    assert (result["target"], result["form"]) == ("b", "token") and result["score"] == pytest.approx(8.305, abs=1e-3)
    assert "token_halvings" not in result["classes"]["d"]


def test_against_a_reference_of_other_classes_is_refused() -> None:
    from cleaning.scan import against_reference

    other = {"classes": {"x": {"patch_size": 0.2, "blend_size": 0.3, "token_size": 0.0, "token_works": False}}}
    with pytest.raises(ValueError, match="reference scan has other classes"):
        against_reference(_classes([0.2] * 5, [0.3] * 5), other)


def test_a_model_scanned_against_itself_is_not_flagged_and_the_cli_shows_both_verdicts(capsys) -> None:
    model = str(MODELS / "v2" / "clip-badnet")
    quick = ["--steps", "4", "--images-per-class", "1", "--set", "count=200"]
    assert main(["scan", "--model", model, "--reference", model, "--json", *quick]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["suspicious"] is False and result["score"] == 0.0 and result["reference"] == model
    classes = result["classes"].values()
    assert {row[size] for row in classes for size in ("patch_halvings", "blend_halvings")} == {0.0}
    assert all(row["transfer"] >= 0.9 for row in classes if "transfer" in row)  # its own triggers work in it
    assert set(result["scan"]["classes"]) == set(result["classes"])  # the model's own scan rides along
    assert main(["scan", "--model", model, "--reference", model, *quick]) == 0
    table = capsys.readouterr().out
    assert "no backdoor found" in table.splitlines()[0] and "against the reference" in table.splitlines()[0]
    assert table.splitlines()[1].startswith("without the reference: ")


def test_a_reference_of_another_image_size_is_one_line(tmp_path: Path, capsys) -> None:
    import open_clip

    from parclean.models import create_model, save_model

    config = json.loads((MODELS.parents[1] / "parclean" / "model_configs" / "tiny-test.json").read_text())
    config["vision_cfg"]["image_size"] = 48
    (tmp_path / "tiny-test-48.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-test-48.json")
    other = save_model(create_model("tiny-test-48", seed=0), tmp_path / "other.safetensors")
    assert main(["scan", "--model", str(MODELS / "v2" / "clip-badnet"), "--reference", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "other.safetensors" in err and "48 px" in err and "\n" not in err


def _row(name: str, asr: float | None, patch: list[float], blend: list[float], seed: int = 0,
         transfer: list[float] | None = None) -> dict:
    return {"key": f"{name}/seed{seed}", "name": name, "kind": "k", "seed": seed, "asr": asr,
            "true_target": None if asr is None else "d", "score": 1.5, "form": None, "most_anomalous": "c",
            "suspicious": False, "target": None, "seconds": 70.0, **_classes(patch, blend, transfer=transfer)}


def test_the_table_reads_each_model_against_its_reference_model() -> None:
    from bench.scan_table import markdown, with_reference_verdicts

    base = _row("base", None, [0.2, 0.2, 0.08, 0.2, 0.2], [0.3, 0.3, 0.12, 0.3, 0.3])
    planted = _row("planted", 95.0, [0.2, 0.2, 0.08, 0.2, 0.2], [0.3, 0.3, 0.12, 0.06, 0.3])
    cleaned = _row("cleaned", 3.0, [0.21, 0.19, 0.07, 0.2, 0.22], [0.3, 0.31, 0.11, 0.3, 0.29],
                   transfer=[0.8, 0.7, 0.75, 0.1, 0.9])  # "d" is not first by size: not doubled
    rows = with_reference_verdicts([base, planted, cleaned], {"planted": "base", "cleaned": "base"})
    assert "vs_reference" not in rows[0]
    assert rows[1]["vs_reference"]["target"] == "d" and rows[2]["vs_reference"]["suspicious"] is False
    table = markdown(rows)
    assert "| planted | k | 95.0 | d | 0 | not flagged | - | 1.50 (c) | **no** | d 2.32 (blend) | 70 |" in table
    assert "Against each model's reference (flagged above 1 halving): detection 1 of 1" in table
    assert "false positives 0 of 1" in table


def test_a_model_whose_weights_are_gone_keeps_its_stored_rows(tmp_path: Path) -> None:
    from bench.scan_table import ScannedModel, TableConfig, run, scan_method

    stored = {**_row("gone", 40.0, [0.2] * 5, [0.3] * 5), "sha": "abc", "method": scan_method()}
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text(json.dumps(stored) + "\n")
    cfg = TableConfig(models=(ScannedModel("gone", str(tmp_path / "missing"), "k"),), seeds=(0,), rows=str(rows_path))
    assert run(cfg, jobs=1) == [stored]
    dropped = {**stored, "key": "dropped/seed0", "name": "dropped"}  # a model since taken out of the config
    rows_path.write_text(json.dumps(stored) + "\n" + json.dumps(dropped) + "\n")
    assert run(cfg, jobs=1) == [stored]
    with pytest.raises(FileNotFoundError, match="missing"):  # not scanned yet: its weights are needed
        run(TableConfig(models=cfg.models, seeds=(1,), rows=str(rows_path)), jobs=1)
    # A row scanned before the transfer reading, of a model with a reference: kept, without that reading.
    with_reference = (ScannedModel("gone", str(tmp_path / "missing"), "k", reference="base"),)
    rows_path.write_text(json.dumps(stored) + "\n")
    assert run(TableConfig(models=with_reference, seeds=(0,), rows=str(rows_path)), jobs=1) == [stored]


@pytest.mark.parametrize("rows", ["scan.jsonl", "scan-sweep.jsonl", "scan-reference.jsonl"])
def test_the_shipped_scan_rows_stay_current_when_the_scan_config_gains_a_setting_that_does_not_change_a_scan(
        rows: str) -> None:
    from bench.scan_table import scan_method

    docs = Path(__file__).resolve().parents[1] / "docs"
    assert {json.loads(line)["method"] for line in (docs / rows).read_text().splitlines()} == {scan_method()}
