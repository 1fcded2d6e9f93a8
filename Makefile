# hpc_bkd — the two commands: `make run` (install + default job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
NP     ?= 2
RUN_DIR ?= runs/default

.PHONY: install run run-mpi lint test test-fast bench bench-quick bench-paper-scale bench-select bench-select-paper-scale bench-int8 bench-data bench-modern modern-table gpu-check slurm-up slurm-down clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[mpi,test,export,prune,timm,tracking]'
	touch $@

install: $(VENV)/.installed  ## create .venv with torch (pinned), mpi4py + MPICH, submitit, pytest, ONNX export, TensorBoard + MLflow

run: install  ## install, then run the default job (VGG16 teacher on bundled digits) as one rank
	$(PY) -m hpc_bkd run --run-dir $(RUN_DIR)

run-mpi: install  ## the default job across NP ranks with the bundled MPICH
	$(VENV)/bin/mpirun -np $(NP) $(PY) -m hpc_bkd run --run-dir $(RUN_DIR)-np$(NP)

lint: install  ## ruff (lint + import order) on the code, tools and tests; mypy on the library and tools
	$(VENV)/bin/ruff check hpc_bkd benchmarks tests
	$(VENV)/bin/mypy hpc_bkd benchmarks

test: lint  ## lint, then the whole suite (starts and stops a local SLURM when run as root)
	$(PY) -m pytest -q tests

test-fast: install  ## skip the slow tier
	$(PY) -m pytest -q -m "not slow" tests

bench: install  ## benchmark: 1 vs 2 ranks, paper schedule, end-to-end KD, then inference speed; tables + JSON + PNG
	$(PY) -m benchmarks.bench --out bench/results --repeat 3
	$(PY) -m benchmarks.inference --out bench/results/inference --run-dir bench/results/runs/pbkd-1-r1
	$(PY) -m benchmarks.select_bench --out bench/results/select --budgets 0.89,0.9,0.93,0.96 \
	  --set blocks.candidates=separable-d1,lowrank-r0.25,separable-d2 \
	  --set select.objective=quality --set select.budget_unit=fraction

# Scaling before every stop (issue 20): 1 vs 2 ranks of the default job (short), the real-work ceiling and
# the heartbeat's CPU, each target MET/MISS; 2 min 24 s on the idle 2-core AMD EPYC VM.
bench-quick: install  ## 1 vs 2 ranks with the heartbeat on, the real-work ceiling, heartbeat CPU: MET/MISS in ~2.5 min
	$(PY) -m benchmarks.bench --out bench/results-quick --ranks 2 --scaling-only \
	  --set teacher.epochs=2 --set distill.epochs=3 --set finetune.epochs=0

# The schedule comparison on the workload the paper and issue #4 describe: a full-width VGG16-BN
# (64-512 channels) at 32x32, batch 64; 2 distillation epochs, no fine-tuning, no KD baseline.
bench-paper-scale: install  ## 1-rank PBKD vs the paper's sequential schedule (and 2 ranks) on full-width VGG16
	$(PY) -m benchmarks.bench --out bench/results-paper-scale --ranks 1,2 --no-kd --repeat 3 \
	  --set model.width=1.0 --set teacher.epochs=3 --set teacher.lr=0.01 --set distill.epochs=2 --set finetune.epochs=0

# Latency-aware selection (#14): train the shipped candidates once, choose under each budget, fine-tune
# and measure each student whole; also 1 vs all candidates' distillation time and the cost measurement's share.
bench-select: install  ## candidates trained once, students chosen at several budgets: accuracy vs measured latency
	$(PY) -m benchmarks.select_bench --out bench/results-select --budgets 0.89,0.9,0.93,0.96 \
	  --set blocks.candidates=separable-d1,lowrank-r0.25,separable-d2 \
	  --set select.objective=quality --set select.budget_unit=fraction

bench-select-paper-scale: install  ## the same on full-width VGG16-BN at 32x32 (the paper-scale workload)
	$(PY) -m benchmarks.select_bench --out bench/results-select-paper-scale --budgets 0.3,0.35,0.4,0.5,0.6 \
	  --set blocks.candidates=separable-d1,lowrank-r0.25,separable-d2 --set select.latency_batches=64 \
	  --set select.objective=quality --set select.budget_unit=fraction \
	  --set model.width=1.0 --set teacher.epochs=3 --set teacher.lr=0.01 --set distill.epochs=2 --set finetune.epochs=3

# int8 per block (#23): the default job choosing among fp32 and int8 options timed in ONNX Runtime, then its
# exported student against the teacher in fp32 and the whole teacher in int8, at batch 1 and 64, 1 thread.
bench-int8: install  ## the default job with int8 options; exported student vs fp32 and int8 teacher (ONNX Runtime)
	$(PY) -m hpc_bkd run --run-dir bench/results-int8/run --set 'select.precisions=[fp32,int8]' --set run.export=true
	$(PY) -m benchmarks.int8_bench --run-dir bench/results-int8/run --out bench/results-int8 --threads 1 --rounds 30
	$(PY) -m benchmarks.int8_predict --run-dir bench/results-int8/run --out bench/results-int8 --threads 1

bench-data: install  ## streaming input: images/s by workers vs a ResNet18-at-224 rank, RSS 5k vs 20k images, data wait
	$(PY) -m benchmarks.data_bench --out bench/results-data

gpu-check: install  ## on a CUDA GPU: default job, streaming bench, precision modes, inference; one JSON (< 8 min)
	$(PY) -m benchmarks.gpu_check --out bench/results-gpu

slurm-up:
	bash tests/cluster/local-slurm.sh start

slurm-down:
	bash tests/cluster/local-slurm.sh stop

clean:
	rm -rf runs bench/results bench/results-paper-scale bench/results-select bench/results-select-paper-scale .pytest_cache

# Issue 22: ResNet50 (CIFAR stem, full width, digits 32x32) whole-unit students distilled on 2 ranks against
# Torch-Pruning's global pruning at the same measured batch-64 latency; MODELS=resnet50,vit,convnext for more.
MODELS ?= resnet50
bench-modern: install  ## our ResNet50 student vs Torch-Pruning at equal latency: accuracy, throughput, wall-clock
	$(PY) -m benchmarks.modern_bench --out bench/results-modern --models $(MODELS) --np $(NP)

modern-table: install  ## blocks found in every torchvision classifier at unit and conv granularity (docs/modern-networks.md)
	$(PY) -m benchmarks.modern_table --out bench/modern-table
