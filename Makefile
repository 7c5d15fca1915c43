# Two commands do all the set-up on a fresh machine:
#   make demo   - virtual environment, install, `supcon compare` on the bundled digits
#   make test   - virtual environment, install, ruff check + format check, pytest
PY ?= python3
VENV ?= .venv
# The tested torch. Installed only when no torch is importable; a user's own torch (a CUDA build,
# say) is kept: if the base interpreter already imports torch, the venv sees it.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test quick lint format bench clean

$(BIN)/.installed: pyproject.toml Makefile
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "using the installed torch: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
		echo "creating the virtualenv $(VENV) (it sees that torch)"; \
		$(PY) -m venv --system-site-packages $(VENV); \
	else \
		echo "creating the virtualenv $(VENV)"; \
		$(PY) -m venv $(VENV); \
	fi
	@# The two installs are the long part: pip's own progress shows, not -q.
	@$(BIN)/python -c "import torch" 2>/dev/null || { \
		echo "installing $(TORCH): about 750 MB installed for the CPU build, several times that for a CUDA build"; \
		$(BIN)/python -m pip install "$(TORCH)"; }
	@echo "installing supcon and its test tools (pytest, ruff, onnx, faiss, tensorboard, pyarrow; about 200 MB)"
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $@

setup: $(BIN)/.installed

demo: setup
	@echo "supcon compare on the bundled digits: 50 + 50 + 50 epochs, about 15 seconds on 2 CPU cores"
	$(BIN)/supcon compare --dataset digits --out runs/demo --overwrite

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest --durations=10

# The edit-test loop: everything but the slow end-to-end tests (`make test` runs them all).
quick: setup
	$(BIN)/python -m pytest -m "not slow" -x

bench: setup
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/speed/loss.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
