"""``medtune predict`` for referring runs: masks for expressions."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from medtune.checkpoints.io import refuse_existing
from medtune.checkpoints.runs import SUMMARY_FILE, write_summary
from medtune.errors import ConfigError, DataError
from medtune.finetune.referring.metrics import ReferringMetrics

log = logging.getLogger(__name__)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expression", default=None, help="the expression for one input image")
    parser.add_argument("--threshold", type=float, default=0.5, help="mask probability threshold (default 0.5)")


def predict(loaded, args: argparse.Namespace) -> int:
    """``medtune predict --model RUN --input IMAGE --expression TEXT --output MASK.png``.

    ``args.input`` is an image (then ``args.expression`` is required) or a ``.jsonl`` of
    records (then every record is predicted into the ``args.output`` folder, and oIoU /
    mIoU are logged and written to ``summary.json`` there). Masks are PNGs (0/255) at
    the input image's size; ``args.threshold`` binarises probabilities.
    """
    from PIL import Image

    from medtune.data.referring import load_jsonl_records, preprocess_image

    model = loaded.model
    device = next(model.parameters()).device
    threshold = float(args.threshold)
    source = Path(args.input)
    output = Path(args.output or "prediction")
    size = model.cfg.image_size
    if source.suffix == ".jsonl":
        records = load_jsonl_records(source)
        names = [output / f"{number:05d}_{record.image.stem}.png" for number, record in enumerate(records)]
        refuse_existing([*names, output / SUMMARY_FILE], args.overwrite, "prediction")
        output.mkdir(parents=True, exist_ok=True)
        metrics = ReferringMetrics()
        for number, record in enumerate(records):
            with Image.open(record.image) as image:
                pixels = preprocess_image(image, size, model.cfg.letterbox).unsqueeze(0)
                height, width = image.height, image.width
            tokens = model.tokenizer([record.expression]).to(device)
            prob = model.predict(pixels.to(device), tokens, size=(height, width))[0].cpu()
            pred = (prob > threshold).numpy()
            Image.fromarray(pred.astype(np.uint8) * 255).save(names[number])
            with Image.open(record.mask_path) as mask:
                truth = np.asarray(mask.convert("L")) > 0
            metrics.update(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])
        scores = metrics.compute()
        write_summary(output, {"task": "referring", "expressions": len(records), "metrics": scores})
        log.info("%d expressions: oIoU %.4f, mIoU %.4f", len(records), scores["oIoU"], scores["mIoU"])
        return 0
    expression = args.expression
    if not expression:
        raise ConfigError("referring prediction needs --expression TEXT (or an --input .jsonl of records)")
    if not source.is_file():
        raise DataError(f"input image not found: {source}")
    try:
        with Image.open(source) as image:
            pixels = preprocess_image(image, size, model.cfg.letterbox).unsqueeze(0)
            height, width = image.height, image.width
    except OSError as exc:
        raise DataError(f"{source}: cannot read image ({exc})") from None
    prob = model.predict(pixels.to(device), model.tokenizer([expression]).to(device), size=(height, width))[0].cpu()
    if output.suffix.lower() != ".png":
        output = output / f"{source.stem}_mask.png"
    refuse_existing([output], args.overwrite, "mask")
    output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((prob > threshold).numpy().astype(np.uint8) * 255).save(output)
    log.info("'%s' -> %s (%d foreground pixels)", expression, output, int((prob > threshold).sum()))
    return 0
