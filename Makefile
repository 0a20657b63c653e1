PYTHON ?= python3

# Quick start: set up and run the whole pipeline on the embedded DIGITS default (CPU, a few minutes).
digits:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) pretrain.py DIGITS --overwrite
	$(PYTHON) main_distill.py --config configs/digits.yaml --overwrite
	$(PYTHON) main_distill.py --config configs/digits.yaml --distillation.method=krr_st --overwrite
	$(PYTHON) main_evaluate.py --config configs/digits.yaml --overwrite

# The test suite (what CI runs).
test:
	$(PYTHON) -m pytest -q --durations=15

.PHONY: digits test
