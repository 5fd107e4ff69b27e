# civt-cache: every target works from a fresh clone with nothing but Python 3 installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/civt-cache
STAMP  := $(VENV)/.installed
PIPELINE ?= pipelines/demo.toml
PYTEST_ARGS ?=
# extra flags for the CLI targets, e.g. make train-student ARGS=--resume
ARGS ?=

.PHONY: setup test test-slow rehearsal timm-tests demo demo-classes prepare reproduce cache-teachers train-student bench bench-imagenet bench-scale bench-threads gpu-check clean

setup: $(STAMP)

# Reinstall only when the package definition changes: a second `make setup` is instant.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The test suite in two tiers: `make test` (incl. a local S3 server) and the slow tier (the soak,
# kill and whole-cache fault tests); CI runs both. Every test process runs one intra-op thread
# (tests/conftest.py), so the tests are spread over TEST_WORKERS processes (pytest-xdist): the
# fast tier a file per worker at a time (a file's module fixtures are built once), the slow tier
# (few files, long tests) a test at a time. On 2 idle cores from a fresh clone: make test 483 s
# (852 s in one process), make test-slow 294 s (512 s).
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow -n $(TEST_WORKERS) --dist load $(PYTEST_ARGS)

# The job in its real shape, in miniature on the CPU (tests/test_rehearsal.py): NODES torchrun
# nodes on loopback x RANKS ranks x 2 loader workers, uneven shards and the cache in a local S3
# server; stage one with claims and a node killed, stage two with a rank killed and the group
# restarted, checked against uninterrupted runs. Part of test-slow; NODES=2 RANKS=8 on a bigger machine.
NODES ?= 2
RANKS ?= 2
rehearsal: setup
	NODES=$(NODES) RANKS=$(RANKS) $(PY) -m pytest -q -m slow tests/test_rehearsal.py --durations=0 $(PYTEST_ARGS)

# timm's own model tests (tests/test_models.py of a timm checkout of the installed version) on
# every rednet* and civt* model: make timm-tests TIMM_SRC=/path/to/pytorch-image-models
TIMM_SRC ?=
timm-tests: setup
	@test -n "$(TIMM_SRC)" || { echo "give TIMM_SRC=/path/to/a/timm/checkout"; exit 2; }
	rm -rf build/timm-tests && mkdir -p build/timm-tests/tests
	cp $(TIMM_SRC)/tests/test_models.py build/timm-tests/tests/
	cp tests/timm_models_conftest.py build/timm-tests/conftest.py
	cd build/timm-tests && $(abspath $(PY)) -m pytest -q tests/test_models.py -k "rednet or civt" -p no:cacheprovider -W ignore

demo: setup
	$(PY) -m civt_cache.demo --pipeline $(PIPELINE) $(ARGS)

# Top-k where k < classes: 100 classes of digit pairs, caches at k = 1, 5, 10, 100 and online
# teachers, students over 3 seeds (civt_cache/topk_study.py; about two hours on 2 cores;
# ARGS="--topk 1 10 --seeds 0 1" about 45 minutes once the teachers exist). docs/fidelity.md.
demo-classes: setup
	$(PY) -m civt_cache.topk_study --pipeline pipelines/digit-pairs.toml $(ARGS)

# The demo pipeline's shards and teachers come from the demo itself (made once, then reused),
# so `make cache-teachers` works from a fresh clone; other pipelines name their own files.
prepare: setup
	@if [ "$(PIPELINE)" = "pipelines/demo.toml" ]; then $(PY) -m civt_cache.demo --pipeline $(PIPELINE) --prepare; fi

# The demo's ablation over 3 student seeds (one cache serves them all): mean +- std table and plot.
reproduce: setup
	$(PY) -m civt_cache.demo --pipeline $(PIPELINE) --seeds 0 1 2 --out runs/digits-3seeds

cache-teachers: prepare
	$(CLI) cache-teachers --pipeline $(PIPELINE) $(ARGS)

train-student: prepare
	$(CLI) train-student --pipeline $(PIPELINE) $(ARGS)

# Intra-op threads chosen by civt-cache against torch's default, idle and beside a busy core.
bench-threads: prepare
	$(CLI) bench threads --pipeline $(PIPELINE)

bench: setup
	$(CLI) bench views
	$(CLI) bench cache --pipeline $(PIPELINE)
	$(CLI) bench student --pipeline $(PIPELINE)

# Both stages at 224 px on synthetic ImageNet-shaped shards (1000 classes, ~100 KB JPEGs) with
# RegNetY-600MF + RedNet-26; SAMPLES=256 takes about 8 minutes on 2 CPU cores.
SAMPLES ?= 256
bench-imagenet: setup
	$(CLI) bench imagenet --samples $(SAMPLES)

# ImageNet's counts without its compute at fractions of them (1,281,167 samples, 1,025 shards,
# 30,750 units per teacher): each operation's time, peak RSS and growth exponent, and the cache in a
# local S3 server with 4 claiming processes (requests counted at the server). The slow tier runs
# it at 1/256 and 1/64 and fails on a growth exponent over 1.2 (tests/test_scale.py).
FRACTIONS ?= 0.015625 0.0625 0.25
bench-scale: setup
	$(CLI) bench scale --s3 $(foreach f,$(FRACTIONS),--fraction $(f))

# On a GPU machine without network access whose python3 already holds torch, timm, typer, tqdm
# and pytest: the packages it lacks come as wheels in $(WHEELS) (fetched on a networked machine
# with `pip download --no-deps --only-binary=:all: -d .whl zarr numcodecs webdataset 'pillow<13' ...`),
# installed into $(GPU_SITE) only; the package runs from the checkout. Then the view engine's CUDA
# tests (CUDA vs PIL, CUDA vs CPU) and the GPU rows of the benchmarks at batch 256 with 4 workers,
# in about 8 minutes.
GPU_PY   ?= python3
WHEELS   ?= .whl
GPU_SITE ?= .gpu-site
GPU_ENV  := PYTHONPATH=$(abspath $(GPU_SITE)):$(CURDIR)
gpu-check:
	@ls $(WHEELS)/*.whl >/dev/null || { echo "no wheels in $(WHEELS): download the wheels of zarr, numcodecs, webdataset and pillow<13 there first (see docs/benchmarks.md)"; exit 2; }
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl
	$(GPU_ENV) $(GPU_PY) -m pytest -q -p no:cacheprovider tests/test_view_engine.py tests/test_engine_batching.py
	$(GPU_ENV) $(GPU_PY) -m civt_cache.cli bench views --samples 1024 --batch 256 --device cuda --repeats 3
	$(GPU_ENV) $(GPU_PY) -m civt_cache.cli bench imagenet --samples 2560 --device cuda --workers 4 --teacher-batch 256 --student-batch 256 --steps 6 --no-online

clean:
	rm -rf runs data build
