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

# Other students and fine-tuned transfer at CPU scale (after cifar10-cpu's teacher and distilled set; README table):
# five students x {probe, fine-tune} x 3 seeds, then the random-init row with recalibrated BatchNorm statistics.
# --resume: re-running it runs only the (student, row, seed) cells still missing.
STUDENTS = resnet18,resnet10,vgg11_bn,alexnet,mobilenetv2
cifar10-cpu-students:
	$(PYTHON) main_evaluate.py --config $(CPU_CFG) --student $(STUDENTS) --protocol both --seeds 3 --resume \
		--rows distilled,random_subset,no_pretraining,full_dataset --out evaluation_models/cifar10_cpu_students
	$(PYTHON) main_evaluate.py --config $(CPU_CFG) --student $(STUDENTS) --protocol probe --seeds 3 --resume \
		--rows no_pretraining --evaluation.random_init_bn=recalibrate --out evaluation_models/cifar10_cpu_students_recal

# On a CUDA machine: one command says whether the CUDA path is correct and how fast it is (a few minutes;
# exits 1 without CUDA). Report: gpu_check/gpu_check.md and .json.
gpu-check:
	$(PYTHON) tests/gpu_check.py --out gpu_check

# CIFAR-10 end to end in about 40 minutes of one H100 (configs/cifar10_quick.yaml: 100-epoch teacher, 5,000 outer
# steps; estimate, README). Needs data/cifar-10-python/. Re-run the same command after an interruption: finished
# steps are skipped, an interrupted one resumes from its checkpoint, a step that never started starts.
# $(call step,<final file>,<checkpoint>,<command>)
step = if [ -f $(1) ]; then echo "done: $(1)"; elif [ -f $(2) ]; then echo "resume: $(3) --resume"; $(3) --resume; \
	else echo "start: $(3)"; $(3); fi
QUICK_CFG = configs/cifar10_quick.yaml
QUICK_TEACHER = teacher_models/resnet18_barlow_twins_cifar10_quick
QUICK_SET = distilled_assets/cifar10_quick_N100
cifar10-quick:
	@$(call step,$(QUICK_TEACHER).pth,$(QUICK_TEACHER)_run/checkpoint.pth,$(PYTHON) pretrain.py CIFAR10 --config $(QUICK_CFG))
	@$(call step,$(QUICK_SET)/distilled_data.pth,$(QUICK_SET)/checkpoint.pth,$(PYTHON) main_distill.py --config $(QUICK_CFG))
	@$(call step,$(QUICK_SET)_krr_st/distilled_data.pth,$(QUICK_SET)_krr_st/checkpoint.pth,\
		$(PYTHON) main_distill.py --config $(QUICK_CFG) --distillation.method=krr_st)
	@$(call step,evaluation_models/cifar10_quick_N100/results.md,evaluation_models/cifar10_quick_N100/results.json,\
		$(PYTHON) main_evaluate.py --config $(QUICK_CFG))

# The test suite (what CI runs).
test:
	$(PYTHON) -m pytest -q --durations=15

.PHONY: digits cifar10-cpu cifar10-cpu-students gpu-check cifar10-quick test
