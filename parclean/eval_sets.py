"""Named evaluation sets, provided by packages above the stages (the toy world's) through entry points.

A stage asks for an eval set by name and never imports the package that makes it. A provider declares one in
its pyproject.toml, and `pip install -e .` (which `make install` runs) registers it:

    [project.entry-points."parclean.eval_sets"]
    toyworld = "toyworld.eval_sets:labelled_eval_set"

The function takes (count, image_size) and returns the labelled images at image_size, in [0, 1], with their
class names: a LabelledImages held in memory, or any parclean.evaluate.EvalData that reads them in batches.
The toy world is the default eval set of the toy world's own models only (default_eval_set).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import open_clip

from parclean.evaluate import EvalData

ENTRY_POINT_GROUP = "parclean.eval_sets"
TOY_WORLD = "toyworld"
OPEN_CLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"

EvalSetMaker = Callable[[int, int], EvalData]


def eval_set_names() -> tuple[str, ...]:
    """The names of the registered eval sets, sorted."""
    return tuple(sorted({point.name for point in entry_points(group=ENTRY_POINT_GROUP)}))


def load_eval_set(name: str, count: int, image_size: int) -> EvalData:
    """`count` labelled images of the eval set registered as `name`, at `image_size`."""
    found = [point for point in entry_points(group=ENTRY_POINT_GROUP) if point.name == name]
    if not found:
        raise ValueError(f"no eval set named {name!r} is registered ({describe_registered()})")
    maker: EvalSetMaker = found[0].load()
    return maker(count, image_size)


def describe_registered() -> str:
    """One phrase for error messages: the registered names, or how to register them."""
    names = eval_set_names()
    if names:
        return "registered eval sets: " + ", ".join(names)
    return (f"no eval sets are registered: install the project (`make install`, or `pip install -e . --no-deps`) "
            f"so that its {ENTRY_POINT_GROUP!r} entry points are visible")


def default_eval_set(architecture: str) -> str:
    """The eval set of a config that names none: the toy world, for models that are not real CLIP architectures.

    A real architecture (one open_clip ships, or a hub model) would be measured on 10 toy shapes and the numbers
    would mean nothing, so it needs an explicit choice.
    """
    if architecture.startswith("hf-hub:") or (OPEN_CLIP_CONFIGS / f"{architecture}.json").is_file():
        raise ValueError(f"{architecture} is a real CLIP architecture and no eval data was chosen: pass an eval "
                         "config with data: IMAGEFOLDER (--eval FILE, or eval: in a pipeline config; "
                         f"docs/evaluation.md), or set data: {TOY_WORLD} to measure it on the toy world on purpose")
    return TOY_WORLD
