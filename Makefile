# Kestrel. `make demo` and `make test` each work from a fresh clone: they create
# .venv (Python >= 3.11) and build the generated gRPC code when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= export,train,bench,dev
# offline: two Keras applications (weights in $(SHARED)/keras_home) and a user's .keras file;
# with internet the seeds' trio: make demo MODELS=vgg16,resnet50,xception
MODELS ?= mobilenet_v2,mobilenet,$(SHARED)/models/efficientnet_lite0/efficientnet_lite0.keras
REPO   ?= models
PORT   ?=
SHARED ?= ../shared
PROTO_OUT := serve/_proto
PROTOS := $(wildcard proto/*.proto)
GENERATED := $(patsubst proto/%.proto,$(PROTO_OUT)/%_pb2.py,$(PROTOS))

# Offline machines: use ../shared/keras_home (copied, Keras writes into it)
# when KERAS_HOME is not set and the folder exists.
ifeq ($(origin KERAS_HOME), undefined)
ifneq ($(wildcard $(SHARED)/keras_home/models),)
export KERAS_HOME := $(CURDIR)/.cache/keras_home
KERAS_HOME_COPY := 1
endif
endif

.PHONY: install proto test test-all demo bench bench-smoke bench-triton clean keras-home scale-test \
	base-image image image-repo image-test footprint arm64-wheels

install: $(VENV)/.installed $(GENERATED)

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# Generated code is never hand-edited or committed. protoc writes absolute
# imports ("import model_config_pb2"); make them package-relative.
$(PROTO_OUT)/%_pb2.py: proto/%.proto $(VENV)/.installed
	mkdir -p $(PROTO_OUT)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) $(PROTOS)
	sed -i -E 's/^import ([a-z_0-9]+_pb2)/from . import \1/' $(PROTO_OUT)/*_pb2*.py
	touch $(PROTO_OUT)/*_pb2*.py

proto: $(GENERATED)

keras-home:
ifdef KERAS_HOME_COPY
	mkdir -p $(KERAS_HOME)/models
	cp -n $(SHARED)/keras_home/models/* $(KERAS_HOME)/models/ 2>/dev/null || true
endif

# The CI suite: everything not marked slow (GPU tests skip without a GPU).
test: install
	$(PY) -m pytest -m "not slow" -q

# Everything, including big models and longer load tests.
test-all: install
	$(PY) -m pytest -q

# PORT unset: gRPC 8001 and HTTP 8000, or free ports for both when either is taken; PORT=0: free ports
demo: install keras-home
	$(PY) -m export.demo --models $(MODELS) --repository $(REPO) $(if $(PORT),--port $(PORT)) --photos $(SHARED)/photos $(DEMO_ARGS)

# The server benchmark (locust): the Keras path vs onnxruntime FP32 vs INT8 (+ TensorRT on a GPU)
# and a Flask + model.predict app; exports what is missing. Report in benchmarks/results/<timestamp>/.
bench: install keras-home
	$(PY) -m benchmarks --repository $(REPO) $(BENCH_ARGS)

# The same pipeline in under a minute (fake models, one level); tests/benchmarks runs it too.
bench-smoke: install
	$(PY) -m benchmarks --smoke $(BENCH_ARGS)

# Kestrel on a real local two-node Ray cluster (tests/deploy/test_ray_cluster.py): exports mobilenet_v2
# (real weights) into $(SCALE_REPO) with .venv, then runs the test from its own .venv-scale
# (kestrel[cpu,dev,scale]: Ray never shares a venv with the other pins). Results: .cache/scale-test-results.json
SCALE_VENV ?= .venv-scale
SCALE_REPO ?= .cache/scale-repo
scale-test: install keras-home
	test -f $(SCALE_REPO)/mobilenet_v2/config.pbtxt || nice -n 10 $(PY) -m export mobilenet_v2 --repository $(SCALE_REPO) --quiet
	test -x $(SCALE_VENV)/bin/python || $(PYTHON) -m venv $(SCALE_VENV)
	$(SCALE_VENV)/bin/python -m pip install -q -e ".[cpu,dev,scale]"
	KESTREL_SCALE_REPOSITORY=$(abspath $(SCALE_REPO)) KESTREL_PHOTOS=$(abspath $(SHARED)/photos) nice -n 10 $(SCALE_VENV)/bin/python -m pytest \
		tests/deploy -m slow -v -s -p no:cacheprovider

# Kestrel against NVIDIA Triton on the same ONNX (benchmarks/vs_triton.py; docs/benchmarks.md). Triton is the
# tritonserver 2.51 binary of PyPI's nvidia-pytriton 0.7.0 wheel, whose only backend is python (no native
# onnxruntime backend), in its own $(TRITON_VENV) (never beside the other pins) with Kestrel's onnxruntime pin.
# numpy stays 1.26.4 there (nvidia-pytriton requires numpy < 2; with numpy 2 the 2.51 python-backend stub
# answered empty output tensors, measured). `python -m benchmarks.triton_repo` puts the wheel's stub for the
# venv's Python into backends/python/ and prints the binary, PATH and LD_LIBRARY_PATH it runs with. The
# benchmark exports mobilenet_v2, its INT8 variant and the demo ensemble into $(REPO) when missing; report in
# benchmarks/results/<timestamp>/. TRITON_ARGS=--quick: a few minutes (see `kestrel bench vs-triton --help`).
TRITON_VENV ?= .venv-triton
TRITON_ARGS ?=
ORT_PIN := $(shell sed -n 's/^cpu = \["\(onnxruntime==[0-9.]*\)"\]/\1/p' pyproject.toml)
bench-triton: install keras-home
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q "nvidia-pytriton==0.7.0" "$(ORT_PIN)" "numpy==1.26.4"
	$(PY) -m benchmarks.triton_repo $(TRITON_VENV)
	$(PY) -m benchmarks.vs_triton --repository $(REPO) --triton-venv $(TRITON_VENV) $(TRITON_ARGS)

# ---- the serving image (deploy/docker): never part of `make test` (slow, needs root or a docker daemon) ----
# `make base-image image image-test` on a machine without an image registry: the base from Debian's packages
# (debootstrap, root), the image built with docker, or buildah/podman in chroot isolation, in Docker format.
# ENGINE=docker|podman|buildah picks the tool; BASE=auto uses $(BASE_IMAGE) when it exists, else the
# Dockerfile's python:3.11-slim (from a registry); BASE=NAME any other base.
ENGINE     ?=
IMAGE      ?= kestrel:cpu
BASE_IMAGE ?= localhost/debian-py:bookworm
BASE       ?= auto
IMAGE_REPO ?= .cache/image-repo
IMAGE_TOOL := $(PYTHON) deploy/docker/engine.py $(if $(ENGINE),--engine $(ENGINE))

base-image:
	$(IMAGE_TOOL) base --name $(BASE_IMAGE) --json .cache/image/base.json

image:
	$(IMAGE_TOOL) build --tag $(IMAGE) --base $(BASE) --base-image $(BASE_IMAGE) --json .cache/image/build.json

# The demo's trio (+ the ensemble) exported into $(IMAGE_REPO) by whoever runs make (root here: "another
# user" for the image's uid 1000); what exists is kept.
image-repo: install keras-home
	@for src in mobilenet_v2 mobilenet $(SHARED)/models/efficientnet_lite0/efficientnet_lite0.keras; do \
	  name=$$(basename $$src .keras); \
	  if [ -f $(IMAGE_REPO)/$$name/config.pbtxt ]; then continue; fi; \
	  case $$src in *.keras) [ -f $$src ] || { echo "$$src is absent: $$name left out"; continue; };; esac; \
	  echo "exporting $$name into $(IMAGE_REPO)"; \
	  nice -n 10 $(PY) -m export $$src --repository $(IMAGE_REPO) --quiet || exit 1; \
	done
	@members=$$(for n in mobilenet_v2 mobilenet efficientnet_lite0; do [ -f $(IMAGE_REPO)/$$n/config.pbtxt ] && printf "%s," $$n; done); \
	  [ -f $(IMAGE_REPO)/imagenet/config.pbtxt ] || $(PY) -m export.ensemble create "imagenet=$${members%,}" --repository $(IMAGE_REPO)

# Runs $(IMAGE) with its ENTRYPOINT on $(IMAGE_REPO) mounted read-only and checks it against the host's
# server (deploy/docker/image_test.py). Results: .cache/image-test.json
image-test: install image-repo
	$(PY) deploy/docker/image_test.py --image $(IMAGE) --repository $(IMAGE_REPO) --photos $(SHARED)/photos \
		$(if $(ENGINE),--engine $(ENGINE))

# Edge footprint (docs/benchmarks.md): installed size of kestrel[cpu], start-to-READY, idle RSS and RSS
# under 8 clients, for the host install and the image. Results: .cache/footprint.json
footprint: install image-repo
	nice -n 10 $(PY) deploy/docker/footprint.py --repository $(IMAGE_REPO) --image $(IMAGE) --photos $(SHARED)/photos \
		$(if $(ENGINE),--engine $(ENGINE)) $(FOOTPRINT_ARGS)

# arm64 readiness without an arm64 machine: every pin of the serving install (base + cpu extra) has a
# manylinux aarch64 wheel on PyPI (pip download --only-binary; needs PyPI, so not in `make test`).
arm64-wheels:
	$(PYTHON) deploy/docker/arm64_wheels.py

clean:
	rm -rf $(VENV) $(SCALE_VENV) $(TRITON_VENV) $(PROTO_OUT)/*_pb2*.py .cache
