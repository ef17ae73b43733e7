"""multipart/form-data, as browsers and curl -F send it (the stdlib's cgi module is gone in Python 3.13)."""

from __future__ import annotations

from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import HTTP

from ..errors import InvalidInputError


def header_params(value: str) -> Message:
    msg = Message()
    msg["Content-Type"] = value
    return msg


def parse_multipart(body: bytes, content_type: str) -> dict[str, list[tuple[str | None, bytes]]]:
    """multipart/form-data -> {field name: [(filename or None, bytes), ...]}."""
    boundary = header_params(content_type).get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise InvalidInputError(f"received Content-Type {content_type!r} without a boundary; expected "
                                "multipart/form-data; boundary=...")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise InvalidInputError(
            f"received a multipart body of {len(body)} bytes without its closing boundary; expected a complete "
            "multipart/form-data upload"
        )
    fields: dict[str, list[tuple[str | None, bytes]]] = {}
    for chunk in chunks[1:-1]:
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise InvalidInputError("received a multipart part without headers; expected Content-Disposition")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers = BytesHeaderParser(policy=HTTP).parsebytes(head + b"\r\n\r\n")
        disposition = headers.get("Content-Disposition", "")
        holder = Message()
        holder["Content-Disposition"] = str(disposition)
        name = holder.get_param("name", header="content-disposition")
        filename = holder.get_param("filename", header="content-disposition")
        if not name:
            raise InvalidInputError(f"received a multipart part with Content-Disposition {str(disposition)!r}; "
                                    "expected form-data with a name")
        fields.setdefault(str(name), []).append((None if filename is None else str(filename), data))
    return fields
