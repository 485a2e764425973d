"""The dynamic segmenter: counted FLOPs per slice and per volume, slice fitting, the phases of
training, the Decision Network's own learning rate."""

from __future__ import annotations

import pytest
import torch

from medtune.checkpoints.counting import count_flops, flop_counter
from medtune.config import from_dict
from medtune.finetune.dynamic.config import DynamicConfig
from medtune.finetune.dynamic.inference import predict_slices, predict_volume
from medtune.finetune.dynamic.model import DynamicSegmenter
from medtune.models.losses import LossContext, build_criterion


def tiny(form: str = "v2", phase_ends=(2, 4), **model) -> DynamicSegmenter:
    options = {"widths": [4], "crop_size": 16, **model} if form == "v2" else {"form": "v1", "widths": [2, 4], "bits": [], **model}
    cfg = from_dict(DynamicConfig, {"data": {"mode": "2d", "img_size": 32}, "model": options})
    torch.manual_seed(0)
    return DynamicSegmenter(cfg.model, 4, 4, cfg.slice_size, build_criterion(cfg.loss, LossContext(4, 2)), phase_ends)


def force(model: DynamicSegmenter, choices: list[int]) -> None:
    """Make the Decision Network pick ``choices`` for the next call (one batch of live slices);
    it still runs (and costs what it costs)."""
    decide = type(model).decide

    def forced(x: torch.Tensor) -> torch.Tensor:
        decide(model, x)
        return torch.tensor(choices[: x.shape[0]])

    model.decide = forced


def test_skipped_slices_cost_nothing_and_a_volume_costs_the_sum_of_its_slices():
    model = tiny().eval()
    volume = torch.randn(4, 32, 32, 6)
    volume[..., 5] = 0.0  # a constant slice: skipped without a decision
    force(model, [0, 1, 2, 1, 0])  # skip, crop, whole, crop, skip
    model.cost_table()  # the cost model's table is counted once, before predicting
    with torch.no_grad(), flop_counter() as outer:
        result = predict_volume(model, volume, count=True)
    s = result.slices
    assert s.choices == ["skip", "crop", "whole", "crop", "skip", "empty"]
    assert [s.path_flops[i] for i in (0, 4, 5)] == [0, 0, 0] and s.decision_flops[5] == 0
    assert s.decision_flops[0] > 0 and len(set(s.decision_flops[:5])) == 1
    assert sum(s.flops) == int(outer.get_total_flops())  # counted on what ran, nothing lost, nothing twice
    # each chosen path costs what that path costs on that slice alone
    from medtune.finetune.dynamic.inference import _run_path

    for i, path in ((1, "crop"), (2, "whole")):
        alone = count_flops(lambda: _run_path(model, path, volume[None, ..., i].contiguous(), True))
        assert s.path_flops[i] == alone
    assert s.path_flops[1] < s.path_flops[2] / 2  # a 16 px crop of a 32 px slice (+ the crop network)
    assert s.bits[1] is not None and len(s.bits[1]) == 4 and s.origins[1] is not None and s.origins[2] is None
    # the cost model scales each stage's counted FLOPs by bits / 32
    stages, rest, static = model.cost_table()
    whole = model.paths.index("whole")
    expected = float((stages[whole] * torch.tensor(s.bits[2], dtype=torch.float64) / 32).sum() + rest[whole])
    assert s.cost_model_flops[2] == pytest.approx(expected)
    assert static == pytest.approx(count_flops(lambda: model.heads["whole"](model.segmenters[0](volume[None, ..., 0]))))


def test_the_static_run_is_the_whole_slice_path_at_full_precision_on_every_slice():
    model = tiny().eval()
    volume = torch.randn(4, 32, 32, 3)
    result = predict_volume(model, volume, count=True, static=True)
    _, _, static = model.cost_table()
    assert result.slices.choices == ["whole"] * 3 and result.slices.decision_flops == [0] * 3
    assert result.slices.path_flops == [static] * 3
    with torch.no_grad():
        expected = model.heads["whole"](model.segmenters[0](volume.permute(3, 0, 1, 2))).softmax(1)
    assert torch.allclose(result.probabilities, expected.permute(1, 2, 3, 0), atol=1e-5)


def test_an_all_zero_volume_is_skipped_whole_at_no_cost():
    model = tiny().eval()
    result = predict_volume(model, torch.zeros(4, 32, 32, 5), count=True)
    assert result.slices.choices == ["empty"] * 5 and sum(result.slices.flops) == 0
    assert torch.all(result.probabilities.argmax(0) == 0)


@pytest.mark.parametrize("slice_fit", ["pad", "resize"])
def test_slices_of_another_size_are_fitted_and_mapped_back(slice_fit):
    model = tiny().eval()
    volume = torch.randn(4, 45, 27, 3)  # taller and narrower than the 32 px training slices
    force(model, [2, 2, 2])
    result = predict_volume(model, volume, slice_fit=slice_fit)
    assert result.probabilities.shape == (4, 45, 27, 3)
    assert result.fitted_size == ((48, 32) if slice_fit == "pad" else (32, 32))
    if slice_fit == "pad":  # the padded slice's prediction, cropped back: no resampling
        padded = torch.nn.functional.pad(volume.permute(3, 0, 1, 2), (0, 5, 0, 3))
        force(model, [2, 2, 2])
        expected = predict_slices(model, padded).probabilities[..., :45, :27]
        assert torch.allclose(result.probabilities, expected.permute(1, 2, 3, 0), atol=1e-6)


def test_the_eval_crop_is_the_pixels_at_the_located_origin():
    from medtune.finetune.dynamic.inference import _run_path

    model = tiny().eval()
    x = torch.randn(3, 4, 32, 32)
    probs, _, origin = _run_path(model, "crop", x, quantize=False)
    for j in range(3):
        y0, x0 = origin[j].tolist()
        with torch.no_grad():
            alone = model.heads["crop"](model.segmenters[0](x[j:j + 1, :, y0:y0 + 16, x0:x0 + 16])).softmax(1)[0]
        assert torch.allclose(probs[j, :, y0:y0 + 16, x0:x0 + 16], alone, atol=1e-5)
        outside = probs[j].clone()
        outside[:, y0:y0 + 16, x0:x0 + 16] = 0
        assert torch.all(outside[1:] == 0) and outside[0].sum() == 32 * 32 - 16 * 16


def test_each_phase_trains_what_it_should():
    model = tiny(phase_ends=(1, 2)).train()
    batch = {"image": torch.randn(4, 4, 32, 32), "label": torch.randint(0, 4, (4, 32, 32))}

    def step() -> tuple[dict, set[str]]:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss"].backward()
        return out, {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}

    out, trained = step()
    assert out["phase"] == 1 and trained == {"segmenters", "heads", "locator"} and "relative_flops" not in out
    out, trained = step()
    assert out["phase"] == 2 and trained == {"segmenters", "heads", "locator", "selectors"}
    assert 0 < out["relative_flops"] <= 1
    out, trained = step()
    assert out["phase"] == 3 and trained == {"decision"}
    assert torch.isclose(out["chose_skip"] + out["chose_crop"] + out["chose_whole"], torch.tensor(1.0))
    assert int(model.batches_seen) == 3 and "batches_seen" in model.state_dict()


def test_the_v1_bank_has_one_path_per_width_and_no_bits():
    model = tiny("v1").eval()
    assert model.paths == ("skip", "whole_w2", "whole_w4") and model.selectors is None and model.locator is None
    force(model, [1, 2, 0])
    result = predict_slices(model, torch.randn(3, 4, 32, 32), count=True)
    assert result.choices == ["whole_w2", "whole_w4", "skip"] and result.bits == [None] * 3
    assert 0 < result.path_flops[0] < result.path_flops[1] and result.path_flops[2] == 0
    _, _, static = model.cost_table()
    assert static == result.path_flops[1]  # the bank's widest model is the static one


def test_the_decision_network_trains_at_its_own_rate_restarted_in_phase_three():
    from medtune.trainer import LrGroup, ScheduleConfig
    from medtune.trainer.setup import group_lr_factors, lr_factor, split_lr_groups

    model = tiny(phase_ends=(40, 80))
    groups = split_lr_groups(model, list(model.parameters()), model.lr_groups())
    assert [g["group"] for g in groups] == [None, LrGroup("decision.", 10.0, 80)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.decision.parameters()}
    schedule = ScheduleConfig(name="poly", warmup_steps=10)
    run, decision = group_lr_factors(groups, 100, schedule)
    assert run(50) == lr_factor(50, 100, schedule)
    assert decision(50) == pytest.approx(10 * lr_factor(50, 80, schedule))
    assert decision(80) == pytest.approx(10 * 1 / 10)  # warmup again
    assert decision(95) == pytest.approx(10 * lr_factor(15, 20, schedule))


def test_the_crop_network_is_told_where_the_foreground_is_by_hand():
    model = tiny()  # 16 px crops of 32 px slices: 16 px of room on each axis
    label = torch.zeros(3, 32, 32, dtype=torch.long)
    label[0, 20:24, 4:8] = 1  # centre (22, 6): crop origin (14, -2), kept inside the slice: (14, 0)
    label[1, 0:2, 30:32] = 2  # a corner: origin (-7, 23) -> (0, 16)
    target, has = model.locator_target(label)
    assert torch.allclose(target, torch.tensor([[14 / 16, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert has.tolist() == [True, True, False]
    out = model.train()({"image": torch.randn(3, 4, 32, 32), "label": label})
    assert out["loss_locator"] > 0  # phase 1 trains the crop network on it
