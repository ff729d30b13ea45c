"""torch.export `.pt2` archives: vetting before `torch.export.load`, then loading.

A `.pt2` is a zip with `archive_format` = `pt2`, loaded with
`torch.export.load(...).module(check_guards=False)`.

Finding about `torch.export.load` (torch 2.13, read in `torch/export/pt2_archive/_package.py`
and `torch/_export/serde/serialize.py`): it is NOT safe on untrusted files, and its own
docstring says so ("uses pickle under the hood ... never load data from an untrusted source").
A crafted archive can run code through (3 and 4 were demonstrated here: a marker file was
written by a plain `torch.export.load`; the rest is read from the source):

1. payloads flagged `use_pickle` in `data/weights|constants/*_config.json`:
   `torch.load(..., weights_only=False)`;
2. constants named `opaque_obj_*` (`pickle.loads`) or `custom_obj_*` (TorchScript unpickler);
3. legacy `data/weights/<model>.pt` / `data/constants/<model>.pt` and the sample inputs
   `data/sample_inputs/<model>.pt`: `deserialize_torch_artifact` tries `weights_only=True` and
   on failure FALLS BACK to `weights_only=False`;
4. every symbolic-shape `expr_str` in `models/<model>.json` goes through `sympy.sympify`, which
   calls `eval`;
5. graph node targets are resolved by walking attributes from `torch`, `_operator` or `math`
   (`torch.os.system` resolves to `os.system`); torch's dialect verifier then rejects most
   non-operator callables (checked: `torch.os.system` fails with SpecViolationError), but it
   still admits a list of torch helper functions;
6. `guards_code` strings are `exec`'d when `.module()` builds its guard function
   (avoided here with `check_guards=False`);
7. `data/aotinductor/...` entries load compiled native code.

So before calling `torch.export.load` this module inspects the archive itself
(`_check_pt2_archive`): only the entries `torch.export.save` writes for a plain program, no
pickled payloads, sample inputs that load with `weights_only=True`, node targets restricted to
`torch.ops.aten.*` and a few symbolic-int operators, and `expr_str` strings restricted to a
small sympy grammar. After loading, every `call_function` target is checked again on the
deserialised graph.

The zip itself is checked strictly too (`_check_zip_layout`), because two zip readers look at it:
Python's `zipfile` here and torch's C++ reader in `torch.export.load`. Anything on which they could
disagree is refused: duplicate names (each reader may pick a different copy, so the vetted member
need not be the one torch loads), bytes before the first entry or a central directory that is not
where the end record says, local headers that differ from the central directory, overlapping
entries, odd names (`..`, absolute, backslashes). `torch.export.save` stores every member
uncompressed, so compressed or encrypted members are refused as well: that rules out zip bombs,
and every declared size is backed by bytes in the file.
"""

from __future__ import annotations

import io
import json
import logging
import operator
import struct
import re
import tokenize
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from scanner.errors import ModelLoadError
from scanner.loading_common import MAX_TENSOR_ELEMENTS, _Loaded, _one_line, _zip_root_names

# Files torch.export.save writes for a plain program (relative to the archive's root folder).
_PT2_FIXED_ENTRIES = {
    "archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
}
_PT2_ATEN_TARGET = re.compile(
    r"torch\.ops\.aten\.(?!.*__)[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*"
)
_PT2_DENIED_ATEN = {"from_file"}  # reads arbitrary files
_SYM_OPERATORS = ("add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne",
                  "lt", "le", "gt", "ge", "and_", "or_", "getitem")
_PT2_OTHER_TARGETS = {f"_operator.{name}" for name in _SYM_OPERATORS} | {
    "math.ceil", "math.floor", "math.trunc", "torch.sym_float", "torch.sym_int", "torch.sym_max",
    "torch.sym_min", "torch.sym_not", "torch.sym_sqrt", "torch.sym_ite",
}
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Mod", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "True", "False", "oo", "FloorDiv", "CeilDiv", "CleanDiv",
    "ModularIndexing", "Where", "PythonMod", "CeilToInt", "FloorToInt",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    # Symbol(...) assumptions
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero",
    "nonzero", "even", "odd", "rational",
}
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")
_SYMPY_OPS = {
    "(", ")", ",", "+", "-", "*", "/", "%", "**", "//", "=", "==", "!=", "<", "<=", ">", ">=",
    "&", "|", "~",
}
_MAX_POWERS, _MAX_EXPONENT, _MAX_NUMBER_CHARS = 2, 64, 30  # keep sympify's arithmetic small
MAX_JSON_BYTES = 256 * 1024**2  # a program JSON of the 100k-node limit is ~100 MB; JSON expands ~10x in memory
_SYMBOL_STRING = re.compile(r"'[a-z]+[0-9]+'|\"[a-z]+[0-9]+\"")


def _load_pt2(raw: bytes, path: Path, max_bytes: int, max_nodes: int) -> _Loaded:
    details = _check_pt2_archive(raw, path, max_bytes, max_nodes)
    with _torch_log() as logged:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.load(io.BytesIO(raw))
        except Exception as exc:
            # torch logs the real cause (with a traceback) and raises a generic "see the warnings
            # above": report the cause, on one line
            cause = next((r.exc_info[1] for r in logged if r.exc_info and r.exc_info[1] is not None), exc)
            raise ModelLoadError(f"cannot load torch.export program {path}: {_one_line(cause)}") from exc
    _check_pt2_graph_targets(program, path)

    user_inputs = list(program.graph_signature.user_inputs)
    user_outputs = list(program.graph_signature.user_outputs)
    if len(user_inputs) != 1 or len(user_outputs) != 1:
        raise ModelLoadError(
            f"torch.export program {path} has {len(user_inputs)} inputs and {len(user_outputs)} "
            "outputs; one image input and one logits output are expected"
        )
    shape = _pt2_input_dims(program, user_inputs[0])
    if shape is None or len(shape) != 4:
        rank = "unknown" if shape is None else len(shape)
        raise ModelLoadError(
            f"torch.export program {path} takes rank-{rank} input; "
            "images (N, C, H, W) are expected"
        )
    chw = shape[1:]
    input_shape = tuple(chw) if all(isinstance(d, int) for d in chw) else None
    static_batch = shape[0] if isinstance(shape[0], int) else None
    if static_batch is not None:
        details["static_batch"] = static_batch
    try:
        module = program.module(check_guards=False)  # no exec of the archive's guards_code
    except Exception as exc:
        raise ModelLoadError(f"cannot build a module from {path}: {_one_line(exc)}") from exc
    return _Loaded(
        module=module, input_shape=input_shape, details=details,  # type: ignore[arg-type]
        inner_trainable=False, static_batch=static_batch,
        shape_check=lambda batch_shape: _check_pt2_shapes(module, batch_shape, path),
    )


def _check_pt2_shapes(module: torch.nn.Module, batch_shape: tuple[int, ...], path: Path) -> None:
    """Run the graph on fake tensors (shapes only, nothing allocated): every tensor must stay within
    MAX_TENSOR_ELEMENTS, and every static dimension the program records for a node must be the one
    it computes (a program whose recorded shapes lie is corrupt or crafted)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils import _pytree

    class ShapeCheck(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            out = super().run_node(node)
            for value in _pytree.tree_leaves(out):
                if isinstance(value, torch.Tensor) and value.numel() > MAX_TENSOR_ELEMENTS:
                    raise ModelLoadError(f"{path}: node {node.name[:60]} would make a tensor of {value.numel()} "
                                         f"elements on the check batch, over the limit of {MAX_TENSOR_ELEMENTS}")
            recorded = node.meta.get("val")
            if isinstance(recorded, torch.Tensor) and isinstance(out, torch.Tensor) and (
                recorded.dim() != out.dim()
                or any(isinstance(r, int) and r != a for r, a in zip(recorded.shape, out.shape))
            ):
                raise ModelLoadError(f"{path}: node {node.name[:60]} computes shape {tuple(out.shape)} but the "
                                     f"program records {tuple(recorded.shape)}; refused as inconsistent")
            return out

    graph_module = module if isinstance(module, torch.fx.GraphModule) else None
    if graph_module is None:
        return
    try:
        with _torch_log(), FakeTensorMode(allow_non_fake_inputs=True):
            ShapeCheck(graph_module).run(torch.empty(batch_shape))
    except ModelLoadError as exc:  # fx adds "While executing ..." lines to errors raised in a node
        raise ModelLoadError(_one_line(exc)) from exc
    except Exception as exc:  # a shape error in the graph: the real forward would fail the same way
        raise ModelLoadError(f"forward pass of {path} fails on the check batch's shapes: {_one_line(exc)}") from exc


@contextmanager
def _torch_log() -> Iterator[list[logging.LogRecord]]:
    """Collect what torch logs instead of letting it reach stderr: `torch.export.load` and fake
    tensors log multi-line tracebacks when they fail, and the CLI promises one line on stderr.
    torch puts its stderr handlers on `torch` and on some of its children: swap them all."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    collect = Collect()
    names = ["torch", "torch.export"] + [
        name for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith("torch.") and isinstance(logger, logging.Logger) and logger.handlers
    ]
    saved = {}
    for name in dict.fromkeys(names):
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers, logger.propagate)
        logger.handlers = [collect]
        logger.propagate = False
    try:
        yield records
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers = handlers
            logging.getLogger(name).propagate = propagate


def _pt2_input_dims(program: Any, name: str) -> list[Any] | None:
    """Input dims from the placeholder's fake tensor: ints for static dims, SymInts otherwise."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == name:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                return [d if isinstance(d, int) else None for d in value.shape]
    return None


def _check_pt2_archive(raw: bytes, path: Path, max_bytes: int, max_nodes: int) -> dict[str, Any]:
    """Refuse anything in a .pt2 archive that torch.export.load would unpickle, eval or exec
    (see the module docstring). Returns details for the report."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            _check_zip_layout(raw, zf, path)
            root, names = _zip_root_names(zf)
            total = sum(info.file_size for info in zf.infolist())
            if total > max_bytes:
                raise ModelLoadError(
                    f"{path} unpacks to {total} bytes, over the limit of {max_bytes}"
                )

            def read(relative: str) -> bytes:
                info = zf.getinfo(f"{root}/{relative}" if root else relative)
                if relative.endswith(".json") and info.file_size > MAX_JSON_BYTES:
                    raise ModelLoadError(f"{path}: {relative} is {info.file_size} bytes, over the limit of "
                                         f"{MAX_JSON_BYTES} for a JSON member")
                return zf.read(info)

            if "archive_format" not in names or read("archive_format") != b"pt2":
                raise ModelLoadError(
                    f"{path} lacks the archive_format entry of a torch.export .pt2"
                )
            models = [n[len("models/"):-len(".json")] for n in names
                      if n.startswith("models/") and n.endswith(".json")]
            if len(models) != 1:
                raise ModelLoadError(
                    f"{path} holds {len(models)} exported programs; exactly one is expected"
                )
            model = models[0]
            allowed = set(_PT2_FIXED_ENTRIES) | {f"models/{model}.json"}
            allowed |= _pt2_payload_entries(read, names, model, "weights", path)
            allowed |= _pt2_payload_entries(read, names, model, "constants", path)
            sample = f"data/sample_inputs/{model}.pt"
            if sample in names:
                _check_weights_only(read(sample), path, sample)
                allowed.add(sample)
            unexpected = sorted(n for n in names if n not in allowed and not n.startswith("extra/"))
            if unexpected:
                raise ModelLoadError(
                    f"{path} contains entries a plain torch.export program does not have "
                    f"(refused as unsafe): {', '.join(unexpected[:3])}"
                )
            program = json.loads(read(f"models/{model}.json"))
    except ModelLoadError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError, AttributeError,
            TypeError, RecursionError, NotImplementedError, RuntimeError, struct.error) as exc:
        # RecursionError: deeply nested JSON; RuntimeError/NotImplementedError: zipfile on
        # encryption or unknown compression (refused by the layout check first, kept as a net)
        raise ModelLoadError(f"{path} is a corrupt .pt2 archive: {_one_line(exc)}") from exc

    nodes = _check_pt2_program_json(program, path, max_nodes)
    return {"node_count": nodes, "torch_export_schema": program.get("schema_version"),
            "torch_version_saved": program.get("torch_version")}


def _check_zip_layout(raw: bytes, zf: zipfile.ZipFile, path: Path) -> None:
    """Refuse a zip that two readers could see differently, or whose sizes are not backed by
    bytes in the file (see the module docstring)."""
    infos = zf.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ModelLoadError(f"{path} holds the entry {duplicate[:80]!r} more than once; refused")
    for name in names:
        parts = name.split("/")
        if (not name or name.startswith("/") or "\\" in name or ".." in parts or "\0" in name
                or ":" in parts[0] or any(not c.isprintable() for c in name)):
            raise ModelLoadError(f"{path} has an entry with an unsafe name {name[:80]!r}; refused")
    end = raw.rfind(b"PK\x05\x06")
    if end < 0 or len(raw) < end + 22:
        raise ModelLoadError(f"{path} is a corrupt .pt2 archive: no end of central directory")
    disk_entries, entries, directory_size, directory_offset, comment_length = struct.unpack(
        "<HHIIH", raw[end + 8:end + 22])
    zip64 = 0xFFFFFFFF in (directory_size, directory_offset) or 0xFFFF in (disk_entries, entries)
    directory_end = end
    if raw[end - 20:end - 16] == b"PK\x06\x07":  # torch writes zip64 records even for small files
        record = struct.unpack("<Q", raw[end - 12:end - 4])[0]
        if raw[record:record + 4] != b"PK\x06\x06" or record + 12 + struct.unpack(
                "<Q", raw[record + 4:record + 12])[0] != end - 20:
            raise ModelLoadError(f"{path} has a zip64 locator that points nowhere; refused")
        directory_end = record
        if zip64:  # the real values are in the zip64 record
            disk_entries, entries, directory_size, directory_offset = struct.unpack(
                "<QQQQ", raw[record + 24:record + 56])
    elif zip64:
        raise ModelLoadError(f"{path} has zip64 markers in its end record but no zip64 end record; refused")
    consistent = (disk_entries == entries == len(infos) and directory_offset == zf.start_dir
                  and directory_offset + directory_size == directory_end)
    if end + 22 + comment_length != len(raw) or not consistent:
        raise ModelLoadError(f"{path} has an end record that does not match its central directory "
                             "(entry count, size or offset); refused")
    spans = []
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise ModelLoadError(f"{path}: entry {info.filename[:80]!r} is compressed or encrypted; "
                                 "torch.export.save stores entries as they are, so this is refused")
        if info.file_size != info.compress_size:
            raise ModelLoadError(f"{path}: entry {info.filename[:80]!r} declares {info.file_size} bytes but "
                                 f"stores {info.compress_size}; refused")
        header = raw[info.header_offset:info.header_offset + 30]
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise ModelLoadError(f"{path}: entry {info.filename[:80]!r} has no local header where the "
                                 "central directory says; refused")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        local_name = raw[info.header_offset + 30:info.header_offset + 30 + name_length]
        if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
            raise ModelLoadError(f"{path}: entry {info.filename[:80]!r} has a different name in its local "
                                 "header; refused")
        start = info.header_offset + 30 + name_length + extra_length
        if start + info.compress_size > zf.start_dir:
            raise ModelLoadError(f"{path}: entry {info.filename[:80]!r} runs past the end of the entries; "
                                 "refused")
        spans.append((info.header_offset, start + info.compress_size))
    spans.sort()
    if spans and spans[0][0] != 0:
        raise ModelLoadError(f"{path} has bytes before its first zip entry; refused")
    for (_, end_a), (start_b, _) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ModelLoadError(f"{path} has overlapping zip entries; refused")


def _pt2_payload_entries(
    read: Callable[[str], bytes], names: list[str], model: str, kind: str, path: Path
) -> set[str]:
    """Entries of data/<kind>/ that are raw tensor bytes (never pickles); refuse the rest."""
    config_name = f"data/{kind}/{model}_{kind}_config.json"
    if config_name not in names:
        # no config means the legacy pickled `<model>.pt` layout (or an archive we do not know)
        present = [n for n in names if n.startswith(f"data/{kind}/")]
        if present:
            raise ModelLoadError(f"{path} stores {kind} in a pickled layout; refused as unsafe")
        return set()
    config = json.loads(read(config_name)).get("config", {})
    entries = {config_name}
    for fqn, meta in config.items():
        name = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or not (name.startswith("weight_") or name.startswith("tensor_")):
            raise ModelLoadError(
                f"{path} stores {kind[:-1]} {fqn!r} as a pickled object; refused as unsafe"
            )
        entries.add(f"data/{kind}/{name}")
    return entries


def _check_weights_only(payload: bytes, path: Path, entry: str) -> None:
    """torch.export.load retries sample inputs with weights_only=False when the safe load fails:
    refuse anything the safe unpickler rejects."""
    try:
        torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: {entry} does not load with weights_only=True (torch.export.load would retry "
            "it with full unpickling); refused as unsafe"
        ) from exc


def _check_pt2_program_json(program: Any, path: Path, max_nodes: int) -> int:
    """Check node targets and symbolic expressions before torch resolves or sympifies them."""
    if not isinstance(program, dict) or "graph_module" not in program:
        raise ModelLoadError(f"{path}: the exported program JSON lacks a graph")
    nodes = 0
    for item in _walk_json(program):
        if "target" in item and "inputs" in item and "outputs" in item:
            nodes += 1
            target = item["target"]
            if not _allowed_pt2_target(target):
                raise ModelLoadError(
                    f"{path} calls {str(target)[:80]!r}, which is not an aten operator; refused"
                )
        expr = item.get("expr_str")
        if expr is not None and not _safe_sympy_expr(expr):
            raise ModelLoadError(
                f"{path} has a symbolic shape expression outside the safe grammar; refused"
            )
    if nodes > max_nodes:
        raise ModelLoadError(
            f"torch.export program {path} has {nodes} nodes, over the limit of {max_nodes}"
        )
    return nodes


def _walk_json(value: Any) -> Any:
    """Every dict in a JSON value, depth first (iterative: nesting is attacker-controlled)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _allowed_pt2_target(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if _PT2_ATEN_TARGET.fullmatch(target):
        return target.split(".")[3] not in _PT2_DENIED_ATEN
    return target in _PT2_OTHER_TARGETS


def _safe_sympy_expr(expr: Any) -> bool:
    """True if `expr` uses only numbers, symbol names (s0, u3), arithmetic and comparisons, and
    the sympy functions torch's deserializer knows: no attributes, subscripts or other names,
    so sympify's eval cannot reach anything else."""
    if not isinstance(expr, str) or len(expr) > 10_000 or "__" in expr:
        return False
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    tokens = [t for t in tokens if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    if not _bounded_powers(tokens):
        return False
    for tok in tokens:
        if tok.type == tokenize.NUMBER:
            if len(tok.string) > _MAX_NUMBER_CHARS:
                return False
            continue
        if tok.type == tokenize.NAME and (
            tok.string in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(tok.string)
        ):
            continue
        if tok.type == tokenize.OP and tok.string in _SYMPY_OPS:
            continue
        if tok.type == tokenize.STRING and _SYMBOL_STRING.fullmatch(tok.string):
            continue
        return False
    return True


def _bounded_powers(tokens: list[tokenize.TokenInfo]) -> bool:
    """sympify evaluates powers of literals eagerly (`9**9**9**9` never returns): allow at most
    `_MAX_POWERS` of them, each raising to a literal of at most `_MAX_EXPONENT` that is not itself
    raised again. PowByNatural and FloatPow are not in the grammar for the same reason."""
    powers = 0
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.OP or tok.string != "**":
            continue
        powers += 1
        exponent = tokens[i + 1] if i + 1 < len(tokens) else None
        after = tokens[i + 2] if i + 2 < len(tokens) else None
        if (powers > _MAX_POWERS or exponent is None or exponent.type != tokenize.NUMBER
                or not exponent.string.isdigit() or int(exponent.string) > _MAX_EXPONENT
                or (after is not None and after.string == "**")):
            return False
    return True


def _check_pt2_graph_targets(program: Any, path: Path) -> None:
    """After loading: every call_function is an aten operator or a symbolic-int operator."""
    allowed_python = {getattr(operator, name) for name in _SYM_OPERATORS}
    allowed_python |= {torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_not}
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
                if target.namespace == "aten" and target._opname not in _PT2_DENIED_ATEN:
                    continue
            elif node.op == "call_function" and target in allowed_python:
                continue
            raise ModelLoadError(f"{path} graph has a {node.op} of {str(target)[:80]!r}; refused")
