"""Named evaluation sets, provided by packages above the stages (the toy world's) through entry points.

A stage asks for an eval set by name and never imports the package that makes it. A provider declares one in
its pyproject.toml, and `pip install -e .` (which `make install` runs) registers it:

    [project.entry-points."parclean.eval_sets"]
    toyworld = "toyworld.render:labelled_eval_set"

The function takes (count, image_size) and returns LabelledImages: images in [0, 1] at image_size, labels, and
the class names.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from parclean.evaluate import LabelledImages

ENTRY_POINT_GROUP = "parclean.eval_sets"

EvalSetMaker = Callable[[int, int], LabelledImages]


def eval_set_names() -> tuple[str, ...]:
    """The names of the registered eval sets, sorted."""
    return tuple(sorted({point.name for point in entry_points(group=ENTRY_POINT_GROUP)}))


def load_eval_set(name: str, count: int, image_size: int) -> LabelledImages:
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
