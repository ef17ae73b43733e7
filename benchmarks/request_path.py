"""The request path alone: what each server spends on a request besides the model.

At the saturated cells of the Triton comparison both servers run the same model at the same batch
sizes, and what still differs is the CPU a request costs outside onnxruntime: receiving and decoding
it, batching, answering. This measures that directly: both servers serve one model that does no
work, built here from the compared model (same input and output names, types and shapes, same
max_batch_size, dynamic batching and parameters): an ONNX graph that only broadcasts a constant row
(1 / classes) to the batch's size, one file for both servers. onnxruntime spends microseconds on it,
so the server processes' CPU time per request answered (Triton's python-backend stub included) is
the request path's.

    write_repository(repository, "mobilenet_v2_int8", target)   # target/request_path/{config.pbtxt,1/model.onnx}
    summarise(rows)                                             # medians per protocol x clients x server

`kestrel bench vs-triton` runs it after the main grid (`--request-path-clients`, default 4,32; '' skips it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import _method

NAME = "request_path"  # the model's name in both servers' repositories


def nop_model(input_spec, output_spec):
    """An onnx ModelProto: `input_spec`'s tensor in (any batch size), `output_spec`'s tensor out, every row
    1 / classes; the input is only measured (Shape), never read."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    out_dtype = np.dtype(output_spec.dtype)
    if out_dtype.kind not in "iuf":
        raise ValueError(f"the request-path model needs a numeric output; {output_spec.name} is {out_dtype}")
    in_type = helper.np_dtype_to_tensor_dtype(np.dtype(input_spec.dtype))
    out_type = helper.np_dtype_to_tensor_dtype(out_dtype)
    classes = int(np.prod(output_spec.shape))
    row = np.full((1,) + tuple(int(d) for d in output_spec.shape), 1.0 / classes).astype(out_dtype)
    nodes = [
        helper.make_node("Shape", [input_spec.name], ["in_shape"]),
        helper.make_node("Slice", ["in_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "row_dims"], ["out_shape"], axis=0),
        helper.make_node("Expand", ["row", "out_shape"], [output_spec.name]),
    ]
    graph = helper.make_graph(
        nodes, NAME,
        [helper.make_tensor_value_info(input_spec.name, in_type, ["N", *[int(d) for d in input_spec.shape]])],
        [helper.make_tensor_value_info(output_spec.name, out_type, ["N", *[int(d) for d in output_spec.shape]])],
        initializer=[numpy_helper.from_array(np.array([0], np.int64), "zero"),
                     numpy_helper.from_array(np.array([1], np.int64), "one"),
                     numpy_helper.from_array(np.array(output_spec.shape, np.int64), "row_dims"),
                     numpy_helper.from_array(row, "row")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_repository(repository: Path, model: str, target: Path) -> Path:
    """A Kestrel repository at `target` holding NAME: `model`'s config (renamed), labels and the no-work ONNX.
    Returns `target`."""
    import onnx

    from serve.repository import PLATFORM_ONNX, ModelRepository, write_config

    entry = ModelRepository(repository).entry(model)
    if entry.platform != PLATFORM_ONNX:
        raise ValueError(f"model {model!r} is {entry.platform}; the request-path model copies an ONNX model's config")
    folder = Path(target) / NAME
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "1").mkdir(parents=True)
    config = type(entry.config)()
    config.CopyFrom(entry.config)
    config.name = NAME
    write_config(config, folder)
    for output in config.output:
        if output.label_filename and (entry.path / output.label_filename).is_file():
            shutil.copyfile(entry.path / output.label_filename, folder / output.label_filename)
    onnx.save(nop_model(entry.input_spec, entry.output_spec), str(folder / "1" / "model.onnx"))
    return Path(target)


def cpu_us_per_request(row: dict) -> float:
    """The server processes' CPU over the measured window per request answered, µs (NaN when either is missing)."""
    return 1e6 * _method.ratio(row.get("server_cores"), row.get("requests_per_s"))


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (protocol, clients), in the order run: each server's median req/s, mean batch formed and CPU µs
    per request (with the range over rounds) and Kestrel's extra µs per request (median of the rounds' differences)."""
    order: list[tuple[str, int]] = []
    for r in rows:
        key = (r["protocol"], int(r["clients"]))
        if key not in order:
            order.append(key)
    lines = []
    for protocol, clients in order:
        line: dict = {"protocol": protocol, "clients": clients}
        cpu_by_round: dict[str, dict[int, float]] = {}
        for server in ("kestrel", "triton"):
            runs = [r for r in rows if (r["protocol"], int(r["clients"]), r["server"]) == (protocol, clients, server)]
            ok = [r for r in runs if _method.completed(r)]
            line[server] = {"requests_per_s": _method.over_repeats(r.get("requests_per_s") for r in ok),
                            "mean_batch": _method.over_repeats(r.get("mean_batch") for r in ok),
                            "cpu_us_per_request": _method.over_repeats(cpu_us_per_request(r) for r in ok),
                            "errors": sum(int(r.get("errors") or 0) for r in runs), "runs": len(ok),
                            "failed": len(runs) - len(ok)}
            cpu_by_round[server] = {int(r["repeat"]): cpu_us_per_request(r) for r in ok}
        both = sorted(set(cpu_by_round["kestrel"]) & set(cpu_by_round["triton"]))
        line["extra_us"] = _method.over_repeats(cpu_by_round["kestrel"][i] - cpu_by_round["triton"][i] for i in both)
        lines.append(line)
    return lines
