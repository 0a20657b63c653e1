PYTHON ?= python3

# Quick start: set up and run the whole pipeline on the embedded DIGITS default (CPU, under five minutes after
# the install; docs/results.md, 2026-12-04). 3 evaluation seeds: the table's mean ± std tell the rows apart.
digits:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) pretrain.py DIGITS --overwrite
	$(PYTHON) main_distill.py --config configs/digits.yaml --overwrite
	$(PYTHON) main_distill.py --config configs/digits.yaml --distillation.method=krr_st --overwrite
	$(PYTHON) main_evaluate.py --config configs/digits.yaml --seeds 3 --overwrite

# Real images on a laptop: CIFAR-10 at 16 px, a 5,000-image train subset, ResNet-18 width 16, budget N = 10
# (configs/cifar10_laptop.yaml), every row with 3 seeds, about 6 minutes on 2 cores after the download (CIFAR-10 is
# downloaded into data/ by torchvision when absent; docs/results.md).
cifar10-laptop:
	$(MAKE) cifar10-cpu CPU_CFG=configs/cifar10_laptop.yaml

# Real images at CPU scale: CIFAR-10 at 16 px, 10,000 train images, ResNet-18 width 16 (configs/cifar10_cpu.yaml;
# its distillation alone took 27 min on one shared thread, docs/results.md). Needs data/cifar-10-python/ (see
# README, Data layouts). Every row, 3 evaluation seeds.
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

# Every stage of a config at its real sizes on synthetic data of the real shapes: FLOPs, seconds and peak memory per
# step, the resident data, the whole schedule's projected time (tests/sizes.py; docs/results.md 2026-12-07: a 64 px
# config takes about an hour on this 2-core CPU). Report: sizes/<config name>.md and .json.
CONFIG ?= configs/cifar10.yaml
sizes:
	$(PYTHON) tests/sizes.py --config $(CONFIG) $(if $(DEVICE),--device $(DEVICE)) --out sizes

# On a lent GPU (one command of at most 10 minutes): the 64 px sources' stages on CUDA within 480 s, each skipped
# with its reason when the CPU's sizing (docs/sizes/<config name>.json) says it would not fit the GPU or it would not
# finish; exits 2 without CUDA. Report: gpu_sizes/<config name>.md and .json (small files).
GPU_SIZES = configs/stanford_dogs.yaml configs/imagenet64.yaml configs/tiny_imagenet.yaml
gpu-sizes:
	$(PYTHON) tests/sizes.py --device cuda --steps 5 --budget-s 480 --out gpu_sizes --config $(GPU_SIZES)

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

# One short GPU job (a lent H100-class GPU, at most ~10 minutes a command): the GPU check's sections, then
# configs/cifar10_gpu.yaml end to end, every phase skipped with its reason when it cannot finish within
# --budget-s (480 s); re-running skips finished phases. Report: gpu_session/ (4 small files). Needs
# data/cifar-10-python/ (the 20,000-image subset is enough). Exits 1 without CUDA.
gpu-session:  # SET='distillation.compile_features=true distillation.fold_bn=true': the reproduction with levers on
	$(PYTHON) tests/gpu_session.py --out gpu_session --work gpu_session_work --budget-s 480 $(foreach s,$(SET),--set $(s))

# Where distillation pays (docs/results.md, 2026-12-01 entry): 1 thread per job, as measured. Both targets are at
# the parameterization the levers started from (r_b = 8, U = V = 100; the default is now r_b = 16, U = V = 50).
# frontier-curve: budget N in {10, 30, 100} (U = V shrink at small N: the bases' fixed cost must fit), rows
# distilled, init_only, real_init, krr_st, random_subset, no_pretraining, 3 seeds each; then the tables and figure.
# frontier-levers: one lever at a time at N = 100, measured as distilled - init_only (a lever that changes the
# initial set has its own init_only). A finished distillation is skipped, an evaluation resumed (--resume).
FRONTIER = OMP_NUM_THREADS=1 $(PYTHON)
RB8 = --parameterization.image_basis_size=8
# $(call frontier_set,<assets folder>,<overrides>)
frontier_set = ( [ -f $(1)/distilled_data.pth ] || $(FRONTIER) main_distill.py --config $(CPU_CFG) $(2) --out $(1) --overwrite )
# $(call frontier_eval,<assets folder>,<rows>,<out>,<overrides>[,<krr assets>])
frontier_eval = $(FRONTIER) main_evaluate.py --config $(CPU_CFG) $(4) --assets $(1) --seeds 3 --resume --rows $(2) \
	--out $(3) $(if $(5),--krr-assets $(5))
CURVE_ROWS = distilled,init_only,real_init,krr_st,random_subset,no_pretraining
INIT_ROWS = distilled,init_only,real_init
SET_ROWS = distilled,init_only
# $(call frontier_n,<N>,<U = V>)
frontier_n = $(call frontier_set,distilled_assets/frontier/N$(1),--storage.budget_N=$(1) $(RB8) \
	--parameterization.U=$(2) --parameterization.V=$(2)) && \
	$(call frontier_set,distilled_assets/frontier/N$(1)_krr_st,--storage.budget_N=$(1) --distillation.method=krr_st) && \
	$(call frontier_eval,distilled_assets/frontier/N$(1),$(CURVE_ROWS),evaluation_models/frontier/N$(1),\
	--storage.budget_N=$(1),distilled_assets/frontier/N$(1)_krr_st)
# $(call frontier_lever,<name>,<rows>,<overrides>)
frontier_lever = $(call frontier_set,distilled_assets/frontier/lever_$(1),$(3)) && \
	$(call frontier_eval,distilled_assets/frontier/lever_$(1),$(2),evaluation_models/frontier/lever_$(1),$(3))
R8 = $(RB8) --parameterization.U=100 --parameterization.V=100
frontier-curve:
	$(call frontier_n,10,20)
	$(call frontier_n,30,50)
	$(call frontier_n,100,100)
	$(PYTHON) docs/frontier.py evaluation_models/frontier --out docs
frontier-levers:
	$(call frontier_lever,Z1000,distilled,$(R8) --model_pool.inner_loop_steps_Z=1000)
	$(call frontier_lever,rb12_U100,$(SET_ROWS),--parameterization.image_basis_size=12 --parameterization.U=100 \
		--parameterization.V=100)
	$(call frontier_lever,rb16_U50_V50,$(INIT_ROWS),--parameterization.image_basis_size=16 \
		--parameterization.U=50 --parameterization.V=50)
	$(call frontier_lever,rb16_U80_V30,$(SET_ROWS),--parameterization.image_basis_size=16 \
		--parameterization.U=80 --parameterization.V=30)
	$(PYTHON) docs/frontier.py evaluation_models/frontier --out docs

# The test suite (what CI runs).
test:
	$(PYTHON) -m pytest -q --durations=15

.PHONY: digits cifar10-laptop cifar10-cpu cifar10-cpu-students gpu-check gpu-session sizes gpu-sizes cifar10-quick \
	frontier-curve frontier-levers test
