PYTHON ?= python3

# Quick start: set up and run the whole pipeline on the embedded DIGITS default (CPU, a few minutes).
digits:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) pretrain.py DIGITS --overwrite
	$(PYTHON) main_distill.py --config configs/digits.yaml --overwrite
	$(PYTHON) main_distill.py --config configs/digits.yaml --distillation.method=krr_st --overwrite
	$(PYTHON) main_evaluate.py --config configs/digits.yaml --overwrite

# Real images at CPU scale: CIFAR-10 at 16 px, 10,000 train images, ResNet-18 width 16 (configs/cifar10_cpu.yaml;
# about an hour on 2 cores). Needs data/cifar-10-python/ (see README, Data layouts). Every row, 3 evaluation seeds.
CPU_CFG = configs/cifar10_cpu.yaml
cifar10-cpu:
	$(PYTHON) pretrain.py CIFAR10 --config $(CPU_CFG) --overwrite
	$(PYTHON) main_distill.py --config $(CPU_CFG) --overwrite
	$(PYTHON) main_distill.py --config $(CPU_CFG) --distillation.method=krr_st --overwrite
	$(PYTHON) main_evaluate.py --config $(CPU_CFG) --seeds 3 --overwrite

# The test suite (what CI runs).
test:
	$(PYTHON) -m pytest -q --durations=15

.PHONY: digits cifar10-cpu test
