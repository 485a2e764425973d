"""`medtune params`: counts against peft, exact safetensors sizes, FLOP scaling, output formats."""

from __future__ import annotations

import json

import pytest
import torch

from medtune.checkpoints.params import (
    compare_methods,
    forward_flops,
    format_table,
    measure_method,
    safetensors_size,
    segmentation_config,
)
from medtune.cli import main


@pytest.fixture(scope="module")
def rows(tiny_segmenter_args):
    return {
        r.method: r
        for r in compare_methods(**tiny_segmenter_args, methods=("full", "decoder-only", "lora", "med-tuning"))
    }


def test_lora_row_equals_peft_trainable_count(rows, tiny_segmenter_args):
    import timm
    from peft import LoraConfig, get_peft_model

    args = tiny_segmenter_args
    model = timm.create_model(args["backbone"], pretrained=False, in_chans=args["in_chans"], img_size=args["img_size"],
                              num_classes=0, **args["backbone_options"])
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["qkv", "attn.proj", "fc1", "fc2"], bias="none")
    )
    peft_trainable, _ = peft_model.get_nb_trainable_parameters()
    assert rows["lora"].backbone_trainable == peft_trainable
    # each ViT-tiny block: qkv 192->576, proj 192->192, fc1 192->768, fc2 768->192 at r=8
    assert peft_trainable == 4 * 8 * ((192 + 576) + (192 + 192) + (192 + 768) + (768 + 192))


def test_rows_are_consistent_across_methods(rows):
    decoder_params = rows["decoder-only"].trainable
    assert rows["decoder-only"].backbone_trainable == 0
    assert rows["full"].trainable == rows["full"].total
    assert rows["lora"].trainable == decoder_params + rows["lora"].backbone_trainable
    assert rows["lora"].total == rows["full"].total + rows["lora"].backbone_trainable
    assert 0 < rows["med-tuning"].backbone_trainable < rows["full"].backbone_trainable
    assert rows["full"].trainable_percent == pytest.approx(100.0)
    # same backbone and decoder compute: decoder-only and full cost the same FLOPs
    assert rows["full"].gflops == rows["decoder-only"].gflops
    assert rows["lora"].gflops > rows["full"].gflops
    assert rows["full"].trained_bytes > rows["med-tuning"].trained_bytes > rows["decoder-only"].trained_bytes


def test_safetensors_size_is_exact_for_real_trained_tensors(tmp_path, tiny_segmenter_args):
    from medtune.checkpoints.io import save_safetensors
    from medtune.finetune.segmentation import build_segmenter
    from medtune.finetune.weights import head_state_dict, save_adapter_files

    cfg = segmentation_config(**tiny_segmenter_args, method="med-tuning")
    model = build_segmenter(cfg, 4, load_pretrained=False)
    state = head_state_dict(model)
    assert any(t.dtype == torch.int64 for t in state.values())  # BatchNorm counters: mixed dtypes
    metadata = {"task": "segmentation"}
    save_safetensors(state, tmp_path / "trained.safetensors", metadata=metadata)
    assert safetensors_size(state, metadata) == (tmp_path / "trained.safetensors").stat().st_size
    meta_state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    assert safetensors_size(meta_state, metadata) == (tmp_path / "trained.safetensors").stat().st_size
    # the column is what a run writes: adapter.safetensors + head.safetensors
    save_safetensors(model.backbone.state_dict(), tmp_path / "backbone.safetensors")
    save_adapter_files(model, tmp_path, tmp_path / "backbone.safetensors", "segmentation")
    written = sum((tmp_path / f).stat().st_size for f in ("adapter.safetensors", "head.safetensors"))
    assert measure_method(cfg).trained_bytes == written


def test_flops_hand_count_and_slice_scaling(tiny_segmenter_args):
    # One linear layer: 2 * in * out FLOPs per token.
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 5)

        def forward_logits(self, volume):
            return self.fc(volume.movedim(1, -1))

    assert forward_flops(Linear(), (1, 3, 2, 2, 4), device="cpu") == 2 * 3 * 5 * (2 * 2 * 4)
    cfg = segmentation_config(**tiny_segmenter_args, method="lora")
    exact = measure_method(cfg).gflops
    assert measure_method(cfg, flops_slices=2).gflops == pytest.approx(exact, rel=1e-9)


def test_cli_formats_and_plot(tmp_path, capsys):
    argv = ["params", "--backbone", "vit_tiny_patch16_224", "--img-size", "32", "--slices", "2",
            "--methods", "decoder-only,lora", "--option", "depth=4", "--decoder-option", "channels=8"]
    assert main(argv + ["--format", "json", "--plot", str(tmp_path / "costs.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in data] == ["decoder-only", "lora"]
    assert (tmp_path / "costs.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv + ["--format", "markdown"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| method") and len(table) == 4
    assert "GFLOPs/volume" in table[0] and "trained weights (bytes)" in table[0]
    csv_text = format_table([], "csv")
    assert csv_text.startswith("method,total,trainable")
    assert main(argv + ["--methods", "no-such-method"]) == 2


def test_cli_refuses_bad_sizes_and_plot_format_before_measuring(tmp_path, capsys):
    argv = ["params", "--backbone", "vit_tiny_patch16_224", "--img-size", "32", "--methods", "lora",
            "--option", "depth=4"]
    assert main(argv + ["--slices", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["medtune: error: --slices must be >= 1, got 0"]
    assert main(argv + ["--slices", "2", "--plot", str(tmp_path / "costs.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "costs.txt" in err[0] and "'txt'" in err[0] and "png" in err[0]
    assert not (tmp_path / "costs.txt").exists()


def test_grouped_conv_backward_flops_are_counted_per_group():
    from torch.utils.flop_counter import FlopCounterMode

    from medtune.checkpoints.counting import flop_counter

    def backward_flops(counter, groups):
        conv = torch.nn.Conv3d(8, 8, 3, padding=1, groups=groups)
        x = torch.zeros(1, 8, 4, 4, 4, requires_grad=True)
        with counter:
            conv(x).sum().backward()
        counts = {str(k).split(".")[-1]: v for k, v in counter.get_flop_counts()["Global"].items()}
        return counts["convolution"], counts["convolution_backward"]

    # depthwise: forward = 2 * 64 positions * 8 channels * 27 taps; input + weight grads = 2x that
    forward, backward = backward_flops(flop_counter(), groups=8)
    assert forward == 2 * 64 * 8 * 27 and backward == 2 * forward
    # dense convolutions: the same numbers as torch's own formula
    assert backward_flops(flop_counter(), 1) == backward_flops(FlopCounterMode(display=False), 1)


def test_self_distill_overhead_rows(capsys):
    argv = ["params", "--backbone", "vit_tiny_patch16_224", "--img-size", "32", "--slices", "2",
            "--methods", "full,med-tuning", "--option", "depth=4", "--decoder-option", "channels=8",
            "--self-distill", "--format", "csv"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    sd_lines = out.split("self-distillation")[1].strip().splitlines()
    assert sd_lines[1].startswith("method,extra_params,train_gflops,train_gflops_sd,ratio")
    for line in sd_lines[2:]:
        method, extra, plain, with_sd, ratio = line.split(",")
        # the masked branch shares every weight and adds one forward + backward of the student
        assert int(extra) == 0 and float(with_sd) > float(plain) > 0
        assert abs(float(ratio) - 2.0) < 0.01


def test_referring_overhead_counts_the_two_mask_tokens(capsys):
    assert main(["params", "--referring", "configs/demo_referring.yaml", "--format", "json"]) == 0
    plain, with_sd = json.loads(capsys.readouterr().out)
    assert with_sd["params"] - plain["params"] == 2 * 64  # an image and a word mask token, width 64
    assert with_sd["train_gflops"] > plain["train_gflops"]
    assert main(["params", "--referring", "configs/demo_finetune.yaml"]) == 2  # no referring model


def test_whole_networks_are_compared_on_one_crop(capsys, tmp_path):
    """``medtune params --networks``: parameters, weights size and forward FLOPs of the
    segment3d networks, built on the meta device."""
    argv = ["params", "--networks", "transbtsv2,cga_unet,unetr", "--img-size", "64", "--slices", "32",
            "--format", "json"]
    assert main(argv) == 0
    rows = {row["network"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"transbtsv2", "cga_unet", "unetr"}
    for row in rows.values():
        assert row["total"] == row["trainable"] > 0 and row["gflops"] > 0
        assert row["weights_bytes"] > 4 * row["total"]  # float32 tensors + the safetensors header
    # CGA U-Net's counted FLOPs scale with the voxels: 64 x 64 x 32 is twice 64 x 32 x 32
    half = json.loads(_run_json(capsys, ["params", "--networks", "cga_unet", "--img-size", "64", "--slices", "16"]))
    assert rows["cga_unet"]["gflops"] == pytest.approx(2 * half[0]["gflops"], rel=1e-6)
    assert main(["params", "--networks", "transbts"]) == 2  # an unknown network: one line, exit 2


def test_a_model_that_cannot_be_built_on_meta_is_built_on_the_cpu_and_moved():
    from medtune.checkpoints.params import build_on_meta

    def build():
        layer = torch.nn.Linear(2, 3)
        layer.weight.sum().item()  # like MONAI's SwinTransformer: fails on meta tensors
        return layer

    assert build_on_meta(build).weight.device.type == "meta"


def _run_json(capsys, argv) -> str:
    assert main(argv + ["--format", "json"]) == 0
    return capsys.readouterr().out
