# `make demo` and `make test` are the only two commands a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-slow bench eval-prior clean

setup: $(VENV)/.installed

# A user's machine that already has torch (e.g. a CUDA build) keeps it: the venv then sees the
# system site-packages. Elsewhere the CPU wheel torch==2.13.0 is installed first, and a
# constraint file pins it so no later dependency pulls the multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "setup: keeping the existing torch $$($(PYTHON) -c 'import torch;print(torch.__version__)')"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	@if command -v npm >/dev/null; then npm install --silent --no-audit --no-fund --prefix .tools/gltf gltf-validator@2.0.0-dev.3.10 \
	  || echo "setup: npm could not install gltf-validator; its test will be skipped"; \
	else echo "setup: no npm; the Khronos glTF validator test will be skipped"; fi
	@if command -v npm >/dev/null; then npm install --silent --no-audit --no-fund --prefix .tools/viewer \
	  @sparticuz/chromium@147 puppeteer-core@24 three@0.187 \
	  || echo "setup: npm could not install the headless-Chromium viewer; its test will be skipped"; fi
	@touch $@

demo: setup
	$(VENV)/bin/text23d experiment=demo

# Two workers (pytest-xdist), one per core, one thread each: OpenMP threads that outnumber the
# cores spin and slow everything down (the built-in prior's DreamFusion test: 442 s instead of 75 s).
JOBS ?= 2

test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -m "not slow" -q -n $(JOBS)

test-slow: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -m slow -q -n $(JOBS)

bench: setup
	$(PY) scripts/bench.py

# The built-in prior's whole evaluation: 12 prompts x 3 seeds, judged on the exported GLB files
# (about an hour on 2 cores); writes outputs/eval/eval.json and the model card's table.
eval-prior: setup
	$(PY) scripts/eval_prior.py --seeds 0 1 2 --update-card

clean:
	rm -rf $(VENV) .tools outputs/* .pytest_cache
