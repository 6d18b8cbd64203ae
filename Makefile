# Everything installs into a project-local virtual environment, once: the stamp file records a
# finished install, and is remade only when a file that defines the environment changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.retinanet_plugin-installed
ENV_FILES := requirements-torch.txt requirements.txt scripts/install_detectron2.sh \
	scripts/detectron2_C_stub.py setup.py

.PHONY: install test bench clean-venv

install: $(STAMP)

$(STAMP): $(ENV_FILES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-torch.txt
	$(PY) -m pip install --quiet -r requirements.txt
	PYTHON=$(PY) bash scripts/install_detectron2.sh
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -m pip check
	touch $@

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/focal_loss.py

clean-venv:
	rm -rf $(VENV)

# CPU demo (16 minutes on a fresh clone in bfloat16, 18 in float32, on 2 cores): DeepForest tree crowns, RetinaNet with focal loss on a
# MobileNetV2-FPN, flips, quarter turns and scale jitter, soft-NMS and box voting; writes
# metrics, TensorBoard events, checkpoints, val_predictions.png and the evaluation report under
# output/demo/ and prints the COCO AP table. The recipe follows the CPU (scripts/demo_config.py):
# with AVX-512 BF16 or AMX, 900 steps in bfloat16 + channels-last
# (configs/demo_deepforest_mobilenet_v2_fpn_bf16.yaml); otherwise 600 steps in float32
# (configs/demo_deepforest_mobilenet_v2_fpn_long.yaml); DEMO_PRECISION=bf16|fp32 picks one.
# One OpenMP thread: with any other busy process on 2 cores, 2 spinning OpenMP threads made each
# step 5x slower than 1 thread. The data goes where train_net.py looks for it:
# $DETECTRON2_DATASETS/deepforest, default datasets/deepforest. The recipe is chosen first, so
# that a wrong DEMO_PRECISION stops before the download.
DEMO_THREADS ?= 1
DEMO_PRECISION ?= auto
.PHONY: demo
demo: $(STAMP)
	config=$$($(PY) scripts/demo_config.py $(DEMO_PRECISION)) && \
	$(PY) -m retinanet_plugin.data.deepforest --out "$${DETECTRON2_DATASETS:-datasets}/deepforest" && \
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) train_net.py --config-file "$$config"

# Table 1 on the CPU demo (scripts/ablate.py): the classification loss (CE, alpha-balanced CE, FL
# gamma 0.5 / 1 / 2 / 5, FL*, OHEM) over seeds on the 200-step demo recipe
# (configs/demo_deepforest_mobilenet_v2_fpn.yaml); writes output/ablation/table.md and
# ablation.png. The full grid is 8 settings x 3 seeds x ~4.5 min of one core: about an hour with
# two runs at a time on 2 cores. A short run:
#   make ablation ABLATION_SETTINGS="CE FL-g2" ABLATION_SEEDS=0 ABLATION_STEPS=50
ABLATION_SETTINGS ?= CE alpha-CE FL-g0.5 FL-g1 FL-g2 FL-g5 FLstar OHEM
ABLATION_SEEDS ?= 0 1 2
ABLATION_STEPS ?= 200
ABLATION_JOBS ?= 2
.PHONY: ablation
ablation: $(STAMP)
	$(PY) -m retinanet_plugin.data.deepforest --out "$${DETECTRON2_DATASETS:-datasets}/deepforest"
	$(PY) scripts/ablate.py --settings $(ABLATION_SETTINGS) --seeds $(ABLATION_SEEDS) \
		--steps $(ABLATION_STEPS) --threads $(DEMO_THREADS) --jobs $(ABLATION_JOBS)

# On a machine with an NVIDIA GPU: the CUDA tests, both benchmarks on CUDA and a 100-iteration AMP
# training of the demo, with one summary (scripts/gpu_check.sh; exits 2 without a GPU).
.PHONY: gpu-check
gpu-check:
	bash scripts/gpu_check.sh

# For a GPU machine without a package registry: wheels (cp312 manylinux x86_64) of everything its
# image lacks, detectron2's sdist, the demo's data and weights, under 64 MiB with the working tree
# (scripts/build_wheelhouse.sh). There: bash scripts/gpu_check.sh --from-wheelhouse wheelhouse
.PHONY: wheelhouse
wheelhouse: $(STAMP)
	PY=$(PY) bash scripts/build_wheelhouse.sh wheelhouse
