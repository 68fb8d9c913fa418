"""ImageNet-1k for zero-shot evaluation: class names, WordNet ids and prompt templates, all shipped offline.

The class names and templates are open_clip's (`zero_shot_metadata.py`: OpenAI's CLIP notebook's cleaned names
and its 80 templates); the WordNet ids are timm's list (`timm.data.ImageNetInfo`, installed with open_clip). The
standard class order is the sorted WordNet ids, which is the order of both lists: an ImageNet folder whose
sub-folders are WordNet ids (n01440764/...) maps to class i by its id's place in that order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import open_clip

WNID = re.compile(r"n\d{8}")
CLASSNAME_SETS = ("imagenet",)
TEMPLATE_SETS = ("openai", "simple")


def imagenet_classnames() -> tuple[str, ...]:
    """The 1,000 ImageNet class names in the standard (sorted WordNet id) order."""
    return tuple(open_clip.IMAGENET_CLASSNAMES)


def named_templates(name: str) -> tuple[str, ...]:
    """A named template set as format strings: openai (CLIP's 80 ImageNet prompts) or simple (its 7)."""
    sets = {"openai": open_clip.OPENAI_IMAGENET_TEMPLATES, "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES}
    if name not in sets:
        raise ValueError(f"templates: {name!r} is not a template set; use {' or '.join(TEMPLATE_SETS)}, or a list "
                         "of strings with {}")
    # open_clip keeps them as functions of the class name; called with "{}" they are format strings again.
    return tuple(template("{}") for template in sets[name])


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in the standard order."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo("imagenet-1k").label_names())


def wnid_indices(names: Sequence[str]) -> list[int] | None:
    """Each name's ImageNet class index when every name is an ImageNet-1k WordNet id, else None."""
    if not names or not all(WNID.fullmatch(name) for name in names):
        return None
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    if not all(name in index for name in names):
        return None
    return [index[name] for name in names]
