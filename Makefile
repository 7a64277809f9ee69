# hpcdeconv: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use. TORCH_SPEC lets a GPU cluster install its own CUDA build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: venv demo test lint format clean bench-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: venv
	mkdir -p $(DEMO_DIR)
	$(VENV)/bin/hpcdeconv simulate --config configs/simulate_microtubules.yaml $(DEMO_DIR)/data.zarr --png $(DEMO_DIR)/data.png --overwrite
	$(VENV)/bin/hpcdeconv psf --config configs/psf_born_wolf.yaml --out $(DEMO_DIR)/psf.tif --png $(DEMO_DIR)/psf.png --log --overwrite
	$(VENV)/bin/hpcdeconv info $(DEMO_DIR)/data.zarr
	$(VENV)/bin/hpcdeconv train --config configs/blind.yaml --set data.path=$(DEMO_DIR)/data.zarr --output $(DEMO_DIR)/runs/blind --overwrite
	$(VENV)/bin/hpcdeconv predict --checkpoint $(DEMO_DIR)/runs/blind $(DEMO_DIR)/data.zarr/blurred/test000 --output $(DEMO_DIR)/deconvolved.tif --truth $(DEMO_DIR)/data.zarr/sharp/test000 --png $(DEMO_DIR)/deconvolved.png --overwrite
	@echo "figures: $(DEMO_DIR)/data.png $(DEMO_DIR)/psf.png $(DEMO_DIR)/deconvolved.png $(DEMO_DIR)/runs/blind/psf/psf_learned.png"

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-deps: venv
	$(PY) -m pip install -q -e ".[dev,bench]"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
