"""bench/import_graph.py read on our own source: imports run downward only (docs/architecture.md), no cycles."""

from __future__ import annotations

from bench.import_graph import cycles, graph, package_edges

# What each package may import (besides itself); docs/architecture.md draws the same floors.
ALLOWED = {
    "parclean": set(),
    "prompts": {"parclean"},
    "generation": {"parclean", "prompts"},
    "cleaning": {"parclean"},
    "toyworld": {"parclean", "prompts", "generation", "cleaning"},
    "bench": {"parclean", "prompts", "generation", "cleaning", "toyworld"},
    "flows": {"parclean", "prompts", "generation", "cleaning"},
}


def test_every_package_imports_only_the_floors_below_it():
    edges = package_edges(graph())
    upward = {package: sorted(targets - ALLOWED[package]) for package, targets in edges.items()
              if package in ALLOWED and targets - ALLOWED[package]}
    assert upward == {}


def test_no_module_outside_the_tests_is_part_of_an_import_cycle():
    modules = {name: targets for name, targets in graph().items() if not name.startswith("tests")}
    assert cycles(modules) == []
