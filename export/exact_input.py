"""Exact 8-bit input for INT8 models: the uint8 image *is* the stem's quantized input.

Exported models take uint8 NHWC images and normalise them inside the graph
(`p = a * x + b`: Cast, Mul, Add, Transpose for MobileNet's `x / 127.5 - 1`).
Quantized the ordinary way, that normalised copy is re-quantized with a
calibrated scale and a rounded zero point: for MobileNet the zero point 127.5
rounds to 128, `round(x + 0.5)` rounds half to even, and every odd pixel value
lands on its even neighbour: the stem sees 7 bits. On imagenet_val that alone
cost ~2.8 points of top-1 (which is why the stem used to stay in float).

With the normalisation affine and the same scale `a` on every channel, it can
be represented exactly: pick an integer zero point `z` (the rounded mean of
`-b / a`), shift the offsets to `b' = -a * z` so that `p' = a * (x - z)`, and
fold the shift back into the stem convolution's bias
(`bias_o -= sum_c (b'_c - b_c) * sum(W[o, c])`). Then the quantization
parameters of the stem's input are forced to scale `a`, zero point `z`
(onnxruntime's TensorQuantOverrides), and after quantization the float chain
(Cast, Mul, Add and QuantizeLinear) is removed: the uint8 input feeds the
DequantizeLinear directly (through the Transpose, now on uint8), so the stem
runs as an integer convolution on exactly the pixels it was given.

The one inexact spot is the convolution's zero padding, whose value now means
`x = z` rather than the original `p = 0`: border outputs move by
`(b'_c - b_c) * (padded weights)`, at most ~0.004 x a few weights for MobileNet
(`plan.max_padding_shift` reports the bound).

Models whose normalisation is not of this form (per-channel scales such as
PyTorch-style mean/std, channel flips, resizes in the graph) are left as they
are: `plan()` returns None with the reason in `why_not`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _graph

FLOAT = 1  # onnx.TensorProto.FLOAT
UINT8 = 2  # onnx.TensorProto.UINT8
_AFFINE = ("Mul", "Div", "Add", "Sub")


@dataclass
class InputPlan:
    """What `apply()` changes and `strip()` removes (see the module docstring)."""

    input_name: str  # the graph's uint8 input
    tensor: str  # the stem convolution's (float) input: its quantization is forced to (scale, zero_point)
    scale: float
    zero_point: int
    chain: list[str]  # node names from the input to `tensor` (Cast, Mul, Add, Transpose ...)
    perm: list[int] | None  # the chain's Transpose, redone on uint8
    conv: str  # the stem convolution
    weight: str = ""  # the stem's weight initializer: 7-bit (see overrides())
    offset_shift: list[float] = field(default_factory=list)  # b'_c - b_c per channel
    max_padding_shift: float = 0.0  # bound on how much a padded border output moves

    def overrides(self) -> dict:
        """onnxruntime quantize_static's extra_options["TensorQuantOverrides"]: the stem's input scale and
        zero point, and 7-bit weights for the stem (see the module docstring: full-range pixels times
        8-bit weights saturate the int16 pair sums of AVX2's U8S8 kernel)."""
        return {self.tensor: [{"scale": np.array(self.scale, dtype=np.float32),
                               "zero_point": np.array(self.zero_point, dtype=np.uint8)}],
                self.weight: [{"axis": 0, "reduce_range": True}]}

    def as_dict(self) -> dict:
        return {"tensor": self.tensor, "scale": self.scale, "zero_point": self.zero_point, "chain": self.chain,
                "conv": self.conv, "offset_shift": self.offset_shift, "max_padding_shift": self.max_padding_shift}


def plan(model) -> tuple[InputPlan | None, str]:
    """(plan, "") when the model's input normalisation can be made exact, else (None, why not)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != UINT8:
        return None, "the model does not have exactly one uint8 input"
    source = inputs[0]
    shape = [d.dim_value for d in source.type.tensor_type.shape.dim]
    if len(shape) != 4 or shape[3] <= 0:
        return None, "the input is not an NHWC image batch"
    channels = shape[3]
    consumers = _graph.consumers(graph)
    a, b = np.ones(channels), np.zeros(channels)
    chain, perm, tensor, cast = [], None, source.name, False
    while True:
        users = consumers.get(tensor, [])
        if len(users) != 1:
            return None, f"{tensor!r} feeds {len(users)} nodes (expected one)"
        node = users[0]
        if node.op_type == "Conv":
            break
        if node.op_type == "Cast":
            if cast or _graph.attribute(node, "to") != FLOAT:
                return None, f"{node.name}: a Cast other than the one uint8 -> float"
            cast = True
        elif node.op_type in _AFFINE:
            if not cast:
                return None, f"{node.name}: arithmetic before the uint8 -> float Cast"
            if node.input[0] != tensor or node.input[1] not in inits:
                return None, f"{node.name}: not (tensor {node.op_type} constant)"
            const = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            if const.size != 1 and [d for d in const.shape if d != 1] != [channels]:
                return None, f"{node.name}: constant of shape {list(const.shape)} is not per channel"
            c = np.broadcast_to(const.reshape(-1), (channels,))
            if node.op_type == "Mul":
                a, b = a * c, b * c
            elif node.op_type == "Div":
                a, b = a / c, b / c
            elif node.op_type == "Add":
                b = b + c
            else:
                b = b - c
        elif node.op_type == "Transpose":
            if perm is not None:
                return None, f"{node.name}: a second Transpose"
            perm = list(_graph.attribute(node, "perm", []))
            if perm != [0, 3, 1, 2]:
                return None, f"{node.name}: Transpose perm {perm} (expected NHWC -> NCHW [0, 3, 1, 2])"
        else:
            return None, f"{node.name}: {node.op_type} in the input normalisation (expected Cast, Mul, Div, Add, Sub, Transpose)"
        chain.append(node.name)
        tensor = node.output[0]
    conv = node
    if not cast:
        return None, "no uint8 -> float Cast before the first Conv"
    if int(_graph.attribute(conv, "group", 1)) != 1 or conv.input[1] not in inits:
        return None, f"{conv.name}: not a plain convolution with constant weights"
    if not np.allclose(a, a[0], rtol=1e-6) or a[0] <= 0:
        return None, f"per-channel input scales {a.tolist()} (one positive scale is needed)"
    scale = float(a[0])
    z = int(np.clip(np.round(np.mean(-b / scale)), 0, 255))
    shift = -scale * z - b  # b'_c - b_c
    weights = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)  # (O, C, kh, kw)
    if weights.ndim != 4 or weights.shape[1] != channels:
        return None, f"{conv.name}: weights of shape {list(weights.shape)} for {channels} input channels"
    pads = list(_graph.attribute(conv, "pads", [0, 0, 0, 0]))
    padded = any(pads) or _graph.attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID")
    border = float(np.max(np.sum(np.abs(weights) * np.abs(shift)[None, :, None, None], axis=(1, 2, 3)))) if padded else 0.0
    return InputPlan(input_name=source.name, tensor=tensor, scale=scale, zero_point=z, chain=chain, perm=perm,
                     conv=conv.name, weight=conv.input[1], offset_shift=shift.tolist(), max_padding_shift=border), ""


def apply(model, p: InputPlan) -> None:
    """Shift the normalisation's offsets to -a*z and fold the shift into the stem's bias (in place)."""
    from onnx import numpy_helper

    shift = np.asarray(p.offset_shift)
    if not np.any(np.abs(shift) > 0):
        return
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    consumers = _graph.consumers(graph)
    conv = nodes[p.conv]
    # a new Add of the shift right before the Conv: p' = p + shift (channel axis 1 after the Transpose)
    channel_shape = (1, -1, 1, 1) if p.perm is not None else (-1,)
    name = f"{p.conv}/exact_input_shift"
    graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32).reshape(channel_shape), name + ":0"))
    add = _make_node("Add", [p.tensor, name + ":0"], [name + ":out"], name)
    index = list(graph.node).index(conv)
    graph.node.insert(index, add)
    conv.input[0] = name + ":out"
    weights = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
    correction = np.einsum("ochw,c->o", weights, shift)
    if len(conv.input) > 2 and conv.input[2]:
        bias_name = conv.input[2]
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
        if len(consumers.get(bias_name, [])) > 1:
            raise ValueError(f"{conv.name}: its bias {bias_name!r} is shared")
        graph.initializer.remove(inits[bias_name])
    else:
        bias, bias_name = np.zeros(weights.shape[0]), f"{p.conv}/exact_input_bias:0"
        if len(conv.input) == 2:
            conv.input.append(bias_name)
        else:
            conv.input[2] = bias_name
    graph.initializer.append(numpy_helper.from_array((bias - correction).astype(np.float32), bias_name))
    # the forced quantization now applies to the shifted tensor; the chain ends at the new Add
    p.chain.append(name)
    p.tensor = name + ":out"


def _make_node(op, inputs, outputs, name, **attrs):
    from onnx import helper
    return helper.make_node(op, inputs, outputs, name=name, **attrs)


def strip(model, p: InputPlan) -> bool:
    """After quantization: the uint8 input replaces the float chain and its QuantizeLinear (in place).

    Returns False (model untouched) when the QuantizeLinear does not carry exactly (scale, zero point)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _graph.consumers(graph)
    users = consumers.get(p.tensor, [])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return False
    q = users[0]
    scale = float(numpy_helper.to_array(inits[q.input[1]]).reshape(-1)[0]) if q.input[1] in inits else None
    zp = numpy_helper.to_array(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] in inits else None
    if scale is None or zp is None or zp.dtype != np.uint8 or int(zp.reshape(-1)[0]) != p.zero_point \
            or abs(scale - p.scale) > 1e-7 * p.scale:
        return False
    quantized = q.output[0]
    chain = set(p.chain)
    keep = [n for n in graph.node if n.name not in chain and n is not q]
    del graph.node[:]
    if p.perm is not None:
        graph.node.append(_make_node("Transpose", [p.input_name], [quantized], f"{p.conv}/exact_input_transpose",
                                     perm=p.perm))
    else:
        for node in keep:
            for i, name in enumerate(node.input):
                if name == quantized:
                    node.input[i] = p.input_name
    graph.node.extend(keep)
    used = {name for n in graph.node for name in n.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return True


__all__ = ["InputPlan", "apply", "plan", "strip"]
