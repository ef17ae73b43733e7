"""Kestrel export: Keras models -> validated ONNX model-repository entries (and their variants).

    python -m export mobilenet_v2                 # or: from export.pipeline import export_model

Modules: applications (the supported Keras applications, as a table) ·
contract (the uint8-in / probabilities-out wrapper, preprocessing as Keras
layers) · keras_to_onnx (the only tf2onnx code) · parity (compares runners
from serve.backends) · pipeline (atomic repository writes) · labels ·
optimize / quantize / tensorrt (variants). Importing `export` imports no
TensorFlow, tf2onnx or onnxruntime; they load when a function needs them.
"""
