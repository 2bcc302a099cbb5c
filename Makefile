# The two commands a new machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROJECT ?= projects/demo

.PHONY: install run test lint bench soak check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	@echo "Serving $(PROJECT) (Ctrl+C stops it)"
	$(BIN)/appliance serve $(PROJECT)

check: install
	$(BIN)/appliance check $(PROJECT)

test: install
	$(BIN)/python -m pytest -m "not soak" -q

lint: install
	$(BIN)/ruff check appliance tests bench examples
	$(BIN)/mypy appliance

bench: install
	$(BIN)/python bench/hot_path.py

soak: install
	$(BIN)/python -m pytest -m soak -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
