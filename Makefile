# parclean: the README's commands. `make demo` and `make test` install into .venv first.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: install demo test test-slow lint

install: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: install
	.venv/bin/parclean demo

# Two workers, one file each at a time (a file's fixtures are built once): the 2-core machine runs the suite in
# 7 min 40 s instead of 13 min 30 s on one (docs/benchmarks.md, "Test suite").
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	.venv/bin/ruff check .
