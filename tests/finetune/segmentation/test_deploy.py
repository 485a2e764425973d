"""``medtune export RUN --format onnx``: onnxruntime gives PyTorch's logits for any batch size
(LoRA merged for the export), and a run of a task without ONNX is refused."""

from __future__ import annotations

import json

import pytest
import torch

from medtune.checkpoints.export import export_run
from medtune.errors import CheckpointError
from medtune.finetune.segmentation import load_segmenter

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
onnxruntime = pytest.importorskip("onnxruntime")


def test_onnx_export_of_a_lora_segmenter_matches_pytorch_for_any_batch(make_segmentation_run, tmp_path):
    run = make_segmentation_run(tmp_path / "run", "lora", r=4)
    export = export_run(run, tmp_path / "onnx", "onnx")
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.onnx"]
    assert json.loads((export / "config.json").read_text())["derived"]["export"]["format"] == "onnx"

    import onnx

    graph = onnx.load(str(export / "model.onnx")).graph
    assert not any("lora" in init.name for init in graph.initializer)  # merged into the base weights
    session = onnxruntime.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits"]
    model = load_segmenter(run)
    for batch in (1, 3):
        volume = torch.randn(batch, 4, 32, 32, 2, generator=torch.Generator().manual_seed(batch))
        (logits,) = session.run(["logits"], {"image": volume.numpy()})
        with torch.no_grad():
            expected = model.forward_logits(volume)
        assert logits.shape == (batch, 4, 32, 32, 2)
        assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4)


def test_an_onnx_file_that_disagrees_with_pytorch_is_refused(tmp_path):
    from medtune.finetune.segmentation.deploy import check_onnx

    class Doubled(torch.nn.Module):
        def forward(self, image):
            return image * 2

    torch.onnx.export(Doubled().eval(), (torch.randn(2, 1, 4, 4, 2),), str(tmp_path / "m.onnx"), dynamo=True,
                      input_names=["image"], output_names=["logits"],
                      dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=8)}})

    class Tripled(torch.nn.Module):
        def forward(self, image):
            return image * 3

    assert check_onnx(Doubled(), tmp_path / "m.onnx", 1, (4, 4, 2)) == 0.0
    with pytest.raises(CheckpointError, match="onnxruntime's logits differ from PyTorch's"):
        check_onnx(Tripled(), tmp_path / "m.onnx", 1, (4, 4, 2))
