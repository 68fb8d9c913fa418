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

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	.venv/bin/ruff check .
