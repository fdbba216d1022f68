"""avfast.tasks.question_answering (MUSIC-AVQA): the question json and its bad rows, the
vocabulary, accuracy per question type by hand, the grounding head on each per-second
method, and `avfast demo --task avqa` (accuracy beats the majority answer by >= 15 points)."""

import json
import subprocess
import sys

import pytest
import torch

from avfast.tasks.question_answering import (QUESTION_TYPES, QAMetrics, QAVocabulary, answer_baselines,
                                             build_avqa_model, grounding_level, make_avqa, question_words,
                                             read_avqa, usable_questions)
from seeding import fresh_seed, random_audio


@pytest.fixture(scope="module")
def avqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("avqa")
    make_avqa(root, videos={"train": 3, "val": 1, "test": 0}, seed=3)
    return root


def test_question_words_fill_the_placeholders_in_order():
    assert question_words("Is the <Object> louder than the <Object>?", ["cello", "piano"]) == (
        "is", "the", "cello", "louder", "than", "the", "piano")
    with pytest.raises(ValueError, match=r"expected 2 template values for \['<Object>', '<Object>'\], got 1"):
        question_words("Is the <Object> louder than the <Object>?", ["cello"])


def test_read_avqa_reads_questions_and_reports_bad_rows(avqa, tmp_path):
    questions = read_avqa(avqa / "avqa-train.json")
    assert questions and all(q.path.startswith(str(avqa / "video")) for q in questions)
    assert {(q.modality, q.kind) for q in questions} <= set(QUESTION_TYPES)
    rows = json.loads((avqa / "avqa-train.json").read_text())
    good = dict(rows[0])
    rows += [dict(good, question_id=9001, question_deleted=1),  # left out, not bad
             dict(good),  # duplicate question_id
             dict(good, question_id=9002, video_id="../../etc/passwd"),
             dict(good, question_id=9003, video_id="gone"),
             dict(good, question_id=9004, type='["Audio", "Guessing"]'),
             {k: v for k, v in good.items() if k != "anser"}]
    bad_file = avqa / "bad.json"
    bad_file.write_text(json.dumps(rows))
    bad = []
    kept = read_avqa(bad_file, bad=bad)
    assert len(kept) == len(questions)
    n = len(rows)
    assert [(b.row, b.reason) for b in bad] == [(n - 4, "duplicate id"), (n - 3, "escapes root"),
                                                (n - 2, "missing file"), (n - 1, "malformed"), (n, "malformed")]
    assert all(b.file == str(bad_file) for b in bad)
    assert "kind in ('Counting'" in bad[3].detail and "missing ['anser']" in bad[4].detail
    with pytest.raises(ValueError, match=r"read_avqa: .*bad.json:\d+: duplicate id"):
        read_avqa(bad_file)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="must hold a list of questions, got dict"):
        read_avqa(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="expected a MUSIC-AVQA json file, got no such file"):
        read_avqa(tmp_path / "none.json")


def test_vocabulary_encodes_and_rejects_what_training_never_saw(avqa):
    train = read_avqa(avqa / "avqa-train.json")
    vocab = QAVocabulary.build(train)
    assert vocab.words[:2] == ("<pad>", "<unk>") and vocab.answers == tuple(sorted({q.answer for q in train}))
    ids = vocab.encode(("how", "many", "zebras"))
    assert ids.shape == (vocab.max_words,) and ids[2] == 1 and ids[3:].eq(0).all()
    with pytest.raises(ValueError, match=f"expected at most {vocab.max_words} words"):
        vocab.encode(("a",) * (vocab.max_words + 1))
    import dataclasses

    odd = dataclasses.replace(train[0], answer="purple")
    bad = []
    assert usable_questions([odd, train[1]], vocab, bad) == [train[1]]
    assert bad[0].reason == "unknown label" and "'purple'" in bad[0].detail


def test_qa_metrics_by_hand():
    audio_counting = QUESTION_TYPES.index(("Audio", "Counting"))
    av_temporal = QUESTION_TYPES.index(("Audio-Visual", "Temporal"))
    metrics = QAMetrics()
    metrics.update(torch.tensor([1, 2, 3, 0]), torch.tensor([1, 2, 0, 0]),
                   torch.tensor([audio_counting, audio_counting, av_temporal, av_temporal]))
    metrics.update(torch.tensor([[0.1, 0.9]]), torch.tensor([0]), torch.tensor([av_temporal]))  # logits: wrong
    result = QAMetrics.from_tensor(metrics.to_tensor()).compute()
    assert result == {"accuracy": 3 / 5, "audio": 1.0, "audio_visual": 1 / 3, "audio_counting": 1.0,
                      "audio_visual_temporal": 1 / 3, "questions": 5}
    with pytest.raises(ValueError, match="expected at least one question"):
        QAMetrics().compute()
    with pytest.raises(ValueError, match=r"qtypes: expected indices in \[0, 15\)"):
        metrics.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([15]))


def test_answer_baselines_by_hand(avqa):
    import dataclasses

    q = read_avqa(avqa / "avqa-train.json")[0]
    train = [dataclasses.replace(q, answer=a, modality=m, kind=k) for a, m, k in
             [("yes", "Audio", "Counting"), ("yes", "Audio", "Counting"), ("two", "Visual", "Counting")]]
    asked = [dataclasses.replace(q, answer=a, modality=m, kind=k) for a, m, k in
             [("yes", "Audio", "Counting"), ("two", "Visual", "Counting"), ("no", "Visual", "Counting")]]
    assert answer_baselines(train, asked) == {"majority": 1 / 3, "type_majority": 2 / 3}


def test_grounding_level_is_the_deepest_map_with_enough_cells(avqa):
    swin = [(1, 1), (2, 2), (4, 4), (8, 8)]  # DG-SCT: deepest first
    assert [grounding_level(swin, n) for n in (1, 2, 4, 16, 17, 64, 65)] == [0, 1, 1, 2, 3, 3, 3]
    assert grounding_level(list(reversed(swin)), 4) == 2
    assert grounding_level([(4, 4)] * 4, 1) == grounding_level([(4, 4)] * 4, 64) == 3  # equal maps: the last
    vocab = QAVocabulary.build(read_avqa(avqa / "avqa-train.json"))
    model = build_avqa_model("dgsct", vocab, "tiny")
    levels, _ = model.backbone.dense_shapes()
    assert levels[model.level][1] == (4, 4) and model.head.visual_proj.in_features == levels[model.level][0]
    assert build_avqa_model("dgsct", vocab, "tiny", min_cells=1).level == 0
    question = torch.randint(1, len(vocab.words), (2, 3, vocab.max_words))
    out = model(torch.randn(2, 10, 3, 32, 32), random_audio("dgsct", model.config, 2, 10), question)
    assert out["logits"].shape == (2, 3, len(vocab.answers))
    with pytest.raises(ValueError, match="min_cells: expected an integer >= 1, got 0"):
        build_avqa_model("dgsct", vocab, "tiny", min_cells=0)


@pytest.mark.parametrize("method", ["dgsct", "stgcma"])
def test_avqa_model_forward_backward_at_tiny_size(method, avqa):
    fresh_seed()
    vocab = QAVocabulary.build(read_avqa(avqa / "avqa-train.json"))
    model = build_avqa_model(method, vocab, "tiny", min_cells=1)  # the deepest map: every adapter has a gradient
    cfg = model.config
    question = torch.randint(0, len(vocab.words), (2, 3, vocab.max_words))
    question[:, :, 0] = 2  # every question has a first word
    out = model(torch.randn(2, 10, 3, cfg.img_size, cfg.img_size), random_audio(method, cfg, 2, 10), question)
    assert out["logits"].shape == (2, 3, len(vocab.answers))
    batch = {"answer": torch.randint(0, len(vocab.answers), (2, 3)),
             "asked": torch.tensor([[True, True, False], [True, False, False]])}
    loss, metrics = model.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["loss"] == pytest.approx(loss.item())
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert any(n.startswith("head.") for n in trainable) and any(n.startswith("backbone.") for n in trainable)
    missing = [n for n, p in trainable.items() if (p.grad is None and not n.endswith("attn.k.bias"))
               or (p.grad is not None and not torch.isfinite(p.grad).all())]
    assert not missing, missing
    with pytest.raises(ValueError, match=r"question: expected \(B, Q, L\) word indices with B = 2"):
        model(torch.randn(2, 10, 3, cfg.img_size, cfg.img_size), random_audio(method, cfg, 2, 10), question[0])


def test_avqa_demo_beats_the_majority_answer_by_15_points(tmp_path, capsys):
    from avfast.cli import main

    run = subprocess.run([sys.executable, "-m", "avfast", "demo", "--task", "avqa", "--out", str(tmp_path),
                          "--workers", "0"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "the majority answer" in run.stdout
    records = [json.loads(line) for line in open(tmp_path / "run-avqa-dgsct" / "log.jsonl")]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 10
    data = next(tmp_path.glob("avqa-*"))
    baselines = answer_baselines(read_avqa(data / "avqa-train.json"), read_avqa(data / "avqa-val.json"))
    assert epochs[-1]["val_accuracy"] >= baselines["majority"] + 0.15
    assert epochs[-1]["val_accuracy"] > baselines["type_majority"]  # more than the question type's prior
    assert main(["eval", "--checkpoint", str(tmp_path / "run-avqa-dgsct" / "best.pt"), "--data", str(data),
                 "--split", "test", "--workers", "0"]) == 0
    assert "val_accuracy=" in capsys.readouterr().out
