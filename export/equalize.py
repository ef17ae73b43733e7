"""Range equalization before INT8: give every channel of a per-tensor quantized activation the same range.

A convolution's output channels can have wildly different ranges. MobileNetV2's stem
(Conv -> ReLU6) on imagenet_val: six channels are always 0, others peak at 0.05, 0.09,
0.5, 0.8 while most reach the clip at 6. Quantized per tensor (one scale, 6/255), the
0.09 channel gets four levels: quantizing that one tensor cost ~3 points of top-1, which
is why the stem and the first depthwise convolution used to stay in float.

When the next layer is a depthwise convolution (one filter per channel), the range can
be moved between the two layers without changing what the model computes (the idea of
cross-layer equalization, Nagel et al. 2019, "Data-Free Quantization"): channel i of the
first layer is multiplied by k_i (its weights and bias), and the depthwise filter of
channel i divided by k_i. ReLU commutes with a positive k_i; ReLU6 (Clip 0..6) does
too as long as the scaled channel stays below 6, so k_i is chosen from the channel's
largest value on the calibration images with a 2x margin (`MARGIN`):
k_i = 6 / (2 * max_i), never below 1 and at most `MAX_SCALE`. Per-channel weight
quantization of the depthwise layer is unaffected by the division (each filter has its
own scale).

`equalize(model, images)` finds Conv -> Clip/Relu -> depthwise Conv pairs (all of them,
or only the first with `first_only=True`), measures the channel ranges with onnxruntime on
the calibration images and rescales the weights in place; it returns what it did per pair.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from . import _graph

MARGIN = 2.0  # the scaled channel's calibration maximum stays at most clip / MARGIN
MAX_SCALE = 64.0


@dataclass
class Pair:
    conv: str
    activation: str
    depthwise: str
    clip: float | None  # None: Relu (no upper bound)
    scales: list[float] | None = None  # k_i, once measured

    def as_dict(self) -> dict:
        k = np.asarray(self.scales or [1.0])
        return {"conv": self.conv, "activation": self.activation, "depthwise": self.depthwise,
                "channels_rescaled": int(np.sum(k > 1.0)), "max_scale": float(k.max()),
                "scales": [round(float(v), 6) for v in k]}


def _clip_bounds(node, inits) -> tuple[float, float] | None:
    from onnx import numpy_helper
    if len(node.input) >= 3 and node.input[1] in inits and node.input[2] in inits:
        lo = float(numpy_helper.to_array(inits[node.input[1]]))
        hi = float(numpy_helper.to_array(inits[node.input[2]]))
        return lo, hi
    if _graph.attribute(node, "min") is not None:  # opset < 11
        return float(_graph.attribute(node, "min")), float(_graph.attribute(node, "max"))
    return None


def find_pairs(model, first_only: bool = False) -> list[Pair]:
    """Conv -> Clip(0, c)/Relu -> depthwise Conv chains whose tensors feed nothing else."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _graph.consumers(graph)
    pairs = []
    for node in graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type not in ("Clip", "Relu"):
            continue
        act = users[0]
        clip = None
        if act.op_type == "Clip":
            bounds = _clip_bounds(act, inits)
            if bounds is None or bounds[0] != 0.0 or not bounds[1] > 0:
                continue
            clip = bounds[1]
        nxt = consumers.get(act.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Conv" or nxt[0].input[1] not in inits:
            continue
        dw = nxt[0]
        out_channels = inits[node.input[1]].dims[0]
        if int(_graph.attribute(dw, "group", 1)) != out_channels or inits[dw.input[1]].dims[1] != 1:
            continue
        pairs.append(Pair(node.name, act.name, dw.name, clip))
        if first_only:
            break
    return pairs


def channel_max(model, tensors: list[str], images: np.ndarray, input_name: str, batch: int = 16) -> dict[str, np.ndarray]:
    """Largest value per channel (axis 1) of each tensor over the images, run by onnxruntime."""
    import onnx
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    del probe.graph.output[:]
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    best: dict[str, np.ndarray] = {}
    for start in range(0, len(images), batch):
        outs = session.run(tensors, {input_name: images[start : start + batch]})
        for name, out in zip(tensors, outs):
            m = out.max(axis=tuple(i for i in range(out.ndim) if i != 1))
            best[name] = m if name not in best else np.maximum(best[name], m)
    return best


def equalize(model, images: np.ndarray, *, input_name: str = "images", first_only: bool = False,
             pairs: list[Pair] | None = None) -> list[Pair]:
    """Rescale each pair's channels (in place; `pairs`: find_pairs()'s answer if the caller has it);
    returns the pairs with their scales."""
    from onnx import numpy_helper

    pairs = find_pairs(model, first_only) if pairs is None else pairs
    if not pairs:
        return []
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    maxima = channel_max(model, [nodes[p.activation].output[0] for p in pairs], images, input_name)
    inits = {i.name: i for i in graph.initializer}
    consumers = _graph.consumers(graph)

    def replace(name: str, value: np.ndarray) -> None:
        if len(consumers.get(name, [])) > 1:
            raise ValueError(f"initializer {name!r} is shared; cannot rescale it for one layer")
        graph.initializer.remove(inits[name])
        new = numpy_helper.from_array(value.astype(np.float32), name)
        graph.initializer.append(new)
        inits[name] = new

    for p in pairs:
        peak = maxima[nodes[p.activation].output[0]].astype(np.float64)
        top = p.clip / MARGIN if p.clip is not None else float(peak.max())
        k = np.where(peak > 0, top / np.maximum(peak, 1e-12), 1.0)
        k = np.clip(k, 1.0, MAX_SCALE)
        p.scales = k.tolist()
        conv, dw = nodes[p.conv], nodes[p.depthwise]
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        replace(conv.input[1], w * k[:, None, None, None])
        if len(conv.input) > 2 and conv.input[2]:
            b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            replace(conv.input[2], b * k)
        wd = numpy_helper.to_array(inits[dw.input[1]]).astype(np.float64)
        replace(dw.input[1], wd / k[:, None, None, None])
    return pairs


__all__ = ["MARGIN", "MAX_SCALE", "Pair", "channel_max", "equalize", "find_pairs"]
