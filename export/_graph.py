"""Small read-only helpers over an ONNX graph, shared by quantize, exact_input and equalize."""

from __future__ import annotations


def consumers(graph) -> dict[str, list]:
    """{tensor name: the nodes that read it}."""
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def attribute(node, name: str, default=None):
    """The value of a node's attribute, or `default` when it has none of that name."""
    for a in node.attribute:
        if a.name == name:
            from onnx import helper
            return helper.get_attribute_value(a)
    return default


def is_depthwise(node) -> bool:
    return node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)


__all__ = ["attribute", "consumers", "is_depthwise"]
