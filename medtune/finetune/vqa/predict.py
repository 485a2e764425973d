"""``medtune predict`` for VQA runs: answers to questions about images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from medtune.errors import DataError
from medtune.finetune.vqa.config import VQAConfig
from medtune.finetune.vqa.data import load_split
from medtune.finetune.vqa.evaluate import predict_dataset, report_unknown_answers, vqa_accuracy
from medtune.finetune.vqa.model import VQAModel


def answer_questions(model: VQAModel, answers: Sequence[str], cfg: VQAConfig, images: Sequence[Path], question: str) -> list[dict]:
    """Answer ``question`` about each image: ``[{"image", "question", "answer", "probability"}]``."""
    from medtune.data.preprocess import zscore_nonzero
    from medtune.data.vqa import load_image

    ids, mask = model.text.tokenize([question])
    device = next(model.parameters()).device
    results = []
    with torch.no_grad():
        for start in range(0, len(images), cfg.eval_batch_size):
            chunk = images[start : start + cfg.eval_batch_size]
            pixels = torch.stack([
                zscore_nonzero(torch.from_numpy(load_image(p, cfg.backbone.img_size, cfg.backbone.in_chans)))
                for p in chunk
            ]).to(device)
            logits = model.answer_logits(pixels, ids.expand(len(chunk), -1).to(device), mask.expand(len(chunk), -1).to(device))
            prob, pred = logits.float().softmax(-1).max(-1)
            results += [
                {"image": str(p), "question": question, "answer": answers[int(i)], "probability": round(float(q), 4)}
                for p, i, q in zip(chunk, pred, prob)
            ]
    return results


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def answers_path(output: str | Path) -> Path:
    """``--output`` as the answers file: a ``.jsonl``/``.json`` path itself, else ``<folder>/answers.jsonl``."""
    path = Path(output)
    return path if path.suffix.lower() in (".jsonl", ".json") else path / "answers.jsonl"


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", default=None, help="the question for one input image or a folder of images")


def predict(loaded, args: argparse.Namespace) -> int:
    """``medtune predict --model RUN --input IMAGE_OR_FOLDER --question "..." [--output OUT]``.

    With ``--question``: answers it about the image (or every image of a folder) and
    prints one line per image (image, answer, probability). Without: ``--input`` is a
    dataset folder in the run's format; every question of its eval split is answered
    and accuracy is printed. ``--output`` (optional) receives the answers as JSON lines:
    a ``.jsonl``/``.json`` path is the file itself, anything else a folder that gets
    ``answers.jsonl``.
    """
    model, cfg, answers = loaded.model, loaded.config, loaded.derived["answers"]
    if args.output:
        from medtune.checkpoints.io import refuse_existing

        refuse_existing([answers_path(args.output)], args.overwrite, "answers file")
    source = Path(args.input)
    question = args.question
    if question:
        if source.is_dir():
            images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise DataError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)})")
        elif source.is_file():
            images = [source]
        else:
            raise DataError(f"image not found: {source}")
        rows = answer_questions(model, answers, cfg, images, question)
        for row in rows:
            print(f"{row['image']}\t{row['answer']}\t{row['probability']:.3f}")
    else:
        from medtune.data.vqa import AnswerVocab, VQADataset

        if not source.is_dir():
            raise DataError(f"{source}: without --question, --input must be a {cfg.data.format} dataset folder")
        records = load_split(cfg.data, cfg.data.eval_split, root=source)
        dataset = VQADataset(records, AnswerVocab(answers), model.text.tokenize, cfg.backbone.img_size, cfg.backbone.in_chans)
        report_unknown_answers(dataset)
        out = predict_dataset(model, dataset, cfg.eval_batch_size)
        metrics = vqa_accuracy(out["pred"], out["target"], out["closed"])
        rows = [
            {"image": str(r.image), "question": r.question, "answer": answers[int(p)], "probability": round(float(q), 4),
             "truth": r.answer, "answer_type": r.answer_type}
            for r, p, q in zip(records, out["pred"], out["prob"])
        ]
        print(
            f"{len(rows)} questions: accuracy {metrics['accuracy']:.3f} (closed {metrics['accuracy_closed']:.3f}, "
            f"open {metrics['accuracy_open']:.3f}, {int(metrics['n_unknown'])} answers not in the vocabulary)"
        )
    output = args.output
    if output:
        from medtune.checkpoints.io import atomic_write

        path = answers_path(output)
        text = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write(path, lambda tmp: tmp.write_text(text))
        print(f"answers written to {path}")
    return 0
