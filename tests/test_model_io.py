"""Safe model loading: formats by content, consistency checks, and refusal of unsafe files."""

from __future__ import annotations

import builtins
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from scanner.errors import DataError, ModelLoadError, UnsupportedModelError
from scanner.export import export_onnx, export_pt2, sha256_file
from scanner.model_io import LoadedModel, PixelSpaceModel, load_model
from scanner.models import build_model
from scanner.pt2_guard import _safe_sympy_expr
from tests.pt2_program import first_dict_with

SHAPE = (1, 28, 28)


class MarkerPayload:
    """Unpickling this writes a marker file: stands in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("nc_mnist", 1, 10, 28).eval()


@pytest.fixture(scope="module")
def files(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("model-io")
    return {
        "onnx": export_onnx(model, out / "m.onnx", SHAPE),
        "pt2": export_pt2(model, out / "m.pt2", SHAPE),
    }


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).random((6, *SHAPE), dtype=np.float32)


def _assert_one_line(exc: pytest.ExceptionInfo) -> None:
    message = str(exc.value)
    assert message and "\n" not in message and "Traceback" not in message


def _rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info)))
    return dst


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_loads_export_with_gradients(
    fmt: str, files: dict[str, Path], model: torch.nn.Module, images: np.ndarray
) -> None:
    loaded = load_model(files[fmt], check_data=images)
    assert isinstance(loaded, LoadedModel)
    assert loaded.format == fmt
    assert loaded.input_shape == SHAPE
    assert loaded.num_classes == 10
    assert loaded.sha256 == sha256_file(files[fmt])
    assert loaded.details["check_batch"]["source"] == "data"
    assert not any(p.requires_grad for p in loaded.module.parameters())
    assert not loaded.module.training

    x = torch.from_numpy(images).requires_grad_(True)
    logits = loaded.module(x)
    with torch.no_grad():
        expected = model(x)
    assert (logits - expected).abs().max().item() < 1e-4
    logits[:, 3].sum().backward()
    assert x.grad is not None and x.grad.abs().sum().item() > 0


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_cpu_placement_goes_channels_last_with_the_same_logits_and_gradients(
    fmt: str, files: dict[str, Path], images: np.ndarray
) -> None:
    from scanner.scan import place_on_device

    plain = load_model(files[fmt], check_data=images).module
    placed = place_on_device(load_model(files[fmt], check_data=images).module, torch.device("cpu"))
    convs = [p for p in placed.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # a one-channel kernel is both layouts at once
    outputs = []
    for module in (plain, placed):
        x = torch.from_numpy(images).requires_grad_(True)
        logits = module(x)
        logits[:, 3].sum().backward()
        outputs.append((logits.detach(), x.grad))
    (logits_a, grad_a), (logits_b, grad_b) = outputs
    assert (logits_a - logits_b).abs().max().item() < 1e-4
    assert (grad_a - grad_b).abs().max().item() < 1e-4 * max(1.0, grad_a.abs().max().item())


def test_onnx_details_record_runtime_check(files: dict[str, Path]) -> None:
    details = load_model(files["onnx"]).details  # no data: a fixed random batch
    assert details["check_batch"]["source"] == "random"
    assert details["onnx_opset"] == 17
    assert details["onnx_torch_max_abs_diff"] <= details["onnx_torch_tolerance"]
    assert details["onnxruntime_providers"] == ["CPUExecutionProvider"]


def test_torchvision_stand_in_is_not_left_behind(files: dict[str, Path]) -> None:
    load_model(files["onnx"])
    assert "onnx2torch" in sys.modules
    stand_in = sys.modules.get("torchvision")
    assert stand_in is None or "stand-in" not in (stand_in.__doc__ or "")


def test_pt2_eval_and_train_do_not_raise(files: dict[str, Path]) -> None:
    module = load_model(files["pt2"]).module
    module.train()
    module.eval()
    assert not module.training


def test_pt2_static_batch_runs_any_batch_size(model: torch.nn.Module, tmp_path: Path) -> None:
    program = torch.export.export(model, (torch.zeros(2, *SHAPE),))  # batch fixed to 2
    torch.export.save(program, tmp_path / "static.pt2")
    loaded = load_model(tmp_path / "static.pt2")
    assert loaded.details["static_batch"] == 2
    x = torch.rand(5, *SHAPE)
    with torch.no_grad():
        assert (loaded.module(x) - model(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_normalization_wrapper(
    fmt: str, files: dict[str, Path], model: torch.nn.Module, images: np.ndarray
) -> None:
    loaded = load_model(files[fmt], normalization=([0.5], [0.5]))
    assert isinstance(loaded.module, PixelSpaceModel)
    assert loaded.details["normalization"] == {"mean": [0.5], "std": [0.5]}
    x = torch.from_numpy(images)
    with torch.no_grad():
        assert (loaded.module(x) - model((x - 0.5) / 0.5)).abs().max().item() < 1e-4


def test_bad_normalization_and_check_data(files: dict[str, Path]) -> None:
    with pytest.raises(DataError):
        load_model(files["pt2"], normalization=([0.5], [0.0]))
    with pytest.raises(DataError, match="channel"):
        load_model(files["pt2"], normalization=([0.5, 0.5, 0.5], [0.2, 0.2, 0.2]))
    with pytest.raises(DataError) as exc:
        load_model(files["pt2"], check_data=np.zeros((2, 3, 32, 32), np.float32))
    _assert_one_line(exc)


def test_nan_logits_are_refused(model: torch.nn.Module, tmp_path: Path) -> None:
    broken = build_model("nc_mnist", 1, 10, 28).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.classifier[3].bias[0] = float("nan")
    paths = [export_pt2(broken, tmp_path / "nan.pt2", SHAPE)]
    paths.append(export_onnx(broken, tmp_path / "nan.onnx", SHAPE))
    for path in paths:
        with pytest.raises(ModelLoadError, match="NaN") as exc:
            load_model(path)
        _assert_one_line(exc)


def test_onnx_disagreeing_with_onnxruntime_is_refused(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import scanner.onnx_loading as onnx_loading

    real_session = onnx_loading._ort_session

    class ShiftedSession:
        """onnxruntime as if the conversion had gone wrong: logits off by 0.5."""

        def __init__(self, session) -> None:
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, names, feeds):
            return [out + 0.5 for out in self.session.run(names, feeds)]

    monkeypatch.setattr(
        onnx_loading, "_ort_session", lambda raw, path: ShiftedSession(real_session(raw, path))
    )
    with pytest.raises(ModelLoadError, match="disagrees with onnxruntime") as exc:
        load_model(files["onnx"])
    _assert_one_line(exc)


# ---------------------------------------------------------------- broken and unknown files


def test_missing_empty_directory_and_oversize(tmp_path: Path, files: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="not found") as exc:
        load_model(tmp_path / "nope.onnx")
    _assert_one_line(exc)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(tmp_path / "empty.onnx")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="over the limit"):
        load_model(files["onnx"], max_bytes=1000)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_too_many_nodes(fmt: str, files: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="nodes, over the limit") as exc:
        load_model(files[fmt], max_nodes=5)
    _assert_one_line(exc)


def test_random_bytes_are_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x17" + np.random.default_rng(0).bytes(4095))
    with pytest.raises(UnsupportedModelError) as exc:
        load_model(path)
    assert exc.value.exit_code == 3
    _assert_one_line(exc)


@pytest.mark.parametrize("damage", ["truncate", "flip_header", "bad_op"])
def test_corrupt_onnx(damage: str, files: dict[str, Path], tmp_path: Path) -> None:
    raw = bytearray(files["onnx"].read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip_header":
        raw[:64] = bytes(b ^ 0xFF for b in raw[:64])
    else:
        raw = bytearray(bytes(raw).replace(b"Conv", b"Cxnv"))
    path = tmp_path / "bad.onnx"
    path.write_bytes(bytes(raw))
    with pytest.raises((ModelLoadError, UnsupportedModelError)) as exc:
        load_model(path)
    _assert_one_line(exc)
    if damage != "flip_header":  # still recognisably ONNX: a load error, not "unsupported"
        assert isinstance(exc.value, ModelLoadError)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_corrupt_zip_and_torchscript(
    files: dict[str, Path], model: torch.nn.Module, tmp_path: Path
) -> None:
    raw = files["pt2"].read_bytes()
    (tmp_path / "cut.pt2").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ModelLoadError) as exc:
        load_model(tmp_path / "cut.pt2")
    _assert_one_line(exc)
    torch.jit.save(torch.jit.trace(model, torch.zeros(2, *SHAPE)), tmp_path / "script.pt")
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        load_model(tmp_path / "script.pt")


# ---------------------------------------------------------------- pickle


@pytest.mark.parametrize("container", ["raw_pickle", "torch_save_zip", "torch_save_named_pt2",
                                       "torch_save_named_onnx"])
def test_malicious_pickle_is_refused_without_unpickling(container: str, tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "marker"
    # the extension says nothing: detection is by content
    path = tmp_path / {"torch_save_named_pt2": "model.pt2", "torch_save_named_onnx": "model.onnx"}.get(
        container, "model.bin")
    if container == "raw_pickle":
        path.write_bytes(pickle.dumps(MarkerPayload(marker), protocol=2))
    else:
        torch.save(MarkerPayload(marker), path)
    assert not marker.exists()
    with pytest.raises(ModelLoadError, match="--allow-pickle") as exc:
        load_model(path)
    assert "refusing to unpickle" in str(exc.value)
    _assert_one_line(exc)
    assert not marker.exists()
    # control: the payload is live, so "no marker" above means the loader never unpickled it
    if container == "raw_pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_malicious_pickle_through_the_cli_exits_2_and_never_runs(tmp_path: Path) -> None:
    """The same refusal end to end: `trojanscan scan` on a pickle that would write a marker."""
    import subprocess

    marker = tmp_path / "marker"
    path = tmp_path / "model.pt2"
    torch.save(MarkerPayload(marker), path)
    images = np.random.default_rng(0).random((50, *SHAPE), dtype=np.float32)
    np.savez(tmp_path / "clean.npz", x=images, y=np.repeat(np.arange(10), 5).astype(np.int64))
    done = subprocess.run([sys.executable, "-m", "scanner.cli", "scan", str(path), "--data", str(tmp_path / "clean.npz"),
                           "--detectors", "ni"], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "refusing to unpickle" in lines[0] and "--allow-pickle" in lines[0]
    assert not marker.exists()


def test_allowed_pickle_loads_a_module(
    model: torch.nn.Module, tmp_path: Path, images: np.ndarray
) -> None:
    path = tmp_path / "model.pth"
    torch.save(model, path)
    loaded = load_model(path, allow_pickle=True, check_data=images)
    assert loaded.format == "pickle" and loaded.num_classes == 10 and loaded.input_shape is None
    x = torch.from_numpy(images)
    with torch.no_grad():
        assert (loaded.module(x) - model(x)).abs().max().item() < 1e-6
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(ModelLoadError, match="not a torch.nn.Module"):
        load_model(tmp_path / "weights.pth", allow_pickle=True)


# ---------------------------------------------------------------- crafted .pt2 archives


def _edit_program_json(edit: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def apply(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            program = json.loads(data)
            edit(program)
            return json.dumps(program).encode()
        return data

    return apply


def _pickled_sample_inputs(marker: Path) -> Callable[[str, bytes], bytes]:
    buffer = io.BytesIO()
    torch.save(MarkerPayload(marker), buffer)
    return lambda name, data: buffer.getvalue() if name.endswith("sample_inputs/model.pt") else data


def _sympy_injection(marker: Path) -> Callable[[str, bytes], bytes]:
    def edit(program: dict) -> None:
        value = first_dict_with(program, "expr_str")  # the symbolic batch size
        payload = f"exec(\"open({str(marker)!r}, 'w').write('x')\")"
        value["expr_str"] = f"{payload} or {value['expr_str']}"

    return _edit_program_json(edit)


def _python_target(marker: Path) -> Callable[[str, bytes], bytes]:
    def edit(program: dict) -> None:
        program["graph_module"]["graph"]["nodes"][1]["target"] = "torch.os.system"

    return _edit_program_json(edit)


def _use_pickle_weight(marker: Path) -> Callable[[str, bytes], bytes]:
    """The first weight stored as a pickle (flagged use_pickle), and that pickle is the payload."""
    buffer = io.BytesIO()
    torch.save(MarkerPayload(marker), buffer)

    def apply(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True  # weight_0: the payload below
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return buffer.getvalue()
        return data

    return apply


def _duplicate_sample_inputs(marker: Path) -> Callable[[str, bytes], bytes]:
    return lambda name, data: data  # the pickled first copy is inserted below


def _with_duplicate_first(src: Path, dst: Path, entry: str, payload: bytes) -> Path:
    """Copy the archive, putting a second `entry` holding `payload` right before the genuine one:
    Python's zipfile reads the last copy of a name, torch's reader the first."""
    import warnings

    with zipfile.ZipFile(src) as zin, warnings.catch_warnings(), \
            zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        warnings.simplefilter("ignore")  # "Duplicate name" is the point
        for info in zin.infolist():
            if info.filename.endswith(entry):
                zout.writestr(info.filename, payload)
            zout.writestr(info.filename, zin.read(info))
    return dst


def _aoti_entry(marker: Path) -> Callable[[str, bytes], bytes]:
    return lambda name, data: data  # the extra entry is added below


# attacks whose payload writes the marker when torch.export.load reads the file unguarded
_LIVE_PAYLOADS = {"_pickled_sample_inputs", "_sympy_injection", "_use_pickle_weight", "_duplicate_sample_inputs"}


@pytest.mark.parametrize(
    "attack",
    [_pickled_sample_inputs, _sympy_injection, _python_target, _use_pickle_weight, _aoti_entry,
     _duplicate_sample_inputs],
)
def test_crafted_pt2_is_refused_before_torch_sees_it(
    attack, files: dict[str, Path], tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    if attack is _duplicate_sample_inputs:
        buffer = io.BytesIO()
        torch.save(MarkerPayload(marker), buffer)
        path = _with_duplicate_first(files["pt2"], tmp_path / "evil.pt2", "sample_inputs/model.pt", buffer.getvalue())
    else:
        path = _rewrite_zip(files["pt2"], tmp_path / "evil.pt2", attack(marker))
    if attack is _aoti_entry:
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr("m/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ModelLoadError, match="refused") as exc:
        load_model(path)
    _assert_one_line(exc)
    assert not marker.exists()
    if attack.__name__ in _LIVE_PAYLOADS:
        # control: torch.export.load on its own runs the payload, so the guard is what stopped it
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.export.load(path)
            except Exception:  # noqa: BLE001  (the payload runs before torch gives up on the file)
                pass
        assert marker.exists(), f"{attack.__name__}: the payload is not live, so the test proves nothing"


def test_malformed_pt2_config_is_a_one_line_load_error(
    files: dict[str, Path], tmp_path: Path
) -> None:
    def edit(name: str, data: bytes) -> bytes:
        return b"[1, 2]" if name.endswith("model_weights_config.json") else data

    with pytest.raises(ModelLoadError) as exc:
        load_model(_rewrite_zip(files["pt2"], tmp_path / "odd.pt2", edit))
    _assert_one_line(exc)


def test_rewritten_but_untouched_pt2_still_loads(files: dict[str, Path], tmp_path: Path) -> None:
    path = _rewrite_zip(files["pt2"], tmp_path / "copy.pt2", lambda name, data: data)
    assert load_model(path).num_classes == 10


@pytest.mark.parametrize(
    ("expr", "safe"),
    [
        ("Symbol('s77', positive=True, integer=True)", True),
        ("2*s0 + Mod(s1, 4)", True),
        ("FloorDiv(s0 - 1, 2) >= 0", True),
        ("__import__('os').system('id')", False),
        ("s0.__class__", False),
        ("exec('x')", False),
        ("Symbol('os', positive=True)", False),
        ("(lambda: 1)()", False),
        ("s0[0]", False),
        ("s0**2 + 1", True),
        ("9**9**9**9", False),  # sympify computes it: never returns
        ("2**99999", False),
        ("PowByNatural(s0, 10**18)", False),
    ],
)
def test_sympy_grammar(expr: str, safe: bool) -> None:
    assert _safe_sympy_expr(expr) is safe


# ---------------------------------------------------------------- limits found by fuzzing (tests/test_fuzz_models.py)


def test_compressed_pt2_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    """torch.export.save stores members as they are: a deflated member could be a zip bomb."""
    path = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(files["pt2"]) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with pytest.raises(ModelLoadError, match="compressed") as exc:
        load_model(path)
    _assert_one_line(exc)


def test_onnx_external_data_is_checked_before_it_is_read(files: dict[str, Path], tmp_path: Path) -> None:
    """A sparse 1 TiB external data file is refused from its size alone (the digest used to read it
    whole), and a range outside the file is refused before onnx seeks to it."""
    import onnx

    model = onnx.load(files["onnx"])
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(2**40))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, tmp_path / "m.onnx")
    with open(tmp_path / "weights.bin", "wb") as handle:
        handle.truncate(2**40)
    with pytest.raises(ModelLoadError, match="over the limit") as exc:
        load_model(tmp_path / "m.onnx")
    _assert_one_line(exc)
    (tmp_path / "weights.bin").unlink()
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="outside") as exc:
        load_model(tmp_path / "m.onnx")
    _assert_one_line(exc)


def test_huge_computed_tensor_is_refused_before_allocation(files: dict[str, Path], tmp_path: Path) -> None:
    """A ConstantOfShape of 2**40 floats added to the logits: refused from shape inference."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(files["onnx"])
    graph = model.graph
    graph.initializer.append(helper.make_tensor("huge_shape", TensorProto.INT64, [2], [2**20, 2**20]))
    out = graph.output[0].name
    graph.node[-1].output[0] = "pre"
    graph.node.extend([helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"]),
                       helper.make_node("ReduceSum", ["huge"], ["total"], keepdims=0),
                       helper.make_node("Add", ["pre", "total"], [out])])
    onnx.save(model, tmp_path / "huge.onnx")
    with pytest.raises(ModelLoadError, match="over the limit") as exc:
        load_model(tmp_path / "huge.onnx")
    _assert_one_line(exc)


def test_pt2_whose_recorded_shapes_lie_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    def edit(program: dict) -> None:
        values = program["graph_module"]["graph"]["tensor_values"]
        values["conv2d"]["sizes"][1] = {"as_int": 17}  # the convolution really makes 16 channels

    path = _rewrite_zip(files["pt2"], tmp_path / "lying.pt2", _edit_program_json(edit))
    with pytest.raises(ModelLoadError, match="records") as exc:
        load_model(path)
    _assert_one_line(exc)
