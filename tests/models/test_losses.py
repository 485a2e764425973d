"""The loss registry: a run's ``loss:`` section, checked by key, weighted, with the model's own terms."""

from __future__ import annotations

import pytest
import torch

from medtune.errors import ConfigError
from medtune.models.losses import LOSSES, LossContext, build_criterion, loss_section, parse_loss_section


def test_sections_name_terms_by_weight_or_by_weight_and_options():
    specs = parse_loss_section({"dice_ce": 1.0, "pne": {"weight": 0.1, "temperature": 0.2}},
                               defaults={"dice_ce": {"lambda_ce": 0.5}})
    assert [(s.name, s.weight) for s in specs] == [("dice_ce", 1.0), ("pne", 0.1)]
    assert specs[0].options.lambda_ce == 0.5 and specs[1].options.temperature == 0.2
    assert loss_section(specs)["pne"]["weight"] == 0.1
    assert {"dice_ce", "pne", "cga_sam", "cga_inter_class"} <= set(LOSSES.names())


@pytest.mark.parametrize("section, message", [
    ({"focal": 1.0}, "unknown loss 'focal'"),
    ({"dice_ce": -1.0}, "loss.dice_ce' must be a finite weight >= 0"),
    ({"dice_ce": True}, "loss.dice_ce' must be a weight"),
    ({"pne": {"weight": float("nan")}}, "loss.pne.weight' must be a finite weight"),
    ({"pne": {"temp": 0.1}}, "loss.pne.temp"),
    ({}, "must map loss names to weights"),
    ("dice_ce", "must map loss names to weights"),
])
def test_bad_sections_are_refused_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_loss_section(section)


def test_dice_ce_is_monai_dice_ce_and_terms_are_summed_by_weight():
    from monai.losses import DiceCELoss

    logits, label = torch.randn(2, 3, 4, 4, 2), torch.randint(0, 3, (2, 4, 4, 2))
    criterion = build_criterion({"dice_ce": {"weight": 0.5, "include_background": True}}, LossContext(3, 3))
    out = criterion({"logits": logits}, label)
    reference = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)(logits, label[:, None])
    assert torch.allclose(out["dice_ce"], reference) and torch.allclose(out["loss"], 0.5 * reference)


def test_terms_the_model_cannot_feed_and_all_zero_weights_are_refused():
    context = LossContext(4, 3, 8, ("logits", "embedding"))
    with pytest.raises(ConfigError, match="loss 'cga_sam' needs the model output.* sam_logits"):
        build_criterion({"dice_ce": 1.0, "cga_sam": 1.0}, context)
    with pytest.raises(ConfigError, match="every weight is 0"):
        build_criterion({"dice_ce": 0.0}, context)
    with pytest.raises(ConfigError, match="pne' needs the model output.* embedding"):
        build_criterion({"pne": 0.1}, LossContext(4, 3))
    pne_off = build_criterion({"dice_ce": 1.0, "pne": 0.0}, context)
    assert list(pne_off.terms) == ["dice_ce"] and not list(pne_off.parameters())  # no head is built
