"""
Deployment exports: ONNX (fp32 and int8) through the command line and the Python API, checked with ONNX Runtime
against the original code's outputs and the PyTorch model; `torch.export` round trips; refusals of bad inputs.

Every export traces a tiny model (a few seconds each), and the exports are shared between tests where they can be.
"""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import FIXTURES, randomize_, tiny_config
from PIL import Image
from transformers import ViTConfig

from refiner_hf import RefinerViTForImageClassification, convert_original_checkpoint, onnx_export
from refiner_hf import export as export_cli
from refiner_hf.assets import sample_image_path
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.model_directory import save_model_directory
from refiner_hf.onnx_export import (
    ExportError,
    OnnxImageClassifier,
    export_program,
    onnx_session,
    save_onnx_directory,
)


ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = {
    "configuration_refiner_vit.py",
    "image_processing_refiner_vit.py",
    "image_processing_pil_refiner_vit.py",
    "image_processing_refiner_vit_common.py",
    "cli.py",  # the configuration's preset-name refusal is a UsageError
    "interruption.py",  # imported by cli.py
}
EXPORT_FILES = {"config.json", "preprocessor_config.json", "model.onnx", *CODE_FILES}
# int8 linear layers against float32, on these random-weight models: measured up to 2 % of the logits' scale on the
# check photo and the original code's inputs; a quantization that went wrong (a wrong scale, a saturated product) is
# off by the scale itself.
INT8_RELATIVE_TOLERANCE = 0.06


def photo() -> Image.Image:
    return Image.open(sample_image_path()).convert("RGB")


def expected_outputs(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}_expected.pt", weights_only=True)


def assert_close_to_scale(actual: np.ndarray, expected: torch.Tensor, relative: float) -> None:
    """`actual` within `relative` times the scale (max(1, max |expected|)) of `expected`."""
    expected = expected.numpy()
    scale = max(1.0, float(np.abs(expected).max()))
    assert actual.shape == expected.shape
    difference = float(np.abs(actual - expected).max())
    assert difference <= relative * scale, f"max difference {difference:.3g}, allowed {relative * scale:.3g}"


def run(argv, capsys) -> tuple[int, str, str]:
    code = export_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny original checkpoints converted to model directories (released: EMA weights, the default)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name in ("released_tiny", "paper_tiny"):
        model = convert_original_checkpoint(FIXTURES / f"{name}.pth", layer_norm_eps=1e-6)
        dirs[name] = save_model_directory(model, image_processor_for_config(model.config), root / name)
    return dirs


@pytest.fixture(scope="module")
def released_export(model_dirs, tmp_path_factory) -> tuple[Path, str]:
    """The released fixture exported through the command line with every output and int8; (directory, stdout)."""
    out = tmp_path_factory.mktemp("exports") / "released-onnx"
    argv = ["--model", model_dirs["released_tiny"], "--output", out, "--quantize", "int8"]
    argv += ["--extra-outputs", "aux_logits", "cls_logits"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = export_cli.main([str(a) for a in argv])
    assert code == 0
    return out, stdout.getvalue()


def test_cli_export_of_the_released_fixture_reproduces_the_original_code(released_export, model_dirs):
    out, stdout = released_export
    lines = stdout.splitlines()
    assert lines[0].startswith(f"Loaded {model_dirs['released_tiny']}: custom Refiner-ViT, 621,192 parameters, 64 px")
    assert lines[1].startswith("Exported the reference computation to ONNX in ")
    assert lines[2].startswith(
        "ONNX Runtime reproduces the PyTorch model on chelsea.jpg (prepared by the written image processor) at batch "
        "sizes 1 and 3: logits max difference "
    )
    assert "; cls_logits max difference " in lines[2] and "; aux_logits max difference " in lines[2]
    assert lines[3].startswith("model.onnx: ") and lines[3].endswith(
        " opset 20, outputs logits, cls_logits, aux_logits."
    )
    assert lines[4].startswith("model_quantized.onnx (int8 linear layers): ") and "same top-1 as PyTorch on" in lines[4]
    assert lines[5] == f"Wrote {out}"
    assert {p.name for p in out.iterdir()} == EXPORT_FILES | {"model_quantized.onnx"}
    model = onnx.load(out / "model.onnx")
    dims = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*model.graph.input, *model.graph.output]
    }
    assert dims == {
        "pixel_values": ["batch_size", 3, 64, 64],
        "logits": ["batch_size", 10],
        "cls_logits": ["batch_size", 10],
        "aux_logits": ["batch_size", 16, 10],
    }
    # No stack traces of the exporting machine (its paths) in a file meant to be shared.
    assert str(ROOT).encode() not in (out / "model.onnx").read_bytes()
    assert not any(p.key == "pkg.torch.onnx.stack_trace" for node in model.graph.node for p in node.metadata_props)
    # Standard operators only: the fast path's C++ kernels (or any custom op) would need their own domain.
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert [entry.version for entry in model.opset_import if entry.domain == ""] == [20]

    data = expected_outputs("released_tiny")
    session = onnx_session(out / "model.onnx")
    logits, cls_logits, aux_logits = session.run(None, {"pixel_values": data["input"].numpy()})
    for name, actual in (("logits", logits), ("cls_logits", cls_logits), ("aux_logits", aux_logits)):
        assert_close_to_scale(actual, data["expected_ema"][name], 1e-4)
    # Dynamic batch: one image at a time gives what the batch of three gave.
    for index in range(3):
        single = session.run(["logits"], {"pixel_values": data["input"][index : index + 1].numpy()})[0]
        np.testing.assert_allclose(single[0], logits[index], atol=1e-5, rtol=0)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "refiner-vit" and config["image_size"] == 64
    assert config["auto_map"] == {"AutoConfig": "configuration_refiner_vit.RefinerViTConfig"}
    source = model_dirs["released_tiny"]
    assert json.loads((out / "preprocessor_config.json").read_text()) == json.loads(
        (source / "preprocessor_config.json").read_text()
    )


def test_int8_export_is_smaller_and_close(released_export):
    out, _ = released_export
    data = expected_outputs("released_tiny")
    quantized = onnx.load(out / "model_quantized.onnx")
    ops = {node.op_type for node in quantized.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert (out / "model_quantized.onnx").stat().st_size < 0.8 * (out / "model.onnx").stat().st_size
    logits = onnx_session(out / "model_quantized.onnx").run(["logits"], {"pixel_values": data["input"].numpy()})[0]
    assert_close_to_scale(logits, data["expected_ema"]["logits"], INT8_RELATIVE_TOLERANCE)
    assert (logits.argmax(-1) == data["expected_ema"]["logits"].argmax(-1).numpy()).all()


def test_check_mode_proves_an_export_and_refuses_a_wrong_one(released_export, model_dirs, tmp_path, capsys):
    out, _ = released_export
    code, stdout, err = run(["--model", model_dirs["released_tiny"], "--output", out, "--check"], capsys)
    assert code == 0, err
    assert f"{out} holds a correct export of {model_dirs['released_tiny']}." in stdout
    assert "at batch sizes 1 and 3: logits max difference" in stdout
    assert "model_quantized.onnx (int8 linear layers):" in stdout and "same top-1 as PyTorch on 100 %" in stdout

    # The same export checked against other weights (the raw ones instead of the EMA ones) fails, naming the output.
    raw = convert_original_checkpoint(FIXTURES / "released_tiny.pth", weights="raw", layer_norm_eps=1e-6)
    raw_dir = save_model_directory(raw, image_processor_for_config(raw.config), tmp_path / "raw")
    code, _, err = run(["--model", raw_dir, "--output", out, "--check"], capsys)
    assert code == 1
    assert err.count("\n") == 1
    assert "ONNX Runtime's logits differ from the PyTorch model's by" in err and "at batch size 1" in err


def test_python_api_export_of_the_paper_fixture(model_dirs, tmp_path):
    """Patch stem, no auxiliary head, refined / shared / plain blocks, from the original code's DDP state dict."""
    model = RefinerViTForImageClassification.from_pretrained(model_dirs["paper_tiny"]).eval()
    processor = image_processor_for_config(model.config)
    with pytest.raises(ExportError, match="no auxiliary head"):
        save_onnx_directory(model, processor, tmp_path / "refused", photo(), outputs=["aux_logits"])
    assert not (tmp_path / "refused").exists()

    model.set_fast_inference()  # the export still traces the reference computation, and leaves this setting alone
    result = save_onnx_directory(model, processor, tmp_path / "paper-onnx", photo(), outputs=["cls_logits"])
    assert model.refiner_vit.layers[0].attention.fast_inference and not model.training
    assert result.outputs == ("logits", "cls_logits") and result.fp32.batch_sizes == (1, 3)
    assert result.fp32.max_difference["logits"] <= 1e-4 * result.fp32.scale["logits"]
    assert result.int8 is None and set(result.sizes) == {"model.onnx"}
    assert {p.name for p in (tmp_path / "paper-onnx").iterdir()} == EXPORT_FILES

    data = expected_outputs("paper_tiny")
    graph = onnx.load(tmp_path / "paper-onnx" / "model.onnx").graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # no custom (C++ kernel) operators
    session = onnx_session(tmp_path / "paper-onnx" / "model.onnx")
    assert [output.name for output in session.get_outputs()] == ["logits", "cls_logits"]
    for batch in (data["input"][:1], data["input"]):  # batch sizes 1 and 3
        logits, cls_logits = session.run(None, {"pixel_values": batch.numpy()})
        assert_close_to_scale(logits, data["expected"]["logits"][: len(batch)], 1e-4)
        assert_close_to_scale(cls_logits, data["expected"]["cls_logits"][: len(batch)], 1e-4)


def test_mixed_pattern_exported_at_another_image_size(tmp_path, capsys):
    """Plain, refined and shared blocks in a new order, an even refinement kernel, exported at 48 px from 32 px."""
    config = tiny_config(
        num_hidden_layers=5, block_types=["plain", "refined", "shared", "refined", "plain"], refine_kernel_size=4
    )
    model = randomize_(RefinerViTForImageClassification(config), seed=3).eval()
    model_dir = save_model_directory(model, image_processor_for_config(config, crop_pct=0.8), tmp_path / "model")
    code, stdout, err = run(["--model", model_dir, "--output", tmp_path / "onnx", "--image-size", 48], capsys)
    assert code == 0, err
    assert "its image processor, resized to 48 px" in stdout

    exported = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert exported["image_size"] == 48 and exported["block_types"] == config.block_types
    processor_config = json.loads((tmp_path / "onnx" / "preprocessor_config.json").read_text())
    assert processor_config["crop_size"] == {"height": 48, "width": 48} and processor_config["crop_pct"] == 0.8

    model.resize_position_embeddings(48)
    pixel_values = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values).logits
    session = onnx_session(tmp_path / "onnx" / "model.onnx")
    assert_close_to_scale(session.run(["logits"], {"pixel_values": pixel_values.numpy()})[0], expected, 1e-4)


def test_onnx_directory_classifies_without_the_package_or_a_pytorch_model(released_export, model_dirs):
    out, _ = released_export
    model = RefinerViTForImageClassification.from_pretrained(model_dirs["released_tiny"]).eval()
    processor = image_processor_for_config(model.config)
    with torch.no_grad():
        expected = model(**processor(photo(), return_tensors="pt")).logits.softmax(-1)[0]
    top = expected.topk(3)

    classifier = OnnxImageClassifier.from_pretrained(out)
    result = classifier(str(sample_image_path()), top_k=3)
    assert [entry["label"] for entry in result] == [model.config.id2label[i] for i in top.indices.tolist()]
    np.testing.assert_allclose([entry["score"] for entry in result], top.values.numpy(), atol=1e-5)
    int8 = OnnxImageClassifier.from_pretrained(out, file_name="model_quantized.onnx")
    assert int8([photo(), photo()], top_k=1)[1][0]["label"] == result[0]["label"]

    # Where refiner_hf cannot be imported: the configuration and processor come from the code beside them.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["refiner_hf"] = None  # importing it fails
        import onnxruntime
        from PIL import Image
        from transformers import AutoConfig, AutoImageProcessor

        directory, image = sys.argv[1], Image.open(sys.argv[2])
        config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
        session = onnxruntime.InferenceSession(directory + "/model.onnx")
        for backend in ("torchvision", "pil"):
            processor = AutoImageProcessor.from_pretrained(directory, trust_remote_code=True, backend=backend)
            pixel_values = processor(image, return_tensors="np")["pixel_values"]
            print(backend, config.id2label[int(session.run(["logits"], {"pixel_values": pixel_values})[0].argmax())])
        """
    )
    result_lines = subprocess.run(
        [sys.executable, "-c", script, str(out), str(sample_image_path())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out.parent,
    )
    assert result_lines.returncode == 0, result_lines.stderr
    label = model.config.id2label[int(top.indices[0])]
    assert result_lines.stdout.splitlines() == [f"torchvision {label}", f"pil {label}"]


def test_torch_export_round_trip(model_dirs, tmp_path):
    model = RefinerViTForImageClassification.from_pretrained(model_dirs["released_tiny"]).eval()
    model.set_fast_inference()  # the program is still the reference computation
    program = export_program(model, outputs=("cls_logits", "aux_logits"))
    names = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("refiner" in name for name in names)  # no custom (C++ kernel) operators
    torch.export.save(program, tmp_path / "refiner-vit.pt2")
    loaded = torch.export.load(tmp_path / "refiner-vit.pt2").module()
    data = expected_outputs("released_tiny")
    for batch in (data["input"][:1], data["input"]):  # batch sizes 1 and 3; the program was traced at 2
        logits, cls_logits, aux_logits = loaded(batch)
        with onnx_export.reference_computation(model), torch.no_grad():
            expected = model(batch)
        torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(cls_logits, expected.cls_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(aux_logits, expected.aux_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits, data["expected_ema"]["logits"][: len(batch)], atol=1e-4, rtol=0)


# Refusals: one line, exit status 2 for what was asked (1 for a failure while writing), nothing written.


def vit_directory(path: Path) -> Path:
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("missing model", 2, "--model {tmp}/missing: no such directory."),
        ("no config.json", 2, "--model {tmp}/empty: no config.json in this directory"),
        ("not a Refiner-ViT", 2, "--model {tmp}/vit: a 'vit' model, not a Refiner-ViT (model_type 'refiner-vit')"),
        ("non-empty output", 1, "{tmp}/taken exists and is not empty: pass --overwrite to replace the ONNX export"),
        ("overwrite other files", 1, "{tmp}/taken is not an ONNX export directory (it holds other files (notes.txt))"),
        ("output is the model", 1, "{tmp}/model holds {tmp}/model, which this command reads"),
        ("unwritable output", 2, "--output {tmp}/file.txt/onnx: {tmp}/file.txt is a file, so no directory can be"),
        ("aux_logits without aux head", 2, "This model has no auxiliary head (`use_aux_head` is false)"),
        ("old opset", 2, "--opset 17: the exporter writes opsets 18 to "),
        ("check of nothing", 2, "--check {tmp}/nothing: not an export directory (no config.json and model.onnx)"),
        ("unknown argument", 2, "unknown argument --quantise. Did you mean --quantize?"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_leave_nothing(model_dirs, tmp_path, capsys, case, status, message):
    (tmp_path / "empty").mkdir()
    vit_directory(tmp_path / "vit")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("a file")
    model = tmp_path / "model"
    shutil.copytree(model_dirs["paper_tiny"], model)
    argv = {
        "missing model": ["--model", tmp_path / "missing", "--output", tmp_path / "out"],
        "no config.json": ["--model", tmp_path / "empty", "--output", tmp_path / "out"],
        "not a Refiner-ViT": ["--model", tmp_path / "vit", "--output", tmp_path / "out"],
        "non-empty output": ["--model", model, "--output", tmp_path / "taken"],
        "overwrite other files": ["--model", model, "--output", tmp_path / "taken", "--overwrite"],
        "output is the model": ["--model", model, "--output", model, "--overwrite"],
        "unwritable output": ["--model", model, "--output", tmp_path / "file.txt" / "onnx"],
        "aux_logits without aux head": [
            "--model",
            model,
            "--output",
            tmp_path / "out",
            "--extra-outputs",
            "aux_logits",
        ],
        "old opset": ["--model", model, "--output", tmp_path / "out", "--opset", "17"],
        "check of nothing": ["--model", model, "--output", tmp_path / "nothing", "--check"],
        "unknown argument": ["--model", model, "--output", tmp_path / "out", "--quantise", "int8"],
    }[case]
    before = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    code, _, err = run(argv, capsys)
    assert code == status
    assert err.count("\n") == 1 and err.startswith("refiner-vit-export: error: ")
    assert message.format(tmp=tmp_path) in err
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")} == before
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_failed_check_or_an_interrupt_keeps_the_previous_export(
    released_export, model_dirs, tmp_path, capsys, monkeypatch
):
    out, _ = released_export
    previous = tmp_path / "onnx"
    shutil.copytree(out, previous)
    before = snapshot(previous)

    # An export of other weights than the model's: the check fails, the previous export stays, nothing else is left.
    real_export = onnx_export.export_onnx

    def export_other_weights(model, path, **kwargs):
        other = randomize_(RefinerViTForImageClassification(model.config), seed=7).eval()
        return real_export(other, path, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", export_other_weights)
    code, _, err = run(["--model", model_dirs["released_tiny"], "--output", previous, "--overwrite"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "ONNX Runtime's logits differ from the PyTorch model's by" in err
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"] and snapshot(previous) == before

    # Ctrl-C (or SIGTERM, which the command turns into the same unwinding) while writing.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_onnx", interrupted)
    code, _, err = run(["--model", model_dirs["released_tiny"], "--output", previous, "--overwrite"], capsys)
    assert code == 130
    assert err == "refiner-vit-export: error: stopped by an interrupt; nothing half-written was left behind.\n"
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"] and snapshot(previous) == before


def test_overwrite_replaces_a_previous_export(released_export, model_dirs, tmp_path, capsys):
    out, _ = released_export
    previous = tmp_path / "onnx"
    shutil.copytree(out, previous)
    code, stdout, err = run(["--model", model_dirs["paper_tiny"], "--output", previous, "--overwrite"], capsys)
    assert code == 0, err
    assert f"Wrote {previous}" in stdout and "model.onnx: " in stdout and "opset 20, outputs logits." in stdout
    assert {p.name for p in previous.iterdir()} == EXPORT_FILES  # the int8 model of the previous export is gone
    assert json.loads((previous / "config.json").read_text())["image_size"] == 48
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]


def test_console_script_and_module_are_declared():
    setup = (ROOT / "setup.cfg").read_text()
    assert "refiner-vit-export = refiner_hf.export:main" in setup
    result = subprocess.run(
        [sys.executable, "-m", "refiner_hf.export", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--quantize {int8}" in result.stdout and "--check" in result.stdout
