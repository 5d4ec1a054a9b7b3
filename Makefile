# The two commands: `make run` and `make test`. Both set everything up on a fresh machine.
# Every package comes from the lock files in requirements/, by version and sha256 (see
# requirements/supply_chain.py); after changing a dependency in pyproject.toml, `make lock`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama.cpp's native build picks AMX on these CPUs and segfaults at the first decode; pin the ISA.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# Hash-checked, wheels only except the packages published only as sdists: llama-cpp-python, and
# three of lm-eval's (test only). They are built with the locked build tools already in the venv,
# rather than in an isolated environment pip would fill without hashes.
SDISTS := llama-cpp-python,rouge-score,sqlitedict,word2number
INSTALL := $(BIN)/python -m pip install --quiet --require-hashes --only-binary :all: \
	--no-binary $(SDISTS) --no-build-isolation
# llmrouter itself, editable: built by the locked hatchling, its dependencies already installed.
INSTALL_SELF := $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
SUPPLY_CHAIN := requirements/supply_chain.py

.PHONY: run test lint typecheck unit bench lock clean

# pip, the build backends and uv, from requirements/build.txt (with the venv's own pip).
$(BIN)/.installed-build: requirements/build.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --only-binary :all: -r requirements/build.txt
	touch $@

$(BIN)/.installed-run: $(BIN)/.installed-build requirements/run.txt pyproject.toml
	$(PYTHON) $(SUPPLY_CHAIN) check-lock
	$(INSTALL) -r requirements/run.txt
	$(INSTALL_SELF)
	$(BIN)/python $(SUPPLY_CHAIN) check-pth
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed-build requirements/test.txt pyproject.toml
	$(PYTHON) $(SUPPLY_CHAIN) check-lock
	$(INSTALL) -r requirements/test.txt
	$(INSTALL_SELF)
	$(BIN)/python $(SUPPLY_CHAIN) check-pth
	touch $@ $(BIN)/.installed-run

run: $(BIN)/.installed-run
	$(BIN)/llmrouter serve

lint: $(BIN)/.installed-test
	$(BIN)/ruff check src tests bench requirements
	$(BIN)/ruff format --check src tests bench requirements

typecheck: $(BIN)/.installed-test
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest

bench: $(BIN)/.installed-test
	$(BIN)/python bench/run.py

# Re-resolve requirements/*.txt from pyproject.toml and requirements/build.in, keeping every
# version already locked that still fits; `make lock UPGRADE=1` moves them all to the newest.
lock: $(BIN)/.installed-build
	$(BIN)/python $(SUPPLY_CHAIN) lock --uv $(BIN)/uv $(if $(UPGRADE),--upgrade)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
