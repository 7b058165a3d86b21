# force-compress: every target runs inside the project's virtual environment ($(VENV)).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FC := $(BIN)/force-compress

# `make compress` knobs; empty ones fall back to CompressConfig's defaults (pipeline/config.py).
MODEL ?= models/resnet18.onnx
SPARSITY ?=
METHOD ?=
STRUCTURE ?=
BUDGET ?=
TARGET_LATENCY ?=
LATENCY_BATCH ?=
WEIGHT_SPARSITY ?=
CHANNEL_RANKING ?=
QUANTIZE ?=
DATA ?=
EPOCHS ?=
MAX_STEPS ?=
DEVICE ?=
NPROC ?=
REGISTRY ?=
PREPROCESSING ?=
RECIPE ?=
QUICK ?=
# `make sweep` knobs (and the ones above, less SPARSITY and METHOD); empty ones: the sweep command's defaults.
SPARSITIES ?=
METHODS ?=
MAX_DROP ?=
JOBS ?=

.PHONY: install test lint bench bench-masks bench-train bench-accuracy bench-extremes bench-structured bench-trained bench-data gpu-check fault-cases timm-zoo bench-vit compress sweep serve clean distclean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: bench-masks bench-train

bench-masks: install
	$(BIN)/python benchmarks/bench_masks.py

bench-train: install
	$(BIN)/python benchmarks/bench_train.py

bench-accuracy: install
	QUICK=$(QUICK) $(BIN)/python benchmarks/bench_accuracy.py

bench-extremes: install
	QUICK=$(QUICK) $(BIN)/python benchmarks/bench_extremes.py

bench-structured: install
	QUICK=$(QUICK) $(BIN)/python benchmarks/bench_structured.py
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_peer.py

bench-trained: install
	QUICK=$(QUICK) $(BIN)/python benchmarks/bench_trained.py

bench-vit: install
	$(BIN)/python benchmarks/bench_vit.py

bench-data: install
	QUICK=$(QUICK) $(BIN)/python benchmarks/bench_data.py

# 40 bad inputs and faults through the real CLI: exit code, --json answer, first line, what is left behind
fault-cases: install
	$(BIN)/python benchmarks/fault_cases.py

# every timm family (its smallest model) exported three ways and compressed by the CLI: about 1.5 h on two cores
timm-zoo: install
	$(BIN)/python benchmarks/timm_zoo.py

# masks, a training epoch and validation of resnet50 at 224 on CUDA over a synthetic folder; skips without a GPU
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

# Any torchvision architecture at initialization, 10 classes at 32x32 (the digits default):
# `make compress MODEL=resnet50.onnx` creates resnet50.onnx first when it does not exist.
%.onnx: | install
	$(FC) export-model $(basename $(notdir $@)) --out $@ --num-classes 10 --input-size 32 32

compress: install $(MODEL)
	$(FC) compress $(MODEL) $(if $(SPARSITY),--sparsity $(SPARSITY)) \
		$(if $(METHOD),--method $(METHOD)) $(if $(STRUCTURE),--structure $(STRUCTURE)) $(if $(BUDGET),--budget $(BUDGET)) $(if $(DATA),--data $(DATA)) \
		$(if $(TARGET_LATENCY),--target-latency $(TARGET_LATENCY)) $(if $(LATENCY_BATCH),--latency-batch $(LATENCY_BATCH)) \
		$(if $(WEIGHT_SPARSITY),--weight-sparsity $(WEIGHT_SPARSITY)) $(if $(CHANNEL_RANKING),--channel-ranking $(CHANNEL_RANKING)) \
		$(if $(QUANTIZE),--quantize $(QUANTIZE)) $(if $(PREPROCESSING),--preprocessing $(PREPROCESSING)) \
		$(if $(RECIPE),--recipe $(RECIPE)) $(if $(MAX_DROP),--max-drop $(MAX_DROP)) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(MAX_STEPS),--max-steps $(MAX_STEPS)) \
		$(if $(DEVICE),--device $(DEVICE)) $(if $(NPROC),--nproc $(NPROC)) $(if $(REGISTRY),--registry $(REGISTRY))

# One cell per method and sparsity, the Pareto table and plot in runs/sweep-*/, the sparsest passing model published.
sweep: install $(MODEL)
	$(FC) sweep $(MODEL) $(if $(SPARSITIES),--sparsities $(SPARSITIES)) $(if $(METHODS),--methods $(METHODS)) \
		$(if $(MAX_DROP),--max-drop $(MAX_DROP)) $(if $(JOBS),--jobs $(JOBS)) \
		$(if $(STRUCTURE),--structure $(STRUCTURE)) $(if $(BUDGET),--budget $(BUDGET)) $(if $(DATA),--data $(DATA)) $(if $(QUANTIZE),--quantize $(QUANTIZE)) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(DEVICE),--device $(DEVICE)) $(if $(NPROC),--nproc $(NPROC)) \
		$(if $(REGISTRY),--registry $(REGISTRY))

serve: install
	$(FC) serve

# `make clean` removes only what the tools rebuild: run directories (runs/, including resumable checkpoints and the
# benchmarks' work under runs/bench_*), the test/lint caches and Python bytecode. It never touches registry/
# (published models) or models/ (input models). `make distclean` also removes the virtual environment ($(VENV)).
clean:
	rm -rf runs .pytest_cache .ruff_cache .import_linter_cache
	find force_core pipeline stages flows tests benchmarks -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
