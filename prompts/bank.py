"""Prompt banks: load and validate a YAML template bank or a plain-text caption bank."""

from __future__ import annotations

import dataclasses
import logging
import re
import string
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from parclean.paths import looked_for

logger = logging.getLogger(__name__)

PACKAGED_DIR = Path(__file__).parent / "banks"
YAML_SUFFIXES = (".yaml", ".yml")
TEXT_SUFFIXES = (".txt",)
TOP_LEVEL_KEYS = ("name", "concept", "templates", "slots")
_SLOT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class BankError(ValueError):
    """A prompt bank that cannot be used; the message names the file (and line) and the problem."""


@dataclass(frozen=True)
class Bank:
    """A prompt bank: templates over slots (YAML bank) or fixed captions (text bank)."""

    name: str
    templates: tuple[str, ...] = ()
    # Read-only view; built from any mapping in __post_init__.
    slots: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    concept: str | None = None
    captions: tuple[str, ...] = ()
    source: Path = Path("<memory>")
    # 1-based file line of each caption of a text bank (prompt ids "line{n}").
    caption_lines: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        frozen = {str(k): tuple(v) for k, v in self.slots.items()}
        object.__setattr__(self, "slots", types.MappingProxyType(frozen))
        object.__setattr__(self, "templates", tuple(self.templates))
        object.__setattr__(self, "captions", tuple(self.captions))
        object.__setattr__(self, "caption_lines", tuple(self.caption_lines))
        object.__setattr__(self, "source", Path(self.source))

    def __reduce__(self):
        # mappingproxy cannot be pickled; Prefect/Dask workers need to receive banks.
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["slots"] = dict(self.slots)
        return (_bank_from_fields, (values,))

    @property
    def concepts(self) -> tuple[str, ...]:
        """The concept slot's values, in bank order (empty without a concept)."""
        return self.slots[self.concept] if self.concept else ()


def _bank_from_fields(values: dict) -> Bank:
    return Bank(**values)


def template_slots(template: str) -> tuple[str, ...]:
    """Slot names a template uses, in order of first use; ValueError on a malformed template."""
    names: list[str] = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not _SLOT_NAME.match(name) or spec or conversion:
            raise ValueError(f"placeholder {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} must be a plain slot name like {{shape}}")
        if name not in names:
            names.append(name)
    return tuple(names)


def packaged_bank_names() -> list[str]:
    """Names of the banks shipped in prompts/banks/."""
    suffixes = YAML_SUFFIXES + TEXT_SUFFIXES
    return sorted(p.stem for p in PACKAGED_DIR.iterdir() if p.suffix in suffixes)


def load_bank(path_or_name: str | Path) -> Bank:
    """Load a bank from a file path, or a packaged bank by bare name ("toyworld", "general")."""
    path = _resolve(path_or_name)
    if path.suffix in YAML_SUFFIXES:
        return _load_yaml_bank(path)
    if path.suffix in TEXT_SUFFIXES:
        return _load_text_bank(path)
    raise BankError(f"{path}: unknown bank type {path.suffix!r}; use .yaml/.yml (templates) or .txt (captions)")


def _resolve(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if path.is_file():
        return path
    if isinstance(path_or_name, str) and len(path.parts) == 1:
        candidates = [PACKAGED_DIR / path_or_name] if path.suffix else []
        candidates += [PACKAGED_DIR / f"{path_or_name}{s}" for s in YAML_SUFFIXES + TEXT_SUFFIXES]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    where = looked_for(path) if len(path.parts) > 1 or path.suffix else ""
    raise BankError(
        f"{path}: prompt bank not found{where}; give a .yaml/.txt path or a packaged bank name "
        f"({', '.join(packaged_bank_names())})"
    )


def _load_text_bank(path: Path) -> Bank:
    captions: list[str] = []
    lines: list[int] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(_read_text(path).splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if text in first_line:
            raise BankError(f"{path}: line {number}: duplicate caption {text!r} (first on line {first_line[text]})")
        first_line[text] = number
        captions.append(text)
        lines.append(number)
    if not captions:
        raise BankError(f"{path}: no captions (one caption per line; blank lines and # comments are ignored)")
    return Bank(name=path.stem, captions=tuple(captions), caption_lines=tuple(lines), source=path)


def _load_yaml_bank(path: Path) -> Bank:
    try:
        root = yaml.compose(_read_text(path), Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        raise BankError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(root, yaml.MappingNode):
        raise BankError(f"{path}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    top = _mapping(path, root, "top level")
    unknown = [key for key in top if key not in TOP_LEVEL_KEYS]
    if unknown:
        key_line = _line(top[unknown[0]][0])
        raise BankError(f"{path}: line {key_line}: unknown key {unknown[0]!r}; known: {', '.join(TOP_LEVEL_KEYS)}")
    if "templates" not in top:
        raise BankError(f"{path}: missing 'templates' (a list of caption templates like \"a {{color}} {{shape}}\")")
    slots = _read_slots(path, top["slots"][1]) if "slots" in top else {}
    template_lines = _read_templates(path, top["templates"][1], slots)
    concept = _read_concept(path, top["concept"][1], slots, template_lines) if "concept" in top else None
    name = _scalar(path, top["name"][1], "name") if "name" in top else path.stem
    unused = [slot for slot in slots if not any(slot in template_slots(t) for t in template_lines)]
    if unused:
        logger.warning("%s: slot(s) %s used by no template", path, ", ".join(unused))
    return Bank(name=name, templates=tuple(template_lines), slots=slots, concept=concept, source=path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BankError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _mapping(path: Path, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """Keys of a mapping node to (key node, value node); rejects duplicate and non-text keys."""
    if not isinstance(node, yaml.MappingNode):
        raise BankError(f"{path}: line {_line(node)}: {what} must be a mapping")
    items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = _scalar(path, key_node, f"a key in {what}")
        if key in items:
            raise BankError(f"{path}: line {_line(key_node)}: duplicate key {key!r} in {what}")
        items[key] = (key_node, value_node)
    return items


def _scalar(path: Path, node: yaml.Node, what: str) -> str:
    # Scalars are taken as the text written, so `yes` or `1` stay words, never booleans or numbers.
    if not isinstance(node, yaml.ScalarNode) or node.value == "":
        raise BankError(f"{path}: line {_line(node)}: {what} must be non-empty text")
    return node.value


def _read_slots(path: Path, node: yaml.Node) -> dict[str, tuple[str, ...]]:
    slots: dict[str, tuple[str, ...]] = {}
    for name, (key_node, value_node) in _mapping(path, node, "slots").items():
        if not _SLOT_NAME.match(name):
            raise BankError(f"{path}: line {_line(key_node)}: slot name {name!r} must be a word (letters, digits, _)")
        if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
            raise BankError(f"{path}: line {_line(key_node)}: slot {name!r} needs a non-empty list of values")
        values: list[str] = []
        for item in value_node.value:
            value = _scalar(path, item, f"a value of slot {name!r}")
            if value in values:
                raise BankError(f"{path}: line {_line(item)}: slot {name!r} lists {value!r} twice")
            values.append(value)
        slots[name] = tuple(values)
    return slots


def _read_templates(path: Path, node: yaml.Node, slots: Mapping[str, tuple[str, ...]]) -> dict[str, int]:
    """Templates, in order, each to its file line."""
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise BankError(f"{path}: line {_line(node)}: 'templates' needs a non-empty list of templates")
    templates: dict[str, int] = {}
    for item in node.value:
        template = _scalar(path, item, "a template")
        try:
            used = template_slots(template)
        except ValueError as err:
            raise BankError(f"{path}: line {_line(item)}: template {template!r}: {err}") from None
        missing = [slot for slot in used if slot not in slots]
        if missing:
            raise BankError(
                f"{path}: line {_line(item)}: template {template!r} uses undefined slot(s) "
                f"{', '.join(missing)}; defined slots: {', '.join(slots) or 'none'}"
            )
        if template in templates:
            raise BankError(f"{path}: line {_line(item)}: template {template!r} is listed twice")
        templates[template] = _line(item)
    return templates


def _read_concept(path: Path, node: yaml.Node, slots: Mapping[str, tuple[str, ...]],
                  template_lines: dict[str, int]) -> str:
    concept = _scalar(path, node, "concept")
    if concept not in slots:
        raise BankError(
            f"{path}: line {_line(node)}: concept {concept!r} is not a slot; slots: {', '.join(slots) or 'none'}"
        )
    # A caption without its concept would be counted toward a concept it does not show.
    for template, line in template_lines.items():
        if concept not in template_slots(template):
            raise BankError(f"{path}: line {line}: template {template!r} does not use the concept slot {{{concept}}}")
    return concept
