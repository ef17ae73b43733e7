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


def _used_names(graph, used: set[str]) -> set[str]:
    """Every tensor name a node of `graph` or of its subgraphs (If/Loop/Scan bodies) reads, and its outputs."""
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _used_names(sub, used)
    used.update(o.name for o in graph.output)
    return used


def drop_unused_initializers(graph) -> list[str]:
    """Remove the initializers no node reads (in place); returns their names.

    tf2onnx leaves some behind (e.g. a constant its optimizer folded into another); onnxruntime would
    warn about each one ("Removing initializer ... It is not used by any node") every time it loads the model.
    """
    used = _used_names(graph, set())
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    names = {init.name for init in unused}
    stale = [value for value in graph.input if value.name in names]  # old IR: initializers listed as inputs too
    for value in stale:
        graph.input.remove(value)
    return sorted(names)


__all__ = ["attribute", "consumers", "drop_unused_initializers", "is_depthwise"]
