"""VQA pieces: dataset loaders, answer vocabulary, accuracy, text encoders, stage-wise fusion."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medtune.data.synth import draw_brain_slices
from medtune.data.vqa import (
    AnswerVocab,
    VQADataset,
    VQARecord,
    load_vqa_records,
    normalize_answer,
)
from medtune.errors import ConfigError, DataError
from medtune.finetune import get_task
from medtune.finetune.vqa import VQAConfig, VQAModel, VQAModelConfig
from medtune.finetune.vqa.evaluate import majority_baseline, report_unknown_answers, vqa_accuracy
from medtune.finetune.vqa.model import sincos_position_code
from medtune.models.backbones import BackboneConfig, create_backbone
from medtune.models.text import TextConfig, build_text_encoder

from tests import REPO


def load_vqa_config(path=None, overrides=()) -> VQAConfig:
    return get_task("vqa").read_config(path, overrides)


def _png(path: Path, value: int = 100, size: int = 16) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def _write_json(path: Path, entries: list[dict]) -> None:
    path.write_text(json.dumps(entries))


# --------------------------------------------------------------------------- loaders


def test_vqa_rad_split_files_and_public_json(tmp_path):
    rad = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "Yes",
         "answer_type": "CLOSED", "phrase_type": "freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "What organ is shown?", "answer": " Left Kidney. ",
         "answer_type": "OPEN", "phrase_type": "para"},
        {"qid": 3, "image_name": "synpic2.jpg", "question": "Is this a CT?", "answer": "no",
         "answer_type": "CLOSED", "phrase_type": "test_freeform"},
    ]
    _write_json(tmp_path / "VQA_RAD Dataset Public.json", rad)
    train = load_vqa_records("vqa_rad", tmp_path, "train")
    test = load_vqa_records("vqa_rad", tmp_path, "test")
    assert [r.answer for r in train] == ["yes", "left kidney"]
    assert [r.answer_type for r in train] == ["closed", "open"]
    assert [r.question for r in test] == ["Is this a CT?"]
    assert train[0].image == tmp_path / "synpic1.jpg"  # no image folder: the root
    assert train[1].source.endswith("VQA_RAD Dataset Public.json#2")

    # MEVF-style split files win over the public file; images/ is the image folder
    (tmp_path / "images").mkdir()
    _write_json(tmp_path / "trainset.json", rad[:1])
    _write_json(tmp_path / "testset.json", rad[1:])
    assert len(load_vqa_records("vqa_rad", tmp_path, "train")) == 1
    assert load_vqa_records("vqa_rad", tmp_path, "test")[0].image == tmp_path / "images" / "synpic1.jpg"
    with pytest.raises(DataError, match="train/test"):
        load_vqa_records("vqa_rad", tmp_path, "validate")


def test_slake_keeps_english_by_default(tmp_path):
    entries = [
        {"qid": 10, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Liver",
         "answer_type": "OPEN", "q_lang": "en"},
        {"qid": 11, "img_name": "xmlab1/source.jpg", "question": "哪个器官不正常？", "answer": "肝脏",
         "answer_type": "OPEN", "q_lang": "zh"},
        {"qid": 12, "img_name": "xmlab2/source.jpg", "question": "Is this an MRI?", "answer": "No",
         "answer_type": "CLOSED", "q_lang": "en"},
    ]
    _write_json(tmp_path / "train.json", entries)
    (tmp_path / "imgs").mkdir()
    english = load_vqa_records("slake", tmp_path, "train")
    assert [(r.answer, r.answer_type) for r in english] == [("liver", "open"), ("no", "closed")]
    assert english[0].image == tmp_path / "imgs" / "xmlab1" / "source.jpg"
    assert english[1].source.endswith("train.json#12")
    assert len(load_vqa_records("slake", tmp_path, "train", languages=("en", "zh"))) == 3
    with pytest.raises(DataError, match="validate.json"):
        load_vqa_records("slake", tmp_path, "validate")


def test_vqa_med_2019_pipe_files(tmp_path):
    folder = tmp_path / "ImageClef-2019-VQA-Med-Training"
    (folder / "Train_images").mkdir(parents=True)
    (folder / "All_QA_Pairs_train.txt").write_text(
        "synpic100|what plane is this?|axial\nsynpic101|is this a t1 weighted image?|yes\n"
    )
    records = load_vqa_records("vqa_med_2019", tmp_path, "train")
    assert [(r.answer, r.answer_type) for r in records] == [("axial", "open"), ("yes", "closed")]
    assert records[0].image == folder / "Train_images" / "synpic100.jpg"
    (folder / "All_QA_Pairs_train.txt").write_text("synpic100|only two fields\n")
    with pytest.raises(DataError, match=r"All_QA_Pairs_train.txt:1"):
        load_vqa_records("vqa_med_2019", tmp_path, "train")


def test_missing_image_names_the_record(tmp_path, tiny_text_config):
    _png(tmp_path / "images" / "a.png")
    records = [
        VQARecord(tmp_path / "images" / "a.png", "is there a lesion?", "yes", "closed", "set.json#0"),
        VQARecord(tmp_path / "images" / "gone.png", "is there a lesion?", "no", "closed", "set.json#7"),
    ]
    encoder = build_text_encoder(tiny_text_config)
    with pytest.raises(DataError, match=r"set.json#7.*gone.png"):
        VQADataset(records, AnswerVocab.from_records(records), encoder.tokenize, 16, 3)


def test_dataset_items_and_unknown_answers_reported(tmp_path, caplog, tiny_text_config):
    _png(tmp_path / "a.png", 50)
    _png(tmp_path / "b.png", 200)
    train = [
        VQARecord(tmp_path / "a.png", "is there a lesion?", "yes", "closed", "t#0"),
        VQARecord(tmp_path / "b.png", "is there a lesion?", "yes", "closed", "t#1"),
        VQARecord(tmp_path / "b.png", "what organ?", "brain", "open", "t#2"),
    ]
    vocab = AnswerVocab.from_records(train)
    assert vocab.answers == ["yes", "brain"]  # most frequent first
    assert vocab.encode("Yes.") == 0 and vocab.encode("liver") == AnswerVocab.UNKNOWN
    evaluation = [
        VQARecord(tmp_path / "a.png", "what organ?", "liver", "open", "e#0"),
        VQARecord(tmp_path / "b.png", "is there a lesion?", "yes", "closed", "e#1"),
    ]
    encoder = build_text_encoder(tiny_text_config)
    dataset = VQADataset(evaluation, vocab, encoder.tokenize, 16, 4)
    item = dataset[0]
    assert item["image"].shape == (4, 16, 16) and item["image"].dtype == torch.float32
    assert item["question_ids"].shape == (16,) and item["question_mask"].dtype == torch.bool
    assert int(item["answer"]) == -1 and not bool(item["closed"])
    with caplog.at_level(logging.WARNING):
        assert report_unknown_answers(dataset) == 1
    assert "1 of 2 evaluation answers" in caplog.text and "'liver'" in caplog.text
    # the unknown answer counts as wrong even for a model that "answers" index -1
    metrics = vqa_accuracy(torch.tensor([-1, 0]), dataset.answers, dataset.closed)
    assert metrics["accuracy"] == 0.5 and metrics["n_unknown"] == 1
    assert majority_baseline(dataset)["accuracy"] == 0.5  # always "yes"


def test_accuracy_hand_worked():
    pred = torch.tensor([0, 1, 2, 3, 1])
    target = torch.tensor([0, 2, 2, -1, 1])  # the 4th answer is not in the vocabulary
    closed = torch.tensor([True, True, False, False, False])
    metrics = vqa_accuracy(pred, target, closed)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["accuracy_closed"] == pytest.approx(1 / 2)
    assert metrics["accuracy_open"] == pytest.approx(2 / 3)
    assert (metrics["n_all"], metrics["n_closed"], metrics["n_open"], metrics["n_unknown"]) == (5, 2, 3, 1)
    assert np.isnan(vqa_accuracy(pred[:2], target[:2], closed[:2])["accuracy_open"])  # no open questions


def test_answer_normalisation():
    assert normalize_answer("  Right  Lung. ") == "right lung"
    assert normalize_answer(3) == "3"


def test_generated_slices_follow_their_answers():
    images, facts = draw_brain_slices(64, 32, np.random.default_rng(1))
    bright = images > 0.8 * 255  # lesions are drawn at 0.95, tissue at about 0.45
    assert images.dtype == np.uint8 and images.shape == (64, 32, 32)
    area = bright.sum(axis=(1, 2))
    assert np.all((area == 0) == (facts["lesions"] == 0))
    has = facts["lesions"] > 0
    columns = bright.any(axis=1)  # (N, W)
    left = columns[:, :16].any(axis=1)
    right = columns[:, 16:].any(axis=1)
    assert np.all(left[has] == (facts["side"][has] == 0)) and np.all(right[has] == (facts["side"][has] == 1))
    one = facts["lesions"] == 1
    assert area[one & facts["large"]].min() > area[one & ~facts["large"]].max()
    assert set(np.unique(facts["lesions"])) == {0, 1, 2}


# --------------------------------------------------------------------------- text


def test_long_question_truncated_with_warning(caplog, tiny_text_config):
    encoder = build_text_encoder(dataclasses.replace(tiny_text_config, context_length=8))
    with caplog.at_level(logging.WARNING):
        ids, mask = encoder.tokenize(["is there a lesion?", "which side of the image is the lesion on today?"])
    assert ids.shape == (2, 8) and mask[1].all()
    from medtune.models.text import build_tokenizer

    eot = build_tokenizer(TextConfig(context_length=8))(["."])[0][0, 2]  # start, ".", end
    assert ids[1, -1] == eot  # the end token survives the cut
    assert torch.equal(build_tokenizer(TextConfig(context_length=8))(["is there a lesion?"])[0], ids[:1])
    assert "1 question(s) longer than the context of 8 tokens" in caplog.text
    assert encoder(ids, mask).shape == (2, 8, 32)


def test_open_clip_text_weights_match_clip(tmp_path):
    from medtune.checkpoints.io import save_safetensors
    from medtune.models.clip import TINY_CLIP, build_clip, encode_text_words

    clip, tokenizer = build_clip(tiny_config=TINY_CLIP)
    save_safetensors(clip.state_dict(), tmp_path / "clip.safetensors")
    text_cfg = TINY_CLIP["text_cfg"]
    encoder = build_text_encoder(
        TextConfig(width=text_cfg["width"], layers=text_cfg["layers"], heads=text_cfg["heads"],
                   context_length=text_cfg["context_length"], weights=str(tmp_path / "clip.safetensors"))
    )
    ids, mask = encoder.tokenize(["is the lesion large or small?"])
    assert torch.equal(ids, tokenizer(["is the lesion large or small?"]))
    clip.eval(), encoder.eval()
    with torch.no_grad():
        assert torch.allclose(encoder(ids, mask), encode_text_words(clip, ids).words, atol=1e-6)


def test_hf_text_needs_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="'transformers' package"):
        build_text_encoder(TextConfig(kind="hf", path="/nowhere"))


def test_hf_text_from_a_local_bert_folder(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "there", "a", "lesion", "?", "how", "many"]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(tmp_path)
    encoder = build_text_encoder(TextConfig(kind="hf", path=str(tmp_path), context_length=8)).eval()
    assert encoder.width == 32
    with caplog.at_level(logging.WARNING):
        ids, mask = encoder.tokenize(["is there a lesion?", "how many ? how many ? how many ?"])
    assert ids[0].tolist() == [2, 5, 6, 7, 8, 9, 3, 0] and mask[0].tolist() == [True] * 7 + [False]
    assert ids[1, -1] == 3 and mask[1].all()  # cut to 8 tokens, [SEP] kept
    assert "1 question(s) longer than the context of 8 tokens" in caplog.text
    with torch.no_grad():
        batched = encoder(ids, mask)
        alone = encoder(ids[:1, :7], mask[:1, :7])
    assert batched.shape == (2, 8, 32)
    assert torch.allclose(batched[0, :7], alone[0], atol=1e-5)  # padding is masked out


def test_unknown_text_kind_and_config_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown text encoder 'bert'"):
        build_text_encoder(TextConfig(kind="bert"))
    cfg_file = tmp_path / "vqa.yaml"
    cfg_file.write_text("model: {fusion: concat}\n")
    with pytest.raises(ConfigError, match="model.fusion"):
        load_vqa_config(cfg_file)
    cfg_file.write_text("model: {fusoin: mmbert}\n")
    with pytest.raises(ConfigError, match="model.fusoin"):
        load_vqa_config(cfg_file)


# --------------------------------------------------------------------------- model


def test_position_code_any_rank():
    code = sincos_position_code((2, 4), 16)  # (8, 16)
    assert code.shape == (8, 16) and code.abs().max() <= 1
    grid = code.reshape(2, 4, 16)
    assert not torch.allclose(grid[:, 0], grid[:, 3])  # left and right columns differ
    assert torch.equal(grid[0, :, 8:], grid[1, :, 8:])  # the x half ignores the row
    assert sincos_position_code((2, 3, 4), 12).shape == (24, 12)


@pytest.mark.parametrize("fusion", ["stagewise", "mmbert"])
def test_fusion_uses_every_stage(fusion, tiny_text_config):
    torch.manual_seed(0)
    backbone = create_backbone(BackboneConfig(name="convnext_atto", in_chans=1, img_size=32))
    text = build_text_encoder(tiny_text_config)
    model = VQAModel(backbone, text, 5, VQAModelConfig(fusion=fusion, heads=2, dropout=0.0))
    ids, mask = text.tokenize(["is there a lesion?", "how many lesions are there?"])
    batch = {"image": torch.randn(2, 1, 32, 32), "question_ids": ids, "question_mask": mask,
             "answer": torch.tensor([1, 3])}
    out = model(batch)
    assert out["loss"].ndim == 0 and out["loss"] > 0
    out["loss"].backward()
    projections = [b.project for b in model.fusion.blocks] if fusion == "stagewise" else list(model.fusion.project)
    assert [p.in_features for p in projections] == list(backbone.feature_channels)  # 40, 80, 160, 320
    for stage, projection in enumerate(projections):
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0, f"stage {stage}"
    assert backbone.model.stem[0].weight.grad.abs().sum() > 0  # and back into the image backbone


def test_stagewise_fusion_is_a_shallow_to_deep_chain():
    """MF2-MVQA: the question attends to stage 0, the result to stage 1, ... (not a sum of
    independent per-stage fusions), then a masked mean over the real question tokens."""
    from medtune.finetune.vqa.model import StagewiseFusion, masked_mean

    torch.manual_seed(0)
    fusion = StagewiseFusion([4, 6, 8], 16, VQAModelConfig(heads=2, dropout=0.0)).eval()
    question = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    stages = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)]
    with torch.no_grad():
        chained = question
        for block, stage in zip(fusion.blocks, stages):
            chained = block(chained, stage)
        expected = masked_mean(fusion.norm(chained), mask)
        assert torch.allclose(fusion(question, mask, stages), expected, atol=1e-6)
        assert torch.allclose(expected[1], fusion.norm(chained)[1, :3].mean(0), atol=1e-6)
        # the deep stage sees what the shallow one wrote: changing stage 0 changes the
        # question tokens that stage 2's cross-attention reads
        probe = []
        handle = fusion.blocks[2].register_forward_pre_hook(lambda m, args: probe.append(args[0].clone()))
        fusion(question, mask, stages)
        fusion(question, mask, [stages[0] + 1.0, *stages[1:]])
        handle.remove()
        assert not torch.allclose(probe[0], probe[1], atol=1e-4)


def test_model_config_checks(tiny_text_config):
    backbone = create_backbone(BackboneConfig(name="convnext_atto", in_chans=1, img_size=32))
    text = build_text_encoder(tiny_text_config)
    with pytest.raises(ConfigError, match="model.stages"):
        VQAModel(backbone, text, 3, VQAModelConfig(stages=[0, 4], heads=2))
    with pytest.raises(ConfigError, match="shallow to deep"):
        VQAModel(backbone, text, 3, VQAModelConfig(stages=[2, 1], heads=2))
    with pytest.raises(ConfigError, match="model.heads 3"):
        VQAModel(backbone, text, 3, VQAModelConfig(heads=3))
    frozen = VQAModel(backbone, text, 3, VQAModelConfig(heads=2, stages=[1, 3], freeze_backbone=True))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert len(frozen.fusion.blocks) == 2
    with pytest.raises(ConfigError, match="a recipe of task 'referring', not 'vqa'"):
        get_task("vqa").read_config(REPO / "configs" / "demo_referring.yaml")


# --------------------------------------------------------------------------- run folders


def _demo_config(*overrides: str) -> VQAConfig:
    return load_vqa_config(REPO / "configs" / "demo_vqa.yaml", list(overrides))


def test_lora_adapter_trains_only_lora_and_reloads_from_run_and_adapter_export(tmp_path):
    """The shared weight files serve VQA too: model.safetensors, and adapter files with the
    text tower, fusion and answer head as the task head."""
    from medtune.checkpoints.export import export_run
    from medtune.checkpoints.runs import RunConfig, write_run_config
    from medtune.config import to_dict
    from medtune.finetune import load_trained
    from medtune.finetune.vqa import build_vqa_model
    from medtune.finetune.weights import save_base_backbone, save_trained

    torch.manual_seed(0)
    cfg = _demo_config("adapter={method: lora, r: 4}")
    model = build_vqa_model(cfg, 3)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.requires_grad for p in model.fusion.parameters())  # fusion and head always train
    write_run_config(tmp_path / "run", RunConfig("vqa", to_dict(cfg), {"answers": ["yes", "no", "1"]}))
    save_base_backbone(model, tmp_path / "run")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    save_trained(model, tmp_path / "run", tmp_path / "run", "vqa")
    ids, mask = model.text.tokenize(["is there a lesion in the brain?", "how many lesions are there?"])
    image = torch.randn(2, 1, 32, 32)
    model.eval()
    export_run(tmp_path / "run", tmp_path / "adapter", "adapter")
    assert (tmp_path / "adapter" / "head.safetensors").stat().st_size > 0
    for folder in ("run", "adapter"):
        loaded = load_trained(tmp_path / folder)
        assert loaded.derived["answers"] == ["yes", "no", "1"] and loaded.config.adapter == {"method": "lora", "r": 4}
        with torch.no_grad():
            assert torch.equal(model.answer_logits(image, ids, mask), loaded.model.answer_logits(image, ids, mask))


def test_backbone_flag_takes_a_pretrain_run(tmp_path):
    from medtune.checkpoints.io import save_safetensors
    from medtune.checkpoints.runs import RunConfig, write_run_config
    from medtune.cli import build_parser
    from medtune.config import to_dict
    from medtune.finetune.cli import build_config

    pretrained_cfg = BackboneConfig(name="vit_tiny_patch16_224", in_chans=4, img_size=32,
                                    options={"depth": 4, "patch_size": 8, "embed_dim": 64, "num_heads": 2})
    pretrained = create_backbone(pretrained_cfg)
    run = tmp_path / "fremae-run"
    write_run_config(run, RunConfig("pretrain", {"backbone": to_dict(pretrained_cfg)}))
    save_safetensors(pretrained.state_dict(), run / "backbone.safetensors")
    demo = str(REPO / "configs" / "demo_vqa.yaml")
    argv = ["finetune", "--config", demo, "--backbone", str(run), "--data", str(tmp_path / "data")]
    cfg = build_config(get_task("vqa"), build_parser("finetune", argv).parse_args(argv), {})
    assert cfg.backbone.in_chans == 4 and cfg.backbone.img_size == 32 and cfg.backbone.pretrained == str(run)
    assert cfg.data.root == str(tmp_path / "data")
    loaded = create_backbone(cfg.backbone)
    for name, tensor in pretrained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(SystemExit):  # --self-distill is not a flag of the vqa task
        build_parser("finetune", argv + ["--self-distill"]).parse_args(argv + ["--self-distill"])
