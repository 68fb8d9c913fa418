"""Clean accuracy and ASR: a hand-built case whose answers are known (a model that sees the mean colour), and
ImageFolder sets streamed a batch at a time, on the GPU when there is one."""

from __future__ import annotations

import gc
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch

from parclean.attacks import Trigger
from parclean.evaluate import LabelledImages, evaluate
from parclean.models import LoadedModel

CLASSES = ("red", "green", "blue")


class MeanColour(torch.nn.Module):
    """Image feature: the mean (r, g, b); text feature: the one-hot colour its prompt names."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # evaluate() reads the device from the parameters

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(tokens[:, 0], len(CLASSES)).float()


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[next(i for i, name in enumerate(CLASSES) if name in text)] for text in texts])


def test_clean_accuracy_and_asr_count_what_they_should(tmp_path):
    # Five 8x8 images (r, g, b) and their labels; the target is blue. A pure blue 4x4 patch (a quarter of the
    # image) in the corner tips image 0 (r 0.5, b 0.4) to blue and no other; image 4 is red but labelled green.
    colours = [(0.5, 0.0, 0.4), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)]
    labels = [0, 0, 1, 2, 1]
    images = torch.tensor(colours).view(5, 3, 1, 1).expand(5, 3, 8, 8).clone()
    blue = tmp_path / "blue.png"
    PIL.Image.fromarray(np.tile(np.array([0, 0, 255], dtype=np.uint8), (8, 8, 1))).save(blue)
    trigger = Trigger(kind="image_patch", image=str(blue), patch_size=4, location="bottom_right")
    loaded = LoadedModel(MeanColour(), "mean-colour", tokenize, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    result = evaluate(loaded, LabelledImages(images, torch.tensor(labels), CLASSES), {"patch": trigger}, "blue")
    # 4 of 5 right; of the 4 triggered images not of the target class, 1 is called blue (the blue image itself,
    # called blue with or without the trigger, does not count).
    assert result == pytest.approx({"clean_acc": 80.0, "asr_patch": 25.0})


def write_image_folder(root, per_class: dict[str, int], size: int = 40):
    """ROOT/CLASS/i.png: random-noise PNGs (seeded), `per_class[CLASS]` of them; returns root."""
    rng = np.random.default_rng(0)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def live_images(size: int) -> int:
    """How many (3, size, size) images all live tensors of this process hold."""
    return sum(t.numel() // (3 * size * size) for t in gc.get_objects()
               if issubclass(type(t), torch.Tensor) and t.dim() >= 3 and tuple(t.shape[-3:]) == (3, size, size))


class DecodeWatcher(torch.utils.data.Dataset):
    """A dataset that decodes through `inner` and, at the start of every batch, counts the images held in memory."""

    def __init__(self, inner, batch_size: int, size: int) -> None:
        self.inner, self.batch_size, self.size = inner, batch_size, size
        self.baseline, self.peak = live_images(size), 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        if index % self.batch_size == 0:
            self.peak = max(self.peak, live_images(self.size) - self.baseline)
        return self.inner[index]


def test_an_image_folder_is_evaluated_a_batch_at_a_time_triggered_copies_included(tmp_path, tiny_clip_path):
    from cleaning.report import EvalConfig, measure, open_eval_data
    from parclean.models import load_model

    loaded = load_model(weights=tiny_clip_path)
    folder = write_image_folder(tmp_path / "set", {"cat": 32, "dog": 32, "fish": 32})
    cfg = EvalConfig(data=str(folder), count=96, target="fish", triggers=(Trigger(kind="badnet"),), batch_size=8,
                     num_workers=0, device="cpu")
    data = open_eval_data(cfg, loaded.image_size)
    watcher = DecodeWatcher(data.dataset, cfg.batch_size, loaded.image_size)
    result = measure(loaded, cfg, replace(data, dataset=watcher))
    assert result["eval_images"] == 96 and set(result["asr"]) == {"badnet"}
    # In memory, the set and its triggered copies were 96 + 64 images. Streamed, what is alive when a batch starts
    # is a few batches whatever the set's size (the last one and its triggered copy): at most 4.
    assert 0 < watcher.peak <= 4 * cfg.batch_size


def test_an_image_folder_streamed_through_loader_workers_scores_what_it_scores_in_memory(tmp_path, tiny_clip_path):
    from cleaning.report import EvalConfig, load_images, measure
    from parclean.models import load_model

    loaded = load_model(weights=tiny_clip_path)
    folder = write_image_folder(tmp_path / "set", {"cat": 9, "dog": 7, "fish": 8})
    cfg = EvalConfig(data=str(folder), count=24, target="dog", triggers=(Trigger(kind="blended"),), batch_size=5,
                     num_workers=2, device="cpu")
    in_memory = load_images(cfg, loaded.image_size)
    assert in_memory.images.shape == (24, 3, 32, 32) and in_memory.labels.tolist() == [0] * 9 + [1] * 7 + [2] * 8
    assert measure(loaded, cfg) == measure(loaded, cfg, in_memory)


def test_a_device_that_is_not_there_is_refused_in_one_line():
    from cleaning.report import EvalConfig
    from parclean.config import ConfigError, load_config
    from parclean.evaluate import resolve_device

    with pytest.raises(ConfigError, match="device: 'gpu': use auto, cpu, cuda or cuda:N"):
        load_config(EvalConfig, {"device": "gpu"})
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluation_runs_on_the_gpu_when_there_is_one_and_scores_what_the_cpu_scores():
    from pathlib import Path

    from cleaning.report import EvalConfig, measure
    from parclean.models import load_model

    organism = Path(__file__).resolve().parents[1] / "toyworld" / "models" / "v2" / "clip-badnet"
    loaded = load_model(weights=organism)
    seen = []
    loaded.model.visual.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].device.type))
    cfg = EvalConfig(data="toyworld", count=400, target="moon",
                     triggers=(Trigger(kind="badnet", patch_size=8, location="bottom_right", fixed=True, seed=11),))
    on_gpu = measure(loaded, cfg)
    assert set(seen) == {"cuda"} and next(loaded.model.parameters()).device.type == "cpu"  # moved back after
    on_cpu = measure(loaded, replace(cfg, device="cpu"))
    assert on_gpu["clean_acc"] == pytest.approx(on_cpu["clean_acc"], abs=0.5)
    assert on_gpu["asr"]["badnet"] == pytest.approx(on_cpu["asr"]["badnet"], abs=0.5)


def test_loader_workers_still_work_after_a_prefect_flow_ran_in_this_process(prefect_harness, tmp_path,
                                                                            tiny_clip_path):
    # Prefect's log and event services register exit hooks that fail in a forked child: a worker forked after any
    # flow run (the pipeline evaluates inside its flow) exited with code 1 when the loader shut it down.
    from prefect import flow

    from cleaning.report import EvalConfig, load_images

    @flow
    def any_flow() -> int:
        return 1

    assert any_flow() == 1
    folder = write_image_folder(tmp_path / "set", {"cat": 6, "dog": 6})
    cfg = EvalConfig(data=str(folder), count=12, target="dog", batch_size=4, num_workers=2, device="cpu")
    assert load_images(cfg, 32).labels.tolist() == [0] * 6 + [1] * 6
