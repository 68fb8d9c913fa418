"""flows/preflight.py: `parclean run --dry-run` checks models, data, eval set, triggers and outputs before anything
runs (exit 0 with a summary, or 2 with one line), and `parclean run` fails on the same problems before generating.
Real files: a tiny CLIP checkpoint, a tiny diffusers folder, the toy-world eval set."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml

from flows.cli import main

EVAL = {"data": "toyworld", "count": 40, "target": "moon", "triggers": [{"kind": "badnet", "patch_size": 8}]}


def settings(tmp_path: Path, tiny_sd: Path, clip: Path) -> dict:
    """A pipeline config that can run: the tiny SD and tiny CLIP, 10 captions, outputs under tmp_path."""
    generate = {"model": str(tiny_sd), "bank": "toyworld", "seed": 3, "num_samples": 10, "shard_size": 4,
                "batch_size": 4, "steps": 2, "height": 32, "width": 32, "device": "cpu", "dtype": "fp32",
                "image_format": "png"}
    return {"model": str(clip), "out": str(tmp_path / "run"), "shard_cache": str(tmp_path / "cache"),
            "generate": generate, "clean": {"steps": 2, "batch_size": 4}, "eval": copy.deepcopy(EVAL), "scan": None}


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dry_run(config: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, list[str], list[str]]:
    code = main(["run", "--config", str(config), "--dry-run", *extra])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.strip().splitlines()


@pytest.fixture
def good(tmp_path: Path, tiny_sd_dir: Path, tiny_clip_path: Path) -> dict:
    return settings(tmp_path, tiny_sd_dir, tiny_clip_path)


def test_a_good_config_passes_with_a_summary_and_writes_nothing(good: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    code, out, err = dry_run(write_config(tmp_path, good), capsys)
    assert (code, err) == (0, [])
    assert out[0].endswith("pipeline.yaml: ready to run")
    summary = dict(line.strip().split(": ", 1) for line in out[1:])
    assert summary["CLIP model"].startswith(f"{good['model']} (tiny-test, ")
    assert "StableDiffusionPipeline: scheduler, text_encoder, tokenizer, unet, vae" in summary["generator"]
    assert summary["prompt bank"].endswith(": 10 captions")
    assert summary["eval set"] == "registered eval set toyworld: 10 classes, up to 40 images, target 'moon'"
    assert summary["triggers"] == "badnet"
    assert summary["output"] == f"{good['out']} (to be created)"
    assert summary["shard set"].endswith("(10 samples to generate)")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def bad_bank(tmp_path: Path) -> str:
    bank = tmp_path / "two.txt"
    bank.write_text("a red circle\na blue square\n")
    return str(bank)


def eval_folder_without_target(tmp_path: Path) -> str:
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / name / "0.png")
    return str(tmp_path / "images")


def generator_without_unet(tmp_path: Path, tiny_sd: Path) -> str:
    copy = tmp_path / "sd-copy"
    shutil.copytree(tiny_sd, copy)
    shutil.rmtree(copy / "unet")
    return str(copy)


def pickled_state_dict(tmp_path: Path, clip: Path) -> str:
    """An open_clip-style bare state dict (.pt): it does not name its architecture."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(clip)), tmp_path / "epoch_1.pt")
    return str(tmp_path / "epoch_1.pt")


def real_architecture_header(tmp_path: Path) -> str:
    """A safetensors file whose metadata names a real open_clip architecture (the preflight reads headers only)."""
    import torch
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(2, 2)}, str(tmp_path / "vit.safetensors"), {"architecture": "ViT-S-32"})
    return str(tmp_path / "vit.safetensors")


def transformers_clip_folder(tmp_path: Path) -> str:
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "hf-clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"]}))
    import torch

    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)},
              str(folder / "model.safetensors"))
    return str(folder)


def out_holding_a_shard_set(tmp_path: Path) -> str:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    return str(tmp_path / "shards")


def out_under_a_file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "run")


# (what to change, the start of the one error line; TMP stands for tmp_path)
BAD_INPUTS = {
    "missing model": (lambda s, t, sd: s.update(model=str(t / "nothing.safetensors")),
                      "model: CLIP checkpoint TMP/nothing.safetensors not found"),
    "model without architecture": (lambda s, t, sd: s.update(model=str(sd / "unet" / "diffusion_pytorch_model."
                                                                                      "safetensors")),
                                   "model: SD/unet/diffusion_pytorch_model.safetensors: its metadata does not name"),
    "pickled model without architecture": (lambda s, t, sd: s.update(model=pickled_state_dict(t, Path(s["model"]))),
                                           "model: TMP/epoch_1.pt: a pickled checkpoint does not name its "
                                           "architecture"),
    "transformers CLIPModel folder": (lambda s, t, sd: s.update(model=transformers_clip_folder(t)),
                                      "model: TMP/hf-clip: a Hugging Face transformers CLIPModel checkpoint, which "
                                      "is not supported"),
    "real CLIP without an eval set": (lambda s, t, sd: (s.update(model=real_architecture_header(t)),
                                                        s["eval"].pop("data")),
                                      "eval.data: ViT-S-32 is a real CLIP architecture and no eval data was chosen"),
    "missing scan reference": (lambda s, t, sd: s.update(scan={"reference": str(t / "base.safetensors")}),
                               "scan.reference: CLIP checkpoint TMP/base.safetensors not found"),
    "missing generator": (lambda s, t, sd: s["generate"].update(model=str(t / "no-sd")),
                          "generate.model: diffusers pipeline folder TMP/no-sd not found"),
    "generator without unet": (lambda s, t, sd: s["generate"].update(model=generator_without_unet(t, sd)),
                               "generate.model: TMP/sd-copy: no unet/ folder, which model_index.json lists"),
    "unknown bank": (lambda s, t, sd: s["generate"].update(bank="nosuch"),
                     "generate.bank: nosuch: prompt bank not found"),
    "bank too small": (lambda s, t, sd: s["generate"].update(bank=bad_bank(t)),
                       "generate.bank: TMP/two.txt: bank 'two' can give at most 2 distinct captions"),
    "missing eval folder": (lambda s, t, sd: s["eval"].update(data=str(t / "imagenet" / "val")),
                            "eval.data: TMP/imagenet/val is neither a registered eval set"),
    "target not in the eval set": (lambda s, t, sd: s["eval"].update(data=eval_folder_without_target(t)),
                                   "eval.target: 'moon' is not one of the 2 eval classes (cat, dog)"),
    "unknown trigger": (lambda s, t, sd: s["eval"].update(triggers=[{"kind": "badnett"}]),
                        "TMP/pipeline.yaml: unknown trigger kind 'badnett'"),
    "trigger larger than the image": (lambda s, t, sd: s["eval"].update(triggers=[{"kind": "badnet",
                                                                                   "patch_size": 64}]),
                                      "eval.triggers: badnet: patch_size=64 is larger than the model's 32 px"),
    "out under a file": (lambda s, t, sd: s.update(out=out_under_a_file(t)),
                         "out: cannot use TMP/a-file/run: TMP/a-file is a file, not a folder"),
    "out holding another kind of output": (lambda s, t, sd: s.update(out=out_holding_a_shard_set(t)),
                                           "out: TMP/shards: holds a shard set (manifest.json), not a pipeline run"),
    "shard cache under a file": (lambda s, t, sd: s.update(shard_cache=out_under_a_file(t)),
                                 "shard_cache: cannot use TMP/a-file/run: TMP/a-file is a file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_exits_2_with_one_line_naming_it(case: str, good: dict, tmp_path: Path, tiny_sd_dir: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    change, expected = BAD_INPUTS[case]
    change(good, tmp_path, tiny_sd_dir)
    code, out, err = dry_run(write_config(tmp_path, good), capsys)
    assert code == 2 and out == [] and len(err) == 1, err
    expected = expected.replace("TMP", str(tmp_path)).replace("SD", str(tiny_sd_dir))
    assert err[0].startswith(f"parclean run: error: {expected}"), err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_named(good: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    good["out"] = str(locked / "run")
    code, _, err = dry_run(write_config(tmp_path, good), capsys)
    assert code == 2 and err == [f"parclean run: error: out: cannot write {locked}/run: {locked} is not writable"]


def test_a_pickled_state_dict_with_its_architecture_passes(good: dict, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    good.update(model=pickled_state_dict(tmp_path, Path(good["model"])), architecture="tiny-test")
    code, out, err = dry_run(write_config(tmp_path, good), capsys)
    assert (code, err) == (0, [])
    assert f"  CLIP model: {tmp_path}/epoch_1.pt (tiny-test, pickled state dict" in "\n".join(out)


def test_overwrite_lets_the_dry_run_accept_a_folder_of_another_kind(good: dict, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    good["out"] = out_holding_a_shard_set(tmp_path)
    code, out, _ = dry_run(write_config(tmp_path, good), capsys, "--overwrite")
    assert code == 0 and f"  output: {good['out']} (exists, holds shard set)" in out


def test_relative_paths_in_a_config_are_read_from_the_working_directory(good: dict, tmp_path: Path,
                                                                         tiny_clip_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_clip_path, tmp_path / "models" / "clip.safetensors")
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "run.yaml"
    config.write_text(yaml.safe_dump({**good, "model": "models/clip.safetensors"}))
    monkeypatch.chdir(tmp_path)  # models/ is beside configs/, not inside it
    code, out, _ = dry_run(config, capsys)
    assert code == 0 and "  CLIP model: models/clip.safetensors (tiny-test, " in "\n".join(out)
    monkeypatch.chdir(tmp_path / "configs")
    code, _, err = dry_run(config, capsys)
    assert code == 2 and err == [
        "parclean run: error: model: CLIP checkpoint models/clip.safetensors not found (looked for "
        f"{tmp_path}/configs/models/clip.safetensors: relative paths start at the working directory)"]


def test_run_with_a_missing_model_fails_before_generating_anything(good: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    good["model"] = str(tmp_path / "typo.safetensors")
    assert main(["run", "--config", str(write_config(tmp_path, good))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"parclean run: error: model: CLIP checkpoint {good['model']} not found"]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # no shard, no lock, no folder


def test_serve_checks_before_it_registers_a_schedule(good: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    good.update(model=str(tmp_path / "typo.safetensors"), schedule={"cron": "0 2 * * *"})
    assert main(["serve", "--config", str(write_config(tmp_path, good))]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"parclean serve: error: model: CLIP checkpoint {good['model']} not found"]


def test_run_with_overwrite_writes_into_a_folder_of_another_kind(good: dict, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    good["out"] = out_holding_a_shard_set(tmp_path)
    assert main(["run", "--config", str(write_config(tmp_path, good)), "--overwrite"]) == 0
    assert (Path(good["out"]) / "report.json").is_file()
