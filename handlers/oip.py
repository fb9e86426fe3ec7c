"""The Open Inference Protocol (KServe v2), read and written in the shared handler layer.

TorchServe routes ``POST /v2/models/{name}/infer`` to the default version's handler as a plain request (its
``kservev2`` envelope is not used: it breaks with batchSize > 1). A request of a batch is an inference request when
it carries the ``Inference-Header-Content-Length`` header (the binary tensor data extension: that many bytes of
JSON, then the raw tensor bytes) or when its JSON body is an object with an ``inputs`` list; any inference path
(``/v2/models/{m}/infer``, ``/predictions/{m}/{version}``) accepts it.

Request:  ``{"id"?, "inputs": [{"name", "shape", "datatype", "data" | "parameters": {"binary_data_size"}}],
"outputs"?: [{"name", "parameters"?: {"binary_data"}}], "parameters"?: {"binary_data_output"}}``. ``data`` is a flat
list in row-major order or lists nested exactly as ``shape``; anything else, and a JSON object with a key twice
(``json.loads`` would keep the last), is a ``ProtocolError`` (where the handler gets the raw body: TorchServe's own
JSON decoding, which drops duplicate keys, is off in the handler layer).
Response: ``{"model_name", "model_version", "id"?, "outputs": [{"name", "shape", "datatype", "data" |
"parameters": {"binary_data_size"}}]}``, binary outputs after the JSON with the same header. Errors
(``ProtocolError``) are answered ``{"error"}``.
BYTES elements are 4-byte little-endian lengths then the bytes in binary form, strings in JSON form.

gRPC (``ts_open_inference_protocol=true``): TorchServe's ``ModelInfer`` hands the handler a request of its own
making, without any HTTP header: one parameter ``body`` (application/json), ``{"id", "model_name", "inputs": [{"name",
"shape", "datatype", "data"}]}`` built from the inputs' typed ``contents`` only (``raw_input_contents``, what
tritonclient.grpc sends, are dropped), BYTES elements base64-encoded; requested outputs and parameters are dropped.
It reads every reply as a ModelInferResponse whatever its status: ``id``, ``model_name``, ``model_version`` and each
output's JSON ``data`` must be there, or the frontend fails on it and restarts the worker. So a bridged request
(``bridged``) is answered in JSON form with its ``id``, and its error as the one BYTES output ``error``.
"""

import base64
import binascii
import json
import math
import re
import struct
from dataclasses import dataclass

import numpy as np

from handlers.messages import quote

HEADER = "Inference-Header-Content-Length"
JSON_OBJECT = re.compile(rb"\s*\{")
"""The start of a JSON object, after any whitespace (matched in place: an image body is not copied)."""
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
    bridged: bool = False
    """Whether it came through TorchServe's gRPC ModelInfer (``bridged``): answered in JSON form, always with an id."""


@dataclass
class Response:
    """An encoded reply: ``body`` bytes, of which the first ``header_length`` are JSON (None: all of them)."""

    body: bytes
    header_length: int | None


def bridged(headers):
    """Whether a request (its headers as the handler gets them) came through TorchServe's gRPC ModelInfer: it has
    parameter entries (name -> {"content-type"}) but no HTTP header, which every REST request has (TorchServe adds
    ``explain`` to each)."""
    return bool(headers) and all(isinstance(value, dict) for value in headers.values())


def error_body(message, headers=None, model_name="", version=""):
    """The protocol's error reply, ``{"error"}``; to a ``bridged`` request (``headers``), a ModelInferResponse whose
    one output ``error`` holds the message (the gRPC status is OK: TorchServe's bridge ignores the reply's status)."""
    if not bridged(headers):
        return {"error": message}
    return {"id": "", "model_name": model_name, "model_version": version,
            "outputs": [{"name": "error", "shape": [1], "datatype": "BYTES", "data": [message]}]}


def header_length(headers):
    """The binary extension's JSON length from a request's headers (which arrive as the client spelled them)."""
    value = next((value for name, value in (headers or {}).items() if name.lower() == HEADER.lower()), None)
    if value is None:
        return None
    value = value.decode() if isinstance(value, bytes) else str(value)
    if not (value.strip().isascii() and value.strip().isdigit()):  # str.isdigit() is true for '²', int('²') fails
        raise ProtocolError(f"header {HEADER} must be a byte count, got {quote(value)}", kind="InvalidHeader")
    return int(value)


def is_request(headers, payload):
    """Whether a request (its headers, its body as TorchServe passed it) is an inference request of this protocol."""
    if HEADER.lower() in (name.lower() for name in headers or {}):
        return True
    if isinstance(payload, (bytes, bytearray)):
        if not JSON_OBJECT.match(payload) or b'"inputs"' not in payload:
            return False
        try:
            payload = _loads(payload)
        except ProtocolError as err:
            if err.kind != "DuplicateKey":
                return False
            try:  # a key twice: parse() refuses it, if "inputs" makes it a protocol request at all
                return "inputs" in json.loads(payload)
            except (ValueError, RecursionError):
                return False
    return isinstance(payload, dict) and isinstance(payload.get("inputs"), list)


def _loads(raw):
    """JSON from bytes; an object with a key twice is a ``ProtocolError`` (``json.loads`` would keep the last)."""
    try:
        return json.loads(bytes(raw), object_pairs_hook=_unique_keys)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as err:
        raise ProtocolError(f"the inference request header is not valid JSON: {err}", kind="InvalidJSON") from None


def _unique_keys(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ProtocolError(f"the JSON object has the key {quote(key)} twice", kind="DuplicateKey")
        seen.add(key)
    return dict(pairs)


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
        payload = _loads(payload)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or not payload["inputs"]:
        raise ProtocolError('an inference request is a JSON object with a non-empty "inputs" list')
    via_grpc = bridged(headers)
    inputs, offset = {}, 0
    for position, item in enumerate(payload["inputs"]):
        tensor, size = _input(item, position, binary[offset:], via_grpc)
        if tensor.name in inputs:
            raise ProtocolError(f"input {quote(tensor.name)} is given twice")
        inputs[tensor.name] = tensor
        offset += size
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
    parameters = _object(payload.get("parameters"), "parameters")
    request_id = payload.get("id")
    return Request(inputs, _requested(payload.get("outputs")), parameters.get("binary_data_output") is True,
                   str(request_id) if request_id is not None else ("" if via_grpc else None), via_grpc)


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


def _input(item, position, binary, via_grpc):
    """(Tensor, bytes of ``binary`` it took) of ``inputs[position]`` (``via_grpc``: of a ``bridged`` request)."""
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
    data = _from_json(item["data"], datatype, shape, count, where, via_grpc)
    return Tensor(item["name"], datatype, shape, data), 0


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


def _elements(data, shape, where):
    """The elements of JSON ``data`` in row-major order: a flat list, or lists nested exactly as ``shape``."""
    if not isinstance(data, list):
        raise ProtocolError(f'{where}: "data" must be a JSON array, got {_json_type(data)}', kind="ShapeMismatch")
    if not any(isinstance(item, list) for item in data):
        return data
    flat, stack = [], [(data, ())]
    while stack:
        item, path = stack.pop()
        at = f"{where}: data{''.join(f'[{i}]' for i in path)}"
        if len(path) == len(shape):
            if isinstance(item, list):
                raise ProtocolError(f"{at} is nested deeper than shape {shape}", kind="ShapeMismatch")
            flat.append(item)
        elif not isinstance(item, list) or len(item) != shape[len(path)]:
            got = f"a list of {len(item)}" if isinstance(item, list) else _json_type(item)
            raise ProtocolError(f"{at} is {got}, but shape {shape} has {shape[len(path)]} there (send data flat, or "
                                "nested exactly as the shape)", kind="ShapeMismatch")
        else:
            stack.extend((child, (*path, i)) for i, child in reversed(list(enumerate(item))))
    return flat


def _json_type(value):
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _from_json(data, datatype, shape, count, where, via_grpc):
    flat = _elements(data, shape, where)
    if len(flat) != count:
        hint = ("; TorchServe's gRPC ModelInfer reads only the inputs' typed contents, not raw_input_contents"
                if via_grpc and not flat else "")
        raise ProtocolError(f"{where}: {len(flat)} data elements, but shape {shape} holds {count}{hint}",
                            kind="InvalidShape")
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in flat):
            raise ProtocolError(f"{where}: BYTES data must be strings in JSON")
        return [_unbase64(item, where) for item in flat] if via_grpc else flat
    wanted = bool if datatype == "BOOL" else (int, float)
    if not all(isinstance(item, wanted) and (datatype == "BOOL" or not isinstance(item, bool)) for item in flat):
        raise ProtocolError(f"{where}: {datatype} data must be JSON {'booleans' if datatype == 'BOOL' else 'numbers'}")
    try:
        return np.array(flat, dtype=DATATYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError) as err:
        raise ProtocolError(f"{where}: a value does not fit {datatype}: {err}") from None


def _unbase64(text, where):
    """The bytes of a BYTES element as TorchServe's gRPC bridge passes it (base64 of the element's bytes)."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{where}: a BYTES element is not base64, as TorchServe's gRPC ModelInfer sends them") \
            from None


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
        if binary and not request.bridged:  # the gRPC bridge reads JSON data only
            raw = (b"".join(struct.pack("<I", len(v)) + v for v in map(_bytes, array.ravel())) if datatype == "BYTES"
                   else np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = [_text(v) for v in array.ravel()] if datatype == "BYTES" else array.ravel().tolist()
        entries.append(entry)
    reply = {"model_name": model_name, "model_version": version,
             **({"id": request.id} if request.id or request.bridged else {}), "outputs": entries}
    header = json.dumps(reply, separators=(",", ":")).encode()
    return Response(header + b"".join(chunks), len(header) if chunks else None)


def _datatype(dtype):
    return next(name for name, numpy_type in DATATYPES.items() if np.dtype(numpy_type) == dtype)


def _bytes(value):
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _text(value):
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
