"""Fuzzing untrusted model files (issue 8): mutated ONNX and `.pt2` files, truncated, oversized and
booby-trapped ones all end as exit 2 (or 3) with one line, within a time and memory limit.

A seeded mutator (stdlib `random`, so every run makes the same files) derives about a thousand
broken files from the smoke zoo's clean model. Each goes through `scanner.cli.scan_outcome`, the
function `trojanscan scan` turns a model file into an exit code and a stderr line with, inside a
worker process that imported torch once (a subprocess per file would cost ~3 s of imports each):

- the worker has an address-space limit (RLIMIT_AS: what it needed after warming up plus
  `MEMORY_HEADROOM`), so an unbounded allocation fails there instead of swapping the machine;
- the parent is the watchdog: a file that takes longer than `FILE_SECONDS` kills the worker
  (a hang), a worker that dies is a crash; both fail the test and a fresh worker goes on;
- the worker points its file descriptors 1 and 2 at a scratch file during each call, so any stray
  output (a warning, a C++ log line) that would break "one line on stderr" is seen too.

Exit codes, decided from product.md and the loader: 2 for every file still recognisable as a
model (ONNX protobuf, zip, pickle), 3 only where the mutation destroyed what identifies the format
and the loader says so ("not a supported model format", a zip that is neither a .pt2 nor a
torch.save file). A file that still loads and scans (0 or 1: the mutation hit something harmless,
such as a doc string) is counted apart; it must be rare. Files carrying a pickle whose unpickling
writes a marker file are checked afterwards: the marker must not exist.

A handful of the mutated files also go through the real `trojanscan` console script.

Run alone with `-s` to see the summary: `pytest tests/test_fuzz_models.py -x -q -s`.
The worker half of this file runs as `python tests/test_fuzz_models.py --worker DATA`.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import random
import re
import selectors
import shutil
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SEED = 8  # the issue number: any fixed value keeps the files the same from run to run
FILE_SECONDS = 20.0  # watchdog per file (a normal one takes well under a second)
MEMORY_HEADROOM = 3 * 1024**3  # address space a worker may add to what it needed warm
WORKERS = 2  # the CI machine has 2 cores
MAX_LOADED_SHARE = 0.05  # harmless mutations that still scan: must stay rare
REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "FUZZ-RESULT "

# mutation kind -> number of files (1040 in all)
COUNTS: dict[str, int] = {
    "onnx-flip": 110, "onnx-truncate": 70, "onnx-chunk": 80, "onnx-proto": 220, "onnx-external": 40,
    "pt2-flip": 100, "pt2-truncate": 60, "pt2-chunk": 60, "pt2-zip": 120, "pt2-json": 160,
    "oversize": 10, "tiny": 10,
}
UNSUPPORTED_MESSAGES = ("is not a supported model format", "neither a torch.export .pt2 nor a torch.save file",
                        "TorchScript archive")
MEMORY_SIGNS = ("MemoryError", "bad_alloc", "can't allocate memory", "Failed to allocate", "out of memory")


class MarkerPayload:
    """Unpickling this writes a marker file: stands in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


# --------------------------------------------------------------------------- the worker process


def _worker_main(data_path: str, warm_files: list[str]) -> None:
    """Serve file paths from stdin, one JSON line back per file on the saved stdout."""
    import resource

    import torch

    torch.set_num_threads(1)
    from scanner.cli import scan_outcome
    from scanner.scan import ScanSettings

    settings = ScanSettings(detectors=("ni",))  # the cheapest detector: a file that loads still scans
    for path in warm_files:  # import onnx2torch, onnxruntime and torch.export lazily parts now
        scan_outcome(path, Path(data_path), settings)
    vm_size = _proc_status_kib("VmSize") * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size + MEMORY_HEADROOM if hard == resource.RLIM_INFINITY else min(vm_size + MEMORY_HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    capture = open(os.environ.get("FUZZ_CAPTURE", os.devnull), "w+b")
    saved = os.dup(1), os.dup(2)
    protocol.write(RESULT_TAG + json.dumps({"ready": True, "vm_kib": vm_size // 1024}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        capture.seek(0)
        capture.truncate()
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        started = time.perf_counter()
        try:
            outcome = scan_outcome(request["path"], Path(data_path), settings)
            code, message = outcome.exit_code, outcome.message
        except BaseException as exc:  # noqa: BLE001  (an escape from scan_outcome is itself a finding)
            code, message = -1, f"ESCAPED {type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        capture.seek(0)
        stray = capture.read(2000).decode("utf-8", "replace")
        reply = {"code": code, "message": message, "seconds": seconds, "stray": stray,
                 "rss_kib": _proc_status_kib("VmRSS"), "hwm_kib": _proc_status_kib("VmHWM")}
        protocol.write(RESULT_TAG + json.dumps(reply) + "\n")


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Worker:
    """One worker subprocess and the watchdog around each request."""

    def __init__(self, data_path: Path, warm_files: list[Path], scratch: Path) -> None:
        self.data_path, self.warm_files, self.scratch = data_path, warm_files, scratch
        self.process: subprocess.Popen | None = None
        self.log: Any = None
        self.peak_hwm_kib = 0
        self.restarts = 0

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                   FUZZ_CAPTURE=str(self.scratch / f"capture-{id(self)}.txt"))
        self.log = open(self.scratch / f"worker-{id(self)}.log", "ab")  # what it says outside the calls
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(self.data_path),
             *map(str, self.warm_files)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=REPO, env=env,
        )
        ready = self._reply(180.0)
        assert ready is not None and ready.get("ready"), f"fuzz worker did not start: {ready}"

    def _reply(self, timeout: float) -> dict | None:
        """The next tagged line, or None if the worker died or the time ran out."""
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                line = self.process.stdout.readline()
                if not line:
                    return None
                if line.startswith(RESULT_TAG.encode()):
                    return json.loads(line[len(RESULT_TAG):])

    def run(self, path: Path) -> dict:
        """Scan one file; a hang or a crash is reported as such and the worker is replaced."""
        if self.process is None:
            self.start()
        assert self.process is not None and self.process.stdin is not None
        started = time.monotonic()
        try:
            self.process.stdin.write((json.dumps({"path": str(path)}) + "\n").encode())
            self.process.stdin.flush()
            reply = self._reply(FILE_SECONDS)
        except BrokenPipeError:
            reply = None
        if reply is not None:
            self.peak_hwm_kib = max(self.peak_hwm_kib, reply["hwm_kib"])
            return reply
        elapsed = time.monotonic() - started
        status = self.process.poll()
        self.stop()
        self.restarts += 1
        if status is None:
            return {"code": None, "message": f"HANG: no answer in {elapsed:.0f} s", "seconds": elapsed}
        return {"code": None, "message": f"CRASH: worker died with status {status}", "seconds": elapsed}

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.log):
            if stream is not None:
                stream.close()
        self.process = None


# --------------------------------------------------------------------------- the base files


@dataclass
class Base:
    """The valid files every mutation starts from, and what the mutators need to know of them."""

    onnx: bytes
    pt2: bytes
    onnx_structure: list[int]  # byte offsets outside the big weight blobs (flips there matter)
    pt2_structure: list[int]
    pt2_members: list[tuple[str, bytes]]  # (name, data) in archive order
    bomb: bytes = b""  # a raw-deflate stream of 64 MiB of zeros (64 KiB compressed)


def _weightless_offsets(raw: bytes, spans: list[tuple[int, int]]) -> list[int]:
    """Every offset of `raw` outside the given (start, end) spans."""
    inside = bytearray(len(raw))
    for start, end in spans:
        inside[start:end] = b"\1" * (end - start)
    return [i for i, flag in enumerate(inside) if not flag]


def make_base(onnx_path: Path, pt2_path: Path) -> Base:
    """The base files. The ONNX model loses its free-text labels (node names, doc strings, producer):
    no loader reads them, so a flip there would only pad the count of harmless mutations."""
    import onnx

    stripped = onnx.load_from_string(onnx_path.read_bytes())
    for node in stripped.graph.node:
        node.ClearField("name")
        node.ClearField("doc_string")
    for name in ("producer_name", "producer_version", "doc_string"):
        stripped.ClearField(name)
    onnx_raw = stripped.SerializeToString()
    spans = []
    for tensor in onnx.load_from_string(onnx_raw).graph.initializer:
        blob = tensor.raw_data
        if len(blob) >= 256:
            start = onnx_raw.find(blob)
            if start >= 0:
                spans.append((start + 16, start + len(blob)))  # keep the length prefix flippable
    pt2_raw = pt2_path.read_bytes()
    members = []
    pt2_spans = []
    with zipfile.ZipFile(io.BytesIO(pt2_raw)) as zf:
        for info in zf.infolist():
            members.append((info.filename, zf.read(info)))
            if "/data/weights/weight_" in info.filename and info.file_size >= 256:
                name_len, extra_len = struct.unpack("<HH", pt2_raw[info.header_offset + 26:info.header_offset + 30])
                start = info.header_offset + 30 + name_len + extra_len
                pt2_spans.append((start, start + info.compress_size))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    bomb = b"".join(compressor.compress(chunk) for _ in range(64)) + compressor.flush()
    return Base(onnx_raw, pt2_raw, _weightless_offsets(onnx_raw, spans), _weightless_offsets(pt2_raw, pt2_spans),
                members, bomb)


# --------------------------------------------------------------------------- byte-level mutators


def flip_bytes(raw: bytes, structure: list[int], rng: random.Random) -> tuple[bytes, str]:
    """Flip 1-16 bytes, mostly outside the weights (a flipped weight is a valid model)."""
    data = bytearray(raw)
    count = rng.choice([1, 1, 2, 3, 4, 8, 16])
    for _ in range(count):
        i = structure[rng.randrange(len(structure))] if rng.random() < 0.95 else rng.randrange(len(data))
        data[i] = rng.choice([data[i] ^ (1 << rng.randrange(8)), rng.randrange(256), 0x00, 0xFF])
    return bytes(data), f"{count} bytes"


def truncate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Cut at a random offset (biased to the first and last kilobytes, where headers live)."""
    where = rng.choice(["head", "tail", "any"])
    if where == "head":
        cut = rng.randrange(1, 1024)
    elif where == "tail":
        cut = len(raw) - rng.randrange(1, 1024)
    else:
        cut = rng.randrange(1, len(raw))
    return raw[:cut], f"{where} {cut}"


def chunk_edit(raw: bytes, structure: list[int], rng: random.Random) -> tuple[bytes, str]:
    """Delete or duplicate a chunk starting at a structural offset."""
    start = structure[rng.randrange(len(structure))]
    size = rng.choice([1, 2, 4, 16, 64, 512, 4096])
    if rng.random() < 0.5:
        return raw[:start] + raw[start + size:], f"delete {size}@{start}"
    return raw[:start + size] + raw[start:], f"duplicate {size}@{start}"


# --------------------------------------------------------------------------- ONNX protobuf mutators

HUGE = [2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 10**6, 65536, -1, 0]


def onnx_proto(base: Base, rng: random.Random, folder: Path) -> tuple[bytes, str]:
    """One field-level change to the parsed model (dims, sizes, op types, attributes, subgraphs)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(base.onnx)
    graph = model.graph
    choice = rng.choice([
        "input_dim", "output_dim", "init_dims", "init_dims_no_data", "init_dtype", "op_type", "domain",
        "opset", "ir_version", "dangling_input", "cycle", "deep_if", "attribute", "attr_graph",
        "constant_of_shape", "input_dtype", "input_rank", "outputs", "value_info", "huge_string_dims",
        "reshape_const", "node_limit",
    ])
    if choice == "input_dim":
        dim = graph.input[0].type.tensor_type.shape.dim[rng.randrange(4)]
        dim.dim_value = rng.choice(HUGE)
    elif choice == "output_dim":
        dim = graph.output[0].type.tensor_type.shape.dim[rng.randrange(2)]
        dim.dim_value = rng.choice(HUGE)
    elif choice in ("init_dims", "init_dims_no_data"):
        tensor = graph.initializer[rng.randrange(len(graph.initializer))]
        tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice(HUGE)
        if choice == "init_dims_no_data":
            tensor.ClearField("raw_data")
    elif choice == "init_dtype":
        tensor = graph.initializer[rng.randrange(len(graph.initializer))]
        tensor.data_type = rng.choice([0, 2, 8, 9, 11, 16, 40, 999])
    elif choice == "op_type":
        node = graph.node[rng.randrange(len(graph.node))]
        node.op_type = rng.choice(["Evil", "", "Conv\x00", "Loop", "If", "Scan", "RandomNormal", "A" * 4096])
    elif choice == "domain":
        node = graph.node[rng.randrange(len(graph.node))]
        node.domain = rng.choice(["com.microsoft", "evil.domain", "ai.onnx.ml", "ai.onnx.preview.training"])
    elif choice == "opset":
        model.opset_import[0].version = rng.choice([0, 1, 6, 99, 2**31, 2**62])
    elif choice == "ir_version":
        model.ir_version = rng.choice([1, 2, 99, 2**40])
    elif choice == "dangling_input":
        node = graph.node[rng.randrange(len(graph.node))]
        node.input[0] = "nowhere"
    elif choice == "cycle":
        node = graph.node[rng.randrange(1, len(graph.node))]
        node.input[0] = graph.node[-1].output[0]
    elif choice == "deep_if":
        depth = rng.choice([2, 10, 25, 40])  # protobuf (upb) refuses nesting past 100 messages
        leaf = helper.make_graph([helper.make_node("Identity", ["x0"], ["y0"])], "leaf", [],
                                 [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)])
        bodies = [leaf]
        for level in range(depth):  # only the then-branch nests: both would grow as 2**depth
            cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
            node = helper.make_node("If", ["c"], [f"y{level + 1}"], then_branch=bodies[-1], else_branch=leaf)
            try:
                bodies.append(helper.make_graph(
                    [helper.make_node("Constant", [], ["c"], value=cond), node], f"g{level}", [],
                    [helper.make_tensor_value_info(f"y{level + 1}", TensorProto.FLOAT, None)]))
            except Exception:  # noqa: BLE001  (too deep for protobuf itself)
                break
        for body in reversed(bodies):  # the deepest the main graph still takes
            try:
                graph.node.append(helper.make_node("If", [graph.input[0].name + "_c"], ["deep_out"],
                                                   then_branch=body, else_branch=leaf))
                break
            except Exception:  # noqa: BLE001
                continue
        return _serialize(model), f"{choice} {bodies.index(body)}"
    elif choice == "attribute":
        nodes = [n for n in graph.node if n.attribute]
        node = nodes[rng.randrange(len(nodes))]
        attr = node.attribute[rng.randrange(len(node.attribute))]
        if attr.ints:
            attr.ints[rng.randrange(len(attr.ints))] = rng.choice(HUGE + [3000, -7])
        elif attr.type == onnx.AttributeProto.INT:
            attr.i = rng.choice(HUGE)
        else:
            attr.type = rng.choice([0, 5, 9, 13])  # UNDEFINED, TENSOR, GRAPHS, TYPE_PROTO: none fits the value
    elif choice == "attr_graph":  # a subgraph attribute on an op that takes none, pointing at the main graph
        node = graph.node[rng.randrange(len(graph.node))]
        node.attribute.append(helper.make_attribute("body", helper.make_graph(list(graph.node)[:3], "copy", [], [])))
    elif choice == "constant_of_shape":
        shape = [rng.choice([2**20, 2**31, 4096, 65536]) for _ in range(rng.choice([2, 3]))]
        graph.initializer.append(helper.make_tensor("huge_shape", TensorProto.INT64, [len(shape)], shape))
        graph.node.append(helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"]))
        graph.node.append(helper.make_node("ReduceSum", ["huge"], ["huge_sum"], keepdims=0))
        out = graph.output[0].name
        for node in graph.node:
            if out in node.output:
                node.output[list(node.output).index(out)] = "pre_out"
        graph.node.append(helper.make_node("Add", ["pre_out", "huge_sum"], [out]))
        return _serialize(model), f"{choice} {shape}"
    elif choice == "input_dtype":
        graph.input[0].type.tensor_type.elem_type = rng.choice([0, 6, 7, 8, 9, 10, 999])
    elif choice == "input_rank":
        dims = graph.input[0].type.tensor_type.shape.dim
        if rng.random() < 0.5:
            del dims[rng.randrange(len(dims))]
        else:
            dims.add().dim_value = rng.choice([1, 2**40])
    elif choice == "outputs":
        if rng.random() < 0.5:
            del graph.output[:]
        else:
            graph.output.append(graph.output[0])
    elif choice == "value_info":
        info = graph.value_info.add()
        info.CopyFrom(helper.make_tensor_value_info(graph.node[rng.randrange(len(graph.node))].output[0],
                                                    TensorProto.FLOAT, [rng.choice(HUGE)] * 4))
    elif choice == "huge_string_dims":
        tensor = graph.initializer.add()  # built by hand: make_tensor checks the count
        tensor.name, tensor.data_type = "strings", TensorProto.STRING
        tensor.dims.append(2**40)
        tensor.string_data.append(b"x")
    elif choice == "reshape_const":
        consts = [t for t in graph.initializer if t.data_type == TensorProto.INT64]
        if consts:
            tensor = consts[rng.randrange(len(consts))]
            values = [rng.choice(HUGE + [-1, 1]) for _ in range(max(1, tensor.dims[0] if tensor.dims else 1))]
            tensor.CopyFrom(helper.make_tensor(tensor.name, TensorProto.INT64, list(tensor.dims), values))
        else:
            graph.node[0].op_type = "Reshape"
    elif choice == "node_limit":
        extra = 100_001
        names = [graph.input[0].name] + [f"id{i}" for i in range(extra)]
        graph.node.extend(helper.make_node("Identity", [names[i]], [names[i + 1]]) for i in range(extra))
    return _serialize(model), choice


def _serialize(model: Any) -> bytes:
    return model.SerializeToString()


def onnx_external(base: Base, rng: random.Random, folder: Path) -> tuple[bytes, str]:
    """Initializers moved to external data that is missing, outside the folder, special or huge."""
    import onnx

    model = onnx.load_from_string(base.onnx)
    tensors = sorted(model.graph.initializer, key=lambda t: -len(t.raw_data))
    tensor = tensors[0] if rng.random() < 0.7 else tensors[rng.randrange(len(tensors))]
    choice = rng.choice(["dotdot", "absolute", "dev_zero", "missing", "symlink_zero", "symlink_out", "fifo",
                         "sparse_huge", "offset_past_end", "length_huge", "directory", "nul", "subfolder",
                         "proc_self"])
    location, offset, length = "weights.bin", 0, len(tensor.raw_data)
    blob = tensor.raw_data
    (folder / "weights.bin").unlink(missing_ok=True)
    if choice == "dotdot":
        location = "../weights.bin"
        (folder.parent / "weights.bin").write_bytes(blob)
    elif choice == "absolute":
        location = str(folder / "weights.bin")
        (folder / "weights.bin").write_bytes(blob)
    elif choice == "dev_zero":
        location = "/dev/zero"
    elif choice == "proc_self":
        location = "/proc/self/mem"
    elif choice == "symlink_zero":
        (folder / "weights.bin").symlink_to("/dev/zero")
    elif choice == "symlink_out":
        (folder.parent / "outside.bin").write_bytes(blob)
        (folder / "weights.bin").symlink_to(folder.parent / "outside.bin")
    elif choice == "fifo":
        os.mkfifo(folder / "weights.bin")
    elif choice == "sparse_huge":
        with open(folder / "weights.bin", "wb") as handle:
            handle.truncate(rng.choice([2 * 1024**3 + 1, 2**40]))
    elif choice == "offset_past_end":
        (folder / "weights.bin").write_bytes(blob)
        offset = rng.choice([len(blob) + 1, 2**40, -5])
    elif choice == "length_huge":
        (folder / "weights.bin").write_bytes(blob)
        length = rng.choice([2**31, 2**40, 2**62, len(blob) * 4])
    elif choice == "directory":
        (folder / "weights.bin").mkdir()
    elif choice == "nul":
        location = "weights\x00.bin"
    elif choice == "subfolder":
        location = "sub/weights.bin"
        (folder / "sub").mkdir(exist_ok=True)
        (folder / "sub" / "weights.bin").write_bytes(blob)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString(), choice


# --------------------------------------------------------------------------- .pt2 zip mutators


def _zip(members: list[tuple[str, bytes]], compress: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", compress) as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        for name, data in members:
            info = zipfile.ZipInfo(name)  # a ZipInfo: duplicates and odd names are written as given
            info.compress_type = compress
            with zf.open(info, "w") as handle:
                handle.write(data)
    return buffer.getvalue()


def _central_directory(raw: bytes) -> tuple[int, int]:
    """(start of the central directory, start of the end record)."""
    end = raw.rfind(b"PK\x05\x06")
    start = struct.unpack("<I", raw[end + 16:end + 20])[0]
    return start, end


def _marker_pickle(marker: Path, zip_container: bool) -> bytes:
    if zip_container:
        import torch

        buffer = io.BytesIO()
        torch.save(MarkerPayload(marker), buffer)
        return buffer.getvalue()
    return pickle.dumps(MarkerPayload(marker), protocol=2)


def pt2_zip(base: Base, rng: random.Random, folder: Path) -> tuple[bytes, str]:
    """Zip-level damage: central directory, declared sizes, bombs, odd names, pickled members."""
    raw = base.pt2
    members = list(base.pt2_members)
    root = members[0][0].split("/", 1)[0]
    choice = rng.choice(["cd_flip", "eocd", "declared_size", "bomb", "traversal", "pickle_member",
                         "duplicate", "drop_member", "deflated", "encrypted_flag", "method", "prefix"])
    if choice == "cd_flip":
        start, end = _central_directory(raw)
        data = bytearray(raw)
        for _ in range(rng.choice([1, 2, 4, 8])):
            i = rng.randrange(start, len(raw))
            data[i] = rng.randrange(256)
        return bytes(data), choice
    if choice == "eocd":
        start, end = _central_directory(raw)
        data = bytearray(raw)
        field_at = rng.choice([8, 10, 12, 16])  # entries on disk, entries, CD size, CD offset
        width = 2 if field_at in (8, 10) else 4
        value = rng.choice([0, 1, 2**(8 * width) - 1, rng.randrange(2**(8 * width))])
        data[end + field_at:end + field_at + width] = value.to_bytes(width, "little")
        return bytes(data), f"{choice}+{field_at}={value}"
    if choice == "declared_size":
        start, end = _central_directory(raw)
        entries = [m.start() for m in re.finditer(b"PK\x01\x02", raw[start:end])]
        at = start + entries[rng.randrange(len(entries))]
        data = bytearray(raw)
        value = rng.choice([2**32 - 1, 2**31, 3 * 1024**3 // 2, 10**9])
        targets = rng.choice([[24], [20], [20, 24]])  # uncompressed, compressed or both
        for offset in targets:
            data[at + offset:at + offset + 4] = value.to_bytes(4, "little")
        return bytes(data), f"{choice} {value}"
    if choice == "bomb":
        # a member that declares (and really holds) 64 MiB of zeros in 64 KiB of deflate, x copies
        copies = rng.choice([1, 8, 40])
        name = rng.choice([f"{root}/extra/bomb", f"{root}/models/model.json", f"{root}/data/weights/weight_4"])
        return _zip_with_raw_members(members, [(name, base.bomb, 64 << 20)] * copies), f"{choice} x{copies} {name}"
    if choice == "traversal":
        odd = rng.choice(["../../evil.txt", "/etc/evil", f"{root}/../../evil", f"{root}\\..\\evil", "C:/evil",
                          f"{root}/extra/../../../evil", f"{root}/data/weights/../../../../evil"])
        if rng.random() < 0.5:
            i = rng.randrange(len(members))
            members[i] = (odd, members[i][1])
        else:
            members.append((odd, b"payload"))
        return _zip(members), f"{choice} {odd}"
    if choice == "pickle_member":
        marker = folder / "marker"
        payload = _marker_pickle(marker, rng.random() < 0.5)
        name = rng.choice([f"{root}/data/weights/model.pt", f"{root}/data/constants/model.pt",
                           f"{root}/data/sample_inputs/model.pt", f"{root}/data/constants/opaque_obj_0",
                           f"{root}/data/constants/custom_obj_0", f"{root}/extra/evil.pkl", f"{root}/data.pkl",
                           f"{root}/data/weights/weight_0"])
        existing = [i for i, (n, _) in enumerate(members) if n == name]
        how = rng.choice(["replace", "before"]) if existing else "add"
        if how == "replace":
            members[existing[0]] = (name, payload)
        elif how == "before":  # the same name twice: the pickle first, the genuine entry after it
            members.insert(existing[0], (name, payload))
        else:
            members.append((name, payload))
        return _zip(members), f"{choice} {how} {name.split('/', 1)[1]}"
    if choice == "duplicate":
        i = rng.randrange(len(members))
        name, data = members[i]
        members.append((name, data[: len(data) // 2] + b"junk"))
        return _zip(members), f"{choice} {name.split('/', 1)[1]}"
    if choice == "drop_member":
        i = rng.randrange(len(members))
        name = members.pop(i)[0]
        return _zip(members), f"{choice} {name.split('/', 1)[1]}"
    if choice == "deflated":
        return _zip(members, zipfile.ZIP_DEFLATED), choice
    if choice == "encrypted_flag":
        start, end = _central_directory(raw)
        data = bytearray(raw)
        for m in re.finditer(b"PK\x01\x02", raw[start:end]):
            data[start + m.start() + 8] |= 0x01
        return bytes(data), choice
    if choice == "method":
        start, end = _central_directory(raw)
        data = bytearray(raw)
        method = rng.choice([1, 9, 12, 14, 99])
        for m in re.finditer(b"PK\x01\x02", raw[start:end]):
            data[start + m.start() + 10:start + m.start() + 12] = method.to_bytes(2, "little")
        return bytes(data), f"{choice} {method}"
    return rng.randbytes(rng.choice([1, 100, 5000])) + raw, choice


def _zip_with_raw_members(members: list[tuple[str, bytes]], raw_members: list[tuple[str, bytes, int]]) -> bytes:
    """The archive plus members given as ready deflate streams with their declared size (a bomb
    is built once, not compressed again per file)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data)
        zf.comment = b""
    archive = out.getvalue()
    start, end = _central_directory(archive)
    body, directory = archive[:start], archive[start:end]
    count = struct.unpack("<H", archive[end + 10:end + 12])[0]
    crc_zero = zlib.crc32(bytes(64 << 20))
    for name, stream, size in raw_members:
        encoded = name.encode()
        offset = len(body)
        local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, crc_zero, len(stream), size,
                            len(encoded), 0)
        body += local + encoded + stream
        directory += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc_zero,
                                 len(stream), size, len(encoded), 0, 0, 0, 0, 0, offset) + encoded
        count += 1
    end_record = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(directory), len(body), 0)
    return body + directory + end_record


# --------------------------------------------------------------------------- .pt2 JSON mutators

JUNK = [2**62, 2**64, -1, 0, 10**30, 1.5e308, "x", "", None, [], {}, True, "@@DEEP@@", "A" * 100_000]


def pt2_json(base: Base, rng: random.Random, folder: Path) -> tuple[bytes, str]:
    """Changes to the exported program and the weight configuration, read as JSON."""
    # here, not at the top: the worker half runs this file as a script, before `tests` is importable
    from tests.pt2_program import first_dict_with

    members = list(base.pt2_members)
    index = {name.split("/", 1)[1]: i for i, (name, _) in enumerate(members)}
    program_at = index["models/model.json"]
    config_at = index["data/weights/model_weights_config.json"]
    program = json.loads(members[program_at][1])
    config = json.loads(members[config_at][1])
    choice = rng.choice(["random_value", "random_value", "tensor_sizes", "weight_meta", "weight_path", "expr",
                         "target", "node_args", "drop_key", "deep_nesting", "not_json"])
    target_json, target_at = program, program_at
    detail = choice
    if choice == "random_value":
        holder, key = _random_slot(program, rng)
        holder[key] = rng.choice(JUNK)
        detail = f"{choice} {str(key)[:20]}"
    elif choice == "tensor_sizes":
        values = program["graph_module"]["graph"]["tensor_values"]
        meta = values[rng.choice(sorted(values))]
        meta["sizes"][rng.randrange(len(meta["sizes"]))] = {"as_int": rng.choice(HUGE)}
    elif choice == "weight_meta":
        meta = config["config"][rng.choice(sorted(config["config"]))]["tensor_meta"]
        which = rng.choice(["sizes", "strides", "storage_offset", "dtype"])
        if which in ("sizes", "strides"):
            meta[which][rng.randrange(len(meta[which]))] = {"as_int": rng.choice(HUGE)}
        elif which == "storage_offset":
            meta["storage_offset"] = {"as_int": rng.choice(HUGE)}
        else:
            meta["dtype"] = rng.choice([0, 1, 12, 99, -3])
        target_json, target_at, detail = config, config_at, f"{choice} {which}"
    elif choice == "weight_path":
        entry = config["config"][rng.choice(sorted(config["config"]))]
        entry["path_name"] = rng.choice(["weight_99", "weight_../../etc/passwd", "/etc/passwd", "weight_1",
                                         "tensor_0", "weight_\x00"])
        target_json, target_at = config, config_at
    elif choice == "expr":
        holder = first_dict_with(program, "expr_str")
        holder["expr_str"] = rng.choice([
            "2**2**2**2**2**99", "9**9**9**9", "PowByNatural(9, 10**18)", "(s77)**(10**12)", "FloatPow(2.0, 1e308)",
            "s77" + "+s77" * 3000, "(" * 5000 + "s77" + ")" * 5000, "Symbol('s77', positive=True, integer=True)*",
            "Integer(10**4000)**Integer(10**4000)", "Mod(s77, 0)", "FloorDiv(s77, 0)", "s77 >",
            "Max(" * 400 + "s77" + ", 1)" * 400,
        ])
        detail = f"{choice} {holder['expr_str'][:24]!r}"
    elif choice == "target":
        nodes = program["graph_module"]["graph"]["nodes"]
        node = nodes[rng.randrange(len(nodes))]
        node["target"] = rng.choice(["torch.ops.aten.empty.memory_format", "torch.ops.aten.nonexistent.default",
                                     "torch.ops.aten.from_file.default", "torch.ops.aten.full.default",
                                     "torch.ops.aten.conv2d.default", "builtins.eval", "_operator.getitem",
                                     "torch.ops.aten.linear", "torch.ops.aten.randn.default"])
        detail = f"{choice} {node['target']}"
    elif choice == "node_args":
        nodes = [n for n in program["graph_module"]["graph"]["nodes"]
                 if any("as_ints" in (a.get("arg") or {}) or "as_int" in (a.get("arg") or {}) for a in n["inputs"])]
        node = nodes[rng.randrange(len(nodes))]
        args = [a["arg"] for a in node["inputs"] if "as_ints" in a["arg"] or "as_int" in a["arg"]]
        arg = args[rng.randrange(len(args))]
        value = rng.choice(HUGE + [3000, 20000])
        if "as_ints" in arg:
            arg["as_ints"] = [value] * max(1, len(arg["as_ints"]))
        else:
            arg["as_int"] = value
        detail = f"{choice} {node['target'].split('.')[3]}={value}"
    elif choice == "drop_key":
        holder, key = _random_slot(program, rng)
        if isinstance(holder, dict):
            del holder[key]
        else:
            holder.pop(key)
    elif choice == "deep_nesting":
        holder, key = _random_slot(program, rng)
        holder[key] = "@@DEEP@@"
    text = json.dumps(target_json)
    if "\"@@DEEP@@\"" in text:
        depth = rng.choice([1000, 100_000])
        text = text.replace("\"@@DEEP@@\"", "[" * depth + "]" * depth, 1)
    payload = text.encode()
    if choice == "not_json":
        payload = members[program_at][1][: rng.randrange(len(members[program_at][1]))] + rng.randbytes(8)
    members[target_at] = (members[target_at][0], payload)
    return _zip(members), detail


def _random_slot(value: Any, rng: random.Random) -> tuple[Any, Any]:
    """A random (container, key) in a JSON value."""
    slots: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        keys = list(item) if isinstance(item, dict) else range(len(item)) if isinstance(item, list) else []
        for key in keys:
            slots.append((item, key))
            stack.append(item[key])
    return slots[rng.randrange(len(slots))]


# --------------------------------------------------------------------------- the cases


@dataclass
class Case:
    kind: str
    index: int
    detail: str = ""
    path: Path | None = None
    marker: Path | None = None
    reply: dict = field(default_factory=dict)


def build_file(case: Case, base: Base, folder: Path) -> Path:
    """Write the case's mutated file into its own folder (external data files go beside it)."""
    rng = random.Random(f"{SEED}-{case.kind}-{case.index}")
    folder.mkdir(parents=True, exist_ok=True)
    kind = case.kind
    suffix = ".onnx" if kind.startswith("onnx") else ".pt2"
    path = folder / f"model{suffix}"
    mutators: dict[str, Callable[[], tuple[bytes, str]]] = {
        "onnx-flip": lambda: flip_bytes(base.onnx, base.onnx_structure, rng),
        "onnx-truncate": lambda: truncate(base.onnx, rng),
        "onnx-chunk": lambda: chunk_edit(base.onnx, base.onnx_structure, rng),
        "onnx-proto": lambda: onnx_proto(base, rng, folder),
        "onnx-external": lambda: onnx_external(base, rng, folder),
        "pt2-flip": lambda: flip_bytes(base.pt2, base.pt2_structure, rng),
        "pt2-truncate": lambda: truncate(base.pt2, rng),
        "pt2-chunk": lambda: chunk_edit(base.pt2, base.pt2_structure, rng),
        "pt2-zip": lambda: pt2_zip(base, rng, folder),
        "pt2-json": lambda: pt2_json(base, rng, folder),
    }
    if kind == "oversize":  # sparse: over the 2 GiB limit on disk, a few KiB of real blocks
        head = base.onnx if case.index % 2 else base.pt2
        path = folder / ("model.onnx" if case.index % 2 else "model.pt2")
        with open(path, "wb") as handle:
            handle.write(head[:4096])
            handle.truncate(2 * 1024**3 + 1 + rng.randrange(2**33))
        case.detail = f"{path.stat().st_size} bytes"
    elif kind == "tiny":
        head = base.onnx if case.index % 2 else base.pt2
        cut = rng.randrange(0, 9)
        path.write_bytes(head[:cut])
        case.detail = f"{cut} bytes"
    else:
        data, case.detail = mutators[kind]()
        path.write_bytes(data)
    if case.detail.startswith("pickle_member"):
        case.marker = folder / "marker"
    case.path = path
    return path


def judge(case: Case) -> str:
    """The outcome of one case: `exit2`, `exit3`, `loaded`, or a failure named by what went wrong."""
    reply = case.reply
    code, message = reply.get("code"), reply.get("message") or ""
    if code is None:
        return "hang" if message.startswith("HANG") else "crash"
    if code == -1:
        return "escaped"
    if reply.get("marker_written"):
        return "code_ran"
    if reply.get("stray", "").strip():
        return "stray_output"
    if code in (0, 1):
        return "loaded" if reply.get("message") is None else "bad_message"  # a scan that finished prints no error
    if "\n" in message or "\r" in message or "Traceback" in message or not message.startswith("trojanscan: error: "):
        return "bad_message"
    if any(sign in message for sign in MEMORY_SIGNS):
        return "memory"
    if code == 2:
        return "exit2"
    if code == 3 and any(text in message for text in UNSUPPORTED_MESSAGES):
        return "exit3"
    return f"exit{code}"


FAILURES = ("hang", "crash", "escaped", "code_ran", "stray_output", "bad_message", "memory")


def run_cases(base: Base, data_path: Path, warm_files: list[Path], scratch: Path,
              counts: dict[str, int], workers: int = WORKERS) -> tuple[list[Case], list[Worker], float]:
    """Build and scan every case with `workers` worker processes; each file is deleted after its scan."""
    cases = [Case(kind, i) for kind, n in counts.items() for i in range(n)]
    todo = list(reversed(cases))
    lock = threading.Lock()
    pool = [Worker(data_path, warm_files, scratch) for _ in range(workers)]
    errors: list[BaseException] = []

    def drive(worker: Worker) -> None:
        try:
            while True:
                with lock:
                    if not todo:
                        break
                    case = todo.pop()
                folder = scratch / f"{case.kind}-{case.index}" / "model"
                build_file(case, base, folder)
                assert case.path is not None
                case.reply = worker.run(case.path)
                case.reply["marker_written"] = case.marker is not None and case.marker.exists()
                shutil.rmtree(folder.parent, ignore_errors=True)  # 1000 files of ~1 MB: never all at once
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test thread)
            errors.append(exc)
        finally:
            worker.stop()

    started = time.monotonic()
    threads = [threading.Thread(target=drive, args=(w,)) for w in pool]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return cases, pool, time.monotonic() - started


def summarise(cases: list[Case], pool: list[Worker], seconds: float) -> tuple[dict, str]:
    """Counts per kind and outcome, the slowest file and the workers' peak memory, as a dict and text."""
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for case in cases:
        by_kind[case.kind][judge(case)] += 1
    outcomes = Counter(judge(case) for case in cases)
    slowest = max(cases, key=lambda c: c.reply.get("seconds", 0.0))
    summary = {
        "files": len(cases), "seconds": round(seconds, 1), "outcomes": dict(outcomes),
        "per_kind": {kind: dict(counter) for kind, counter in by_kind.items()},
        "max_seconds_per_file": round(slowest.reply.get("seconds", 0.0), 3),
        "slowest": f"{slowest.kind} {slowest.detail}",
        "max_rss_mib": round(max(w.peak_hwm_kib for w in pool) / 1024, 1),
        "worker_restarts": sum(w.restarts for w in pool),
    }
    lines = [f"fuzzed {len(cases)} files in {seconds:.1f} s with {len(pool)} workers"]
    names = sorted(outcomes)
    lines.append(f"{'kind':15s}" + "".join(f"{n:>13s}" for n in names))
    for kind, counter in by_kind.items():
        lines.append(f"{kind:15s}" + "".join(f"{counter.get(n, 0):13d}" for n in names))
    lines.append(f"max seconds per file {summary['max_seconds_per_file']} ({summary['slowest']}); "
                 f"max worker RSS {summary['max_rss_mib']} MiB; worker restarts {summary['worker_restarts']}")
    return summary, "\n".join(lines)


# --------------------------------------------------------------------------- the tests

if "pytest" in sys.modules:
    import pytest

    @pytest.fixture(scope="module")
    def fuzz_inputs(fm_smoke_zoo: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
                    ) -> tuple[Base, Path, list[Path], Path]:
        """The clean smoke model in both formats, 5 clean images per class, a scratch folder."""
        import numpy as np

        out, manifest = fm_smoke_zoo
        entry = next(m for m in manifest["models"] if m["attack"] is None)
        onnx_path, pt2_path = out / entry["files"]["onnx"]["path"], out / entry["files"]["pt2"]["path"]
        scratch = tmp_path_factory.mktemp("fuzz")
        samples = np.load(out / "clean_samples.npz")
        keep = np.concatenate([np.flatnonzero(samples["y"] == k)[:5] for k in range(10)])
        np.savez(scratch / "clean5.npz", x=samples["x"][keep], y=samples["y"][keep])
        return make_base(onnx_path, pt2_path), scratch / "clean5.npz", [onnx_path, pt2_path], scratch

    @pytest.fixture(scope="module")
    def fuzz_run(fuzz_inputs: tuple[Base, Path, list[Path], Path]) -> tuple[list[Case], dict]:
        base, data, warm, scratch = fuzz_inputs
        cases, pool, seconds = run_cases(base, data, warm, scratch / "cases", COUNTS)
        summary, text = summarise(cases, pool, seconds)
        print("\n" + text)
        return cases, summary

    def test_at_least_1000_mutated_files_all_fail_closed(fuzz_run: tuple[list[Case], dict]) -> None:
        cases, summary = fuzz_run
        assert len(cases) >= 1000
        bad = [c for c in cases if judge(c) in FAILURES or judge(c) not in ("exit2", "exit3", "loaded")]
        listing = "\n".join(f"{judge(c)} {c.kind} {c.detail}: {c.reply.get('message')} {c.reply.get('stray', '')[:300]}"
                            for c in bad[:30])
        assert not bad, f"{len(bad)} files failed open or badly:\n{listing}"

    def test_harmless_mutations_are_rare(fuzz_run: tuple[list[Case], dict]) -> None:
        cases, summary = fuzz_run
        loaded = [c for c in cases if judge(c) == "loaded"]
        print(f"\nstill loaded and scanned ({len(loaded)}): " + "; ".join(f"{c.kind} {c.detail}" for c in loaded[:20]))
        assert len(loaded) <= MAX_LOADED_SHARE * len(cases)
        assert summary["max_seconds_per_file"] < FILE_SECONDS

    def test_pickled_members_never_run(fuzz_run: tuple[list[Case], dict]) -> None:
        cases, _ = fuzz_run
        carrying = [c for c in cases if c.marker is not None]
        assert len(carrying) >= 5  # the mutator planted some
        assert not [c.detail for c in carrying if c.reply["marker_written"]]

    def test_mutated_files_through_the_console_script(
        fuzz_inputs: tuple[Base, Path, list[Path], Path], tmp_path: Path
    ) -> None:
        """About ten mutated files through the real `trojanscan scan`: exit code and one stderr line."""
        base, data, _, _ = fuzz_inputs
        script = Path(sys.executable).parent / "trojanscan"
        picks = [("onnx-truncate", 3), ("onnx-proto", 5), ("onnx-proto", 17), ("onnx-external", 2),
                 ("pt2-zip", 4), ("pt2-zip", 27), ("pt2-json", 7), ("pt2-json", 30), ("oversize", 1), ("tiny", 2)]
        env = dict(os.environ, OMP_NUM_THREADS="1")

        def scan(pick: tuple[str, int]) -> tuple[Case, subprocess.CompletedProcess]:
            case = Case(*pick)
            build_file(case, base, tmp_path / f"{case.kind}-{case.index}" / "model")
            done = subprocess.run([str(script), "scan", str(case.path), "--data", str(data), "--detectors", "ni"],
                                  capture_output=True, text=True, timeout=120, env=env)
            return case, done

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(WORKERS) as pool:  # ~3 s of imports each: two at a time
            results = list(pool.map(scan, picks))
        for case, done in results:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            assert done.returncode in (2, 3), (case.kind, case.detail, done.returncode, done.stderr[-2000:])
            assert len(lines) == 1 and lines[0].startswith("trojanscan: error: "), (case.kind, case.detail, done.stderr)
            assert done.returncode == 2 or any(text in lines[0] for text in UNSUPPORTED_MESSAGES)
            if case.marker is not None:
                assert not case.marker.exists()
        assert any(case.marker is not None for case, _ in results)  # one of them carries a pickle


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(REPO))
    _worker_main(sys.argv[2], sys.argv[3:])
