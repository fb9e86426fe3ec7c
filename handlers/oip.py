"""The Open Inference Protocol (KServe v2 REST), read and written in the shared handler layer.

TorchServe routes ``POST /v2/models/{name}/infer`` to the default version's handler as a plain request (its
``kservev2`` envelope is not used: it breaks with batchSize > 1). A request of a batch is an inference request when
it carries the ``Inference-Header-Content-Length`` header (the binary tensor data extension: that many bytes of
JSON, then the raw tensor bytes) or when its JSON body is an object with an ``inputs`` list; any inference path
(``/v2/models/{m}/infer``, ``/predictions/{m}/{version}``) accepts it.

Request:  ``{"id"?, "inputs": [{"name", "shape", "datatype", "data" | "parameters": {"binary_data_size"}}],
"outputs"?: [{"name", "parameters"?: {"binary_data"}}], "parameters"?: {"binary_data_output"}}``.
Response: ``{"model_name", "model_version", "id"?, "outputs": [{"name", "shape", "datatype", "data" |
"parameters": {"binary_data_size"}}]}``, binary outputs after the JSON with the same header. Errors
(``ProtocolError``) are answered ``{"error"}``.
BYTES elements are 4-byte little-endian lengths then the bytes in binary form, strings in JSON form.
"""

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from handlers.messages import quote

HEADER = "Inference-Header-Content-Length"
DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
MAX_DIMS = 8


class ProtocolError(ValueError):
    """A request that breaks the protocol; ``kind`` names the problem (the handler answers 400)."""

    def __init__(self, message, kind="InvalidInput"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Tensor:
    """One input: ``data`` is an ndarray of ``shape`` (BYTES: a flat list of bytes, or of str in JSON form)."""

    name: str
    datatype: str
    shape: list
    data: object


@dataclass
class Request:
    inputs: dict
    outputs: dict | None
    """Requested output name -> whether binary; None: every output, binary when ``binary_default``."""
    binary_default: bool
    id: str | None


@dataclass
class Response:
    """An encoded reply: ``body`` bytes, of which the first ``header_length`` are JSON (None: all of them)."""

    body: bytes
    header_length: int | None


def error_body(message):
    """The protocol's error reply."""
    return {"error": message}


def header_length(headers):
    """The binary extension's JSON length from a request's headers (which arrive as the client spelled them)."""
    value = next((value for name, value in (headers or {}).items() if name.lower() == HEADER.lower()), None)
    if value is None:
        return None
    value = value.decode() if isinstance(value, bytes) else str(value)
    if not value.strip().isdigit():
        raise ProtocolError(f"header {HEADER} must be a byte count, got {quote(value)}", kind="InvalidHeader")
    return int(value)


def is_request(headers, payload):
    """Whether a request (its headers, its body as TorchServe passed it) is an inference request of this protocol."""
    if any(name.lower() == HEADER.lower() for name in headers or {}):
        return True
    if isinstance(payload, (bytes, bytearray)):
        if not payload.lstrip()[:1] == b"{" or b'"inputs"' not in payload:
            return False
        try:
            payload = json.loads(payload)
        except (ValueError, RecursionError):
            return False
    return isinstance(payload, dict) and isinstance(payload.get("inputs"), list)


def parse(headers, payload):
    """A ``Request`` from a request's headers and body; any violation of the protocol is a ``ProtocolError``."""
    length, binary = header_length(headers), b""
    if length is not None:
        if not isinstance(payload, (bytes, bytearray)) or length > len(payload):
            raise ProtocolError(f"header {HEADER} is {length}, but the body has "
                               f"{len(payload) if isinstance(payload, (bytes, bytearray)) else 'no'} bytes",
                               kind="InvalidHeader")
        payload, binary = payload[:length], memoryview(payload)[length:]
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = json.loads(bytes(payload))
        except (ValueError, RecursionError) as err:
            raise ProtocolError(f"the inference request header is not valid JSON: {err}", kind="InvalidJSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or not payload["inputs"]:
        raise ProtocolError('an inference request is a JSON object with a non-empty "inputs" list')
    inputs, offset = {}, 0
    for position, item in enumerate(payload["inputs"]):
        tensor, size = _input(item, position, binary[offset:])
        if tensor.name in inputs:
            raise ProtocolError(f"input {quote(tensor.name)} is given twice")
        inputs[tensor.name] = tensor
        offset += size
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
    parameters = _object(payload.get("parameters"), "parameters")
    return Request(inputs, _requested(payload.get("outputs")), parameters.get("binary_data_output") is True,
                   str(payload["id"]) if payload.get("id") is not None else None)


def _object(value, where):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _requested(outputs):
    if outputs is None:
        return None
    named = isinstance(outputs, list) and all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)
    if not named:
        raise ProtocolError('"outputs" must be a list of {"name": ...} objects')
    return {o["name"]: _object(o.get("parameters"), f"output {quote(o['name'])} parameters").get("binary_data") is True
            for o in outputs}


def _input(item, position, binary):
    """(Tensor, bytes of ``binary`` it took) of ``inputs[position]``."""
    where = f"inputs[{position}]"
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ProtocolError(f"{where} must be an object with a string \"name\"")
    where = f"input {quote(item['name'])}"
    datatype, shape = item.get("datatype"), item.get("shape")
    if datatype not in DATATYPES:
        raise ProtocolError(f"{where}: datatype {quote(datatype)} is not one of {', '.join(DATATYPES)}",
                           kind="InvalidDatatype")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError(f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers, "
                           f"got {quote(json.dumps(shape))}", kind="InvalidShape")
    count = math.prod(shape)
    size = _object(item.get("parameters"), f"{where} parameters").get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise ProtocolError(f"{where}: binary_data_size {quote(str(size))} does not fit the "
                               f"{len(binary)} bytes of binary data left")
        data = _from_binary(bytes(binary[:size]), datatype, shape, count, where)
        return Tensor(item["name"], datatype, shape, data), size
    if "data" not in item:
        raise ProtocolError(f"{where} has neither \"data\" nor parameters.binary_data_size")
    return Tensor(item["name"], datatype, shape, _from_json(item["data"], datatype, shape, count, where)), 0


def _from_binary(raw, datatype, shape, count, where):
    if datatype != "BYTES":
        dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
        if len(raw) != count * dtype.itemsize:
            raise ProtocolError(f"{where}: {len(raw)} bytes of data, but shape {shape} of {datatype} takes "
                               f"{count * dtype.itemsize}", kind="InvalidShape")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(f"{where}: BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + length > len(raw):
            raise ProtocolError(f"{where}: BYTES element {len(elements)} claims {length} bytes, past the end of its "
                               "data")
        elements.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    if len(elements) != count:
        raise ProtocolError(f"{where}: {len(elements)} BYTES elements, but shape {shape} holds {count}",
                           kind="InvalidShape")
    return elements


def _flatten(data):
    flat, stack = [], [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def _from_json(data, datatype, shape, count, where):
    flat = _flatten(data)
    if len(flat) != count:
        raise ProtocolError(f"{where}: {len(flat)} data elements, but shape {shape} holds {count}", kind="InvalidShape")
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in flat):
            raise ProtocolError(f"{where}: BYTES data must be strings in JSON")
        return flat
    wanted = bool if datatype == "BOOL" else (int, float)
    if not all(isinstance(item, wanted) and (datatype == "BOOL" or not isinstance(item, bool)) for item in flat):
        raise ProtocolError(f"{where}: {datatype} data must be JSON {'booleans' if datatype == 'BOOL' else 'numbers'}")
    try:
        return np.array(flat, dtype=DATATYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError) as err:
        raise ProtocolError(f"{where}: a value does not fit {datatype}: {err}") from None


def input_tensor(request, name, datatype):
    """The request's input ``name``, which must be its only input and of ``datatype``."""
    if set(request.inputs) != {name}:
        raise ProtocolError(f"this model takes one input named {quote(name)}; got {quote(', '.join(request.inputs))}")
    tensor = request.inputs[name]
    if tensor.datatype != datatype:
        raise ProtocolError(f"input {quote(name)} must be {datatype}, got {tensor.datatype}", kind="InvalidDatatype")
    return tensor


def encode(request, model_name, version, outputs):
    """The ``Response`` to ``request``: ``outputs`` (name -> ndarray; str or bytes elements are BYTES)."""
    wanted = request.outputs if request.outputs is not None else {name: request.binary_default for name in outputs}
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise ProtocolError(f"unknown output {quote(unknown[0])}; this model's outputs: {', '.join(outputs)}",
                           kind="InvalidOutput")
    entries, chunks = [], []
    for name, binary in wanted.items():
        array = np.asarray(outputs[name])
        datatype = "BYTES" if array.dtype.kind in "OSU" else _datatype(array.dtype)
        entry = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if binary:
            raw = (b"".join(struct.pack("<I", len(v)) + v for v in map(_bytes, array.ravel())) if datatype == "BYTES"
                   else np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = [_text(v) for v in array.ravel()] if datatype == "BYTES" else array.ravel().tolist()
        entries.append(entry)
    reply = {"model_name": model_name, "model_version": version, **({"id": request.id} if request.id else {}),
             "outputs": entries}
    header = json.dumps(reply, separators=(",", ":")).encode()
    return Response(header + b"".join(chunks), len(header) if chunks else None)


def _datatype(dtype):
    return next(name for name, numpy_type in DATATYPES.items() if np.dtype(numpy_type) == dtype)


def _bytes(value):
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _text(value):
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
