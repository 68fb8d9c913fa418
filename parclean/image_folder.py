"""An ImageFolder eval set (ROOT/CLASS/IMAGE), decoded batch by batch through a DataLoader.

Only the file list is held; images are decoded, resized (bicubic, shorter side) and centre-cropped to the
model's input size in the loader (and its workers), one batch at a time. Class names come from the config, or
the folder names; folders named by ImageNet WordNet ids (n01440764, ...) get ImageNet's class names
(parclean/imagenet.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from parclean.imagenet import imagenet_classnames, imagenet_wnids, wnid_indices
from parclean.loader_workers import worker_context

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class DecodedImages(Dataset):
    """(image (3, S, S) in [0, 1], label) for each (path, label), decoded when asked for."""

    def __init__(self, files: list[tuple[Path, int]], image_size: int) -> None:
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize, ToTensor

        self.files = files
        self.transform = Compose([Resize(image_size, interpolation=InterpolationMode.BICUBIC),
                                  CenterCrop(image_size), ToTensor()])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.files[index]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), label
        except OSError as err:
            raise ValueError(f"{path}: unreadable image ({err})") from None


@dataclass(frozen=True)
class ImageFolderSet:
    """An ImageFolder eval set read in batches (parclean.evaluate.EvalData)."""

    dataset: Dataset
    classnames: tuple[str, ...]
    num_workers: int = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = min(self.num_workers, -(-len(self) // batch_size))  # no idle workers on a small set
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            multiprocessing_context=worker_context() if workers else None)
        try:
            yield from loader
        except ValueError as err:  # from a worker, the message ends with the original one-line error
            raise ValueError(str(err).strip().splitlines()[-1].removeprefix("ValueError: ")) from None


def image_folder(root: str | Path, image_size: int, *, count: int, seed: int = 0,
                 classnames: str | tuple[str, ...] | None = None, num_workers: int = 0) -> ImageFolderSet:
    """At most `count` images of ROOT/CLASS/IMAGE (a seeded choice, kept in folder order), at `image_size`.

    classnames: None (the folder names; ImageNet WordNet ids become ImageNet's names), "imagenet" (all 1,000
    classes), or one name per class folder in sorted order.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: evaluation image folder not found (expected CLASS/IMAGE files)")
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    if not folders:
        raise ValueError(f"{root}: no class sub-folders (expected CLASS/IMAGE files)")
    names, labels = folder_classes(root, [d.name for d in folders], classnames)
    files = [(f, label) for d, label in zip(folders, labels, strict=True) for f in sorted(d.iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"{root}: no images in the class folders ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(files) > count:
        files = [files[i] for i in sorted(np.random.default_rng(seed).permutation(len(files))[:count])]
    return ImageFolderSet(DecodedImages(files, image_size), names, num_workers)


def folder_classes(root: Path, folders: list[str], classnames: str | tuple[str, ...] | None
                   ) -> tuple[tuple[str, ...], list[int]]:
    """(the class names, each sorted folder's label)."""
    wnids = wnid_indices(folders)
    if classnames == "imagenet":
        if wnids is not None:
            return imagenet_classnames(), wnids
        if len(folders) == len(imagenet_wnids()):
            return imagenet_classnames(), list(range(len(folders)))
        raise ValueError(f"{root}: classnames: imagenet needs ImageNet WordNet-id folders (n01440764, ...) or all "
                         f"1000 class folders in the standard order; found {len(folders)} folders such as "
                         f"{folders[0]!r}")
    if isinstance(classnames, str):
        raise ValueError(f"classnames: {classnames!r} is not a class-name set; use imagenet, or a list of names")
    if classnames is None:
        all_names = imagenet_classnames()
        classnames = tuple(all_names[i] for i in wnids) if wnids else tuple(d.replace("_", " ") for d in folders)
    if len(classnames) != len(folders):
        raise ValueError(f"{root}: {len(folders)} class folders but {len(classnames)} class names in the config")
    return tuple(classnames), list(range(len(folders)))
