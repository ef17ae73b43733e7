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
PORT   ?= 8001
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

.PHONY: install proto test test-all demo bench bench-smoke bench-triton clean keras-home scale-test

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

demo: install keras-home
	$(PY) -m export.demo --models $(MODELS) --repository $(REPO) --port $(PORT) --photos $(SHARED)/photos $(DEMO_ARGS)

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

clean:
	rm -rf $(VENV) $(SCALE_VENV) $(TRITON_VENV) $(PROTO_OUT)/*_pb2*.py .cache
