"""What a trained dynamic model costs per volume of a dataset, next to its static twin
(``medtune params --dynamic RUN --data DIR``).

Every case is predicted as ``medtune predict`` does (the run's data plan, the run's
``slice_fit``): FLOPs counted, seconds measured on a pass without counting; the static row is the same segmenter's whole-slice
path at full precision on every slice of the foreground box.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DYNAMIC_HEADERS = ("model", "parameters", "volumes", "GFLOPs/volume (counted)", "GFLOPs/volume (cost model)",
                   "s/volume")


@dataclass
class DynamicCost:
    model: str
    parameters: int
    volumes: int
    gflops_per_volume: float
    cost_model_gflops_per_volume: float
    seconds_per_volume: float


def static_parameters(model) -> int:
    """Parameters of the static whole-slice model: the widest segmenter and its head."""
    path = "whole" if "whole" in model.paths else model.paths[-1]
    modules = (model.segmenter_of(path), model.heads[path])
    return sum(p.numel() for m in modules for p in m.parameters())


def dynamic_costs(run: str | Path, data: str | Path, layout: str | None = None, progress: bool = True) -> list[DynamicCost]:
    """``[dynamic row, static row]`` averaged over the cases of ``data``."""
    from tqdm.auto import tqdm

    from medtune.data.volume import load_case
    from medtune.finetune.dynamic.predict import predict_case
    from medtune.finetune.segmentation.predict import input_cases
    from medtune.finetune.weights import load_trained

    loaded = load_trained(run)
    model, cfg = loaded.model, loaded.config
    cases = input_cases(Path(data), layout or cfg.data.layout, cfg.data.modalities)
    totals = {"dynamic": [0.0, 0.0, 0.0], "static": [0.0, 0.0, 0.0]}
    for case in tqdm(cases, desc="count", unit="case", disable=not progress):
        volume = load_case(case, with_label=False)
        _, _, dynamic, static, _, _ = predict_case(model, volume.image, volume.affine, slice_fit=cfg.model.slice_fit)
        d = dynamic.totals()
        for key, values in (("dynamic", (d["flops_counted"], d["cost_model_flops"], d["wall_s"])),
                            ("static", (static.totals()["flops_counted"],) * 2 + (static.wall_s,))):
            totals[key] = [t + v for t, v in zip(totals[key], values)]
    n = max(len(cases), 1)
    every = sum(p.numel() for p in model.parameters())
    return [
        DynamicCost(f"dynamic (Med-DANet {cfg.model.form})", every, len(cases), totals["dynamic"][0] / n / 1e9,
                    totals["dynamic"][1] / n / 1e9, totals["dynamic"][2] / n),
        DynamicCost("static (whole-slice path)", static_parameters(model), len(cases), totals["static"][0] / n / 1e9,
                    totals["static"][1] / n / 1e9, totals["static"][2] / n),
    ]


__all__ = ["DYNAMIC_HEADERS", "DynamicCost", "dynamic_costs", "static_parameters"]
