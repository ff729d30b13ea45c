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
"""

from __future__ import annotations

import io
import json
import operator
import re
import tokenize
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from scanner.errors import ModelLoadError
from scanner.loading_common import _Loaded, _one_line, _zip_root_names

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
    "ModularIndexing", "Where", "PythonMod", "CeilToInt", "FloorToInt", "PowByNatural",
    "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
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
_SYMBOL_STRING = re.compile(r"'[a-z]+[0-9]+'|\"[a-z]+[0-9]+\"")


def _load_pt2(raw: bytes, path: Path, max_bytes: int, max_nodes: int) -> _Loaded:
    details = _check_pt2_archive(raw, path, max_bytes, max_nodes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(raw))
    except Exception as exc:
        raise ModelLoadError(f"cannot load torch.export program {path}: {_one_line(exc)}") from exc
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
    )


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
            root, names = _zip_root_names(zf)
            total = sum(info.file_size for info in zf.infolist())
            if total > max_bytes:
                raise ModelLoadError(
                    f"{path} unpacks to {total} bytes, over the limit of {max_bytes}"
                )

            def read(relative: str) -> bytes:
                return zf.read(f"{root}/{relative}" if root else relative)

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
            TypeError) as exc:
        raise ModelLoadError(f"{path} is a corrupt .pt2 archive: {_one_line(exc)}") from exc

    nodes = _check_pt2_program_json(program, path, max_nodes)
    return {"node_count": nodes, "torch_export_schema": program.get("schema_version"),
            "torch_version_saved": program.get("torch_version")}


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
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.NUMBER:
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
