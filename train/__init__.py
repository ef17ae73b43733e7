"""Kestrel train: transfer learning from a folder of labelled images to a served model.

    python -m train DATA_DIR --base mobilenet_v2 --augment --export
    # or: from train.pipeline import TrainOptions, train

Modules: data (class folders, the stratified seeded split, decoding through
serve.images) · bases (headless applications from export's table, the cut
point for fine-tuning) · features (the base as ONNX run by onnxruntime,
features cached on disk, augmentation views) · head (linear / MLP heads on
cached features, fine-tuning of the top layers) · report (metrics, confusion
matrix, curves) · pipeline (the phases, atomic outputs, export) · int8 (the
trained model's INT8 variant, gated on labelled test accuracy) · fewshot
(`python -m train.fewshot`: every class pair, 100 photos per class). Importing
`train` imports no TensorFlow, tf2onnx or onnxruntime.
"""
