"""avfast.tasks.text_classification: text towers read from local files (tiny random open_clip
and CLAP towers) embed prompts as their packages do, the two-branch matching head by hand,
its forward/backward on each per-second method, k-shot draws, the linear probe, and
`avfast train --task text` / `avfast eval --zero-shot` / `--shots` end to end."""

import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from avfast.cli import main
from avfast.data.manifest import Clip, Manifest
from avfast.data.synthetic import make_dataset
from avfast.tasks.text_classification import (TextMatchingHead, TowerSpec, build_text_classifier, few_shot,
                                              few_shot_indices, linear_probe, load_text_tower, parse_tower_specs,
                                              probe_accuracy, readable_name)
from seeding import fresh_seed, random_audio
from text_towers import TINY_CLIP, register_tiny_clip, tiny_clap_weights, tiny_clip_weights

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("towers")
    return {"clip": tiny_clip_weights(folder), "clap": tiny_clap_weights(folder), "folder": folder}


def _specs(towers, *kinds):
    return [f"clip:{TINY_CLIP}={towers['clip']}" if k == "clip" else f"clap={towers['clap']}" for k in kinds]


def test_tower_specs_parse_and_name_bad_values(towers):
    clip, clap = TowerSpec.parse(_specs(towers, "clip")[0]), TowerSpec.parse(f"clap={towers['clap']}")
    assert (clip.kind, clip.model, clip.path) == ("clip", TINY_CLIP, towers["clip"])
    assert (clap.kind, clap.model) == ("clap", None)
    assert TowerSpec.parse(f"clip={towers['clip']}").model == "ViT-B-16"
    for text, message in ((towers["clip"], r"expected 'clip\[:MODEL\]=PATH' or 'clap=PATH', got"),
                          (f"bert={towers['clip']}", r"expected 'clip\[:MODEL\]=PATH' or 'clap=PATH', got 'bert="),
                          ("clip=", r"expected 'clip\[:MODEL\]=PATH'"),
                          (f"clap:roberta={towers['clap']}", r"a CLAP tower takes no model name"),
                          ("clip=/no/such/file.pt", r"expected an existing clip weights path, got '/no/such/file.pt'")):
        with pytest.raises((ValueError, FileNotFoundError), match="text_weights: " + message):
            TowerSpec.parse(text)
    with pytest.raises(ValueError, match="text_weights: expected one clip tower, got two"):
        parse_tower_specs(_specs(towers, "clip", "clip"))
    with pytest.raises(ValueError, match="text_weights: expected a 'clip\\[:MODEL\\]=PATH' and/or .* got none"):
        parse_tower_specs([])
    with pytest.raises(ValueError, match="text_weights: expected an open_clip model name .* got 'no-such-model'"):
        load_text_tower(f"clip:no-such-model={towers['clip']}")
    with pytest.raises(ValueError, match="a clip tower expects a checkpoint file, got the folder"):
        load_text_tower(f"clip:{TINY_CLIP}={towers['clap']}")
    with pytest.raises(ValueError, match="a clap tower expects a save_pretrained folder, got the file"):
        load_text_tower(f"clap={towers['clip']}")


def test_open_clip_tower_embeds_prompts_as_open_clip_does(towers):
    tower = load_text_tower(_specs(towers, "clip")[0])
    model = open_clip.create_model(TINY_CLIP, pretrained=towers["clip"]).eval()
    prompts = ["a photo of a dog.", "a photo of rain on a roof, loud."]
    with torch.no_grad():
        want = F.normalize(model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts)), dim=-1)
    torch.testing.assert_close(tower(prompts), want)
    assert tower.embed_dim == 16 and tower.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    templates = ("a photo of a {}.", "a blurry photo of the {}.")
    classes = tower.embed_classes(["dog_barking", "rain"], templates)
    names = ["dog barking", "rain"]
    by_hand = [F.normalize(sum(tower([t.format(n)])[0] for t in templates) / 2, dim=0) for n in names]
    torch.testing.assert_close(classes, torch.stack(by_hand))
    assert not any(p.requires_grad for p in tower.parameters())
    with pytest.raises(ValueError, match="texts: expected a non-empty list of strings, got \\[\\]"):
        tower([])


def test_clap_tower_embeds_prompts_as_transformers_does(towers):
    tower = load_text_tower(f"clap={towers['clap']}")
    model = transformers.ClapModel.from_pretrained(towers["clap"], local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(towers["clap"], local_files_only=True)
    prompts = ["this is a sound of rain.", "this is a sound of a dog barking far away."]
    with torch.no_grad():
        out = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt"))
    want = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    torch.testing.assert_close(tower(prompts), want)
    torch.testing.assert_close(tower(prompts[:1]), want[:1])  # padding in a batch changes nothing
    assert tower.embed_dim == 8 and tower.logit_scale == pytest.approx(float(model.logit_scale_a.detach().exp()))


def test_readable_name():
    assert readable_name("dog_barking") == "dog barking"
    assert readable_name("class_00") == "class 00"
    assert readable_name("Playing-acoustic_guitar") == "Playing acoustic guitar"


def test_text_matching_head_by_hand():
    fresh_seed()
    head = TextMatchingHead(6, 5, 3, {"clip": 4, "clap": 7}, {"clip": 20.0, "clap": 30.0}, visual_weight=0.3)
    emb = {"clip": torch.randn(3, 4), "clap": torch.randn(3, 7)}
    head.set_classes(emb)
    v, a = torch.randn(2, 6), torch.randn(2, 5)
    pv = F.normalize(v @ head.proj["clip"].weight.t() + head.proj["clip"].bias, dim=-1)
    pa = F.normalize(a @ head.proj["clap"].weight.t() + head.proj["clap"].bias, dim=-1)
    want = 0.3 * 20.0 * pv @ F.normalize(emb["clip"], dim=-1).t() + 0.7 * 30.0 * pa @ F.normalize(emb["clap"], dim=-1).t()
    torch.testing.assert_close(head(v, a), want)
    audio_only = TextMatchingHead(6, 5, 3, {"clap": 7}, {"clap": 30.0})
    audio_only.set_classes({"clap": emb["clap"]})
    audio_only.proj["clap"].load_state_dict(head.proj["clap"].state_dict())
    torch.testing.assert_close(audio_only(v, a), 30.0 * pa @ F.normalize(emb["clap"], dim=-1).t())
    head.set_classes({"clip": torch.randn(5, 4), "clap": torch.randn(5, 7)})  # other classes: zero-shot
    assert head(v, a).shape == (2, 5) and head.num_classes == 5
    with pytest.raises(ValueError, match=r"embeddings: expected the kinds \('clip', 'clap'\), got \('clip',\)"):
        head.set_classes({"clip": torch.randn(3, 4)})
    with pytest.raises(ValueError, match=r"embeddings\['clip'\]: expected \(C, 4\) with one C for all kinds"):
        head.set_classes({"clip": torch.randn(3, 5), "clap": torch.randn(3, 7)})
    with pytest.raises(ValueError, match=r"embeddings\['clip'\]: expected \(C, 4\) with one C for all kinds, got "
                                         r"\{'clip': \(3, 4\), 'clap': \(2, 7\)\}"):
        head.set_classes({"clip": torch.randn(3, 4), "clap": torch.randn(2, 7)})
    with pytest.raises(ValueError, match="visual_weight: expected a number in \\[0, 1\\], got 1.5"):
        TextMatchingHead(6, 5, 3, {"clip": 4}, visual_weight=1.5)
    with pytest.raises(ValueError, match="dims: expected \\{kind: width\\}"):
        TextMatchingHead(6, 5, 3, {"bert": 4})


@pytest.mark.parametrize("method", ["dgsct", "stgcma"])
def test_text_classifier_forward_backward_at_tiny_size(method):
    fresh_seed()
    model = build_text_classifier(method, "tiny", 3, text_dims={"clip": 16, "clap": 8},
                                  text_scales={"clip": 10.0, "clap": 10.0})
    model.head.set_classes({"clip": torch.randn(3, 16), "clap": torch.randn(3, 8)})
    cfg = model.config
    frames = torch.randn(2, cfg.num_frames, 3, cfg.img_size, cfg.img_size)
    out = model(frames, random_audio(method, cfg, 2, cfg.num_frames))
    assert out["logits"].shape == (2, 3)
    assert {k: tuple(e.shape) for k, e in out["embeddings"].items()} == {"clip": (2, 16), "clap": (2, 8)}
    loss, metrics = model.loss(out, {"label": torch.tensor([2, 0])})
    torch.testing.assert_close(loss, F.cross_entropy(out["logits"], torch.tensor([2, 0])))
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("head.proj.clip") for n in trainable) and any(n.startswith("head.proj.clap")
                                                                           for n in trainable)
    assert any(n.startswith("backbone.") for n in trainable)
    bad = [n for n, p in trainable.items() if (p.grad is None and not n.endswith("attn.k.bias"))
           or (p.grad is not None and not torch.isfinite(p.grad).all())]
    assert not bad, bad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if n.startswith("head."))
    for name in model.backbone.dense_unused:
        assert all(not p.requires_grad for p in model.backbone.get_submodule(name).parameters())
    with pytest.raises(ValueError, match=r"method: expected one of \('dgsct', 'stgcma'\)"):
        build_text_classifier("mavt", "tiny", 3, text_dims={"clip": 16})


def test_few_shot_draws_k_per_class_and_names_short_classes():
    labels = [0, 1, 2, 0, 1, 2, 0, 1, -1, 0, 2, 1]
    chosen, rest = few_shot_indices(labels, 2, seed=5)
    assert sorted(labels[i] for i in chosen) == [0, 0, 1, 1, 2, 2]
    assert sorted(chosen + rest) == [i for i, y in enumerate(labels) if y >= 0]
    assert few_shot_indices(labels, 2, seed=5) == (chosen, rest)
    assert any(few_shot_indices(labels, 2, seed=s)[0] != chosen for s in range(6, 12))
    with pytest.raises(ValueError, match=r"shots: expected at least 4 labelled clips per class, got fewer for "
                                         r"\{'c': 3\}"):
        few_shot_indices(labels, 4, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"got fewer for \{'d': 0\}"):
        few_shot_indices(labels, 1, classes=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="shots: expected a positive integer, got 0"):
        few_shot_indices(labels, 0)
    manifest = Manifest([Clip(path=f"{i}.mkv", labels=(y,) if y >= 0 else ()) for i, y in enumerate(labels)],
                        ["a", "b", "c"])
    shots, others = few_shot(manifest, 2, seed=5)
    assert [c.path for c in shots] == [f"{i}.mkv" for i in chosen]
    assert [c.path for c in others] == [f"{i}.mkv" for i in rest]


def test_linear_probe_fits_separable_clusters_and_reaches_the_optimum():
    fresh_seed()
    centres = F.normalize(torch.randn(4, 12), dim=-1) * 3
    y = torch.arange(4).repeat_interleave(6)
    x = centres[y] + 0.3 * torch.randn(24, 12)
    probe = linear_probe(x[::2], y[::2], 4, weight_decay=1e-2)
    assert probe_accuracy(probe, x[1::2], y[1::2]) == 1.0
    xn = F.normalize(x[::2].double(), dim=-1)
    params = [p.detach().clone().requires_grad_() for p in (probe.weight, probe.bias)]
    objective = F.cross_entropy(xn @ params[0].t() + params[1], y[::2]) + 1e-2 * params[0].square().sum()
    grads = torch.autograd.grad(objective, params)
    assert max(float(g.abs().max()) for g in grads) < 1e-5  # a stationary point of the convex objective
    with pytest.raises(ValueError, match=r"train_x, train_y: expected \(N, D\) and \(N,\), got \(24, 12\) and \(5,\)"):
        linear_probe(x, y[:5], 4)
    with pytest.raises(ValueError, match=r"train_y: expected labels in \[0, 3\), got \[0, 3\]"):
        linear_probe(x, y, 3)


def test_train_text_then_zero_shot_and_probe_from_the_command_line(towers, tmp_path, capsys):
    register_tiny_clip(towers["folder"] / "configs")  # the tiny model's name, as for a file of open_clip's
    make_dataset(tmp_path / "train", num_classes=3, clips_per_class=4, duration=1.0, fps=10, size=32)
    other = tmp_path / "other"
    make_dataset(other, num_classes=2, clips_per_class=3, duration=1.0, fps=10, size=32, seed=4)
    for old, new in (("class_00", "dog_barking"), ("class_01", "rain")):
        shutil.move(other / old, other / new)
    run = tmp_path / "run"
    weights = [a for s in _specs(towers, "clip", "clap") for a in ("--text-weights", s)]
    assert main(["train", "--method", "dgsct", "--task", "text", "--size", "tiny", "--data", str(tmp_path / "train"),
                 "--out", str(run), "--epochs", "1", "--batch-size", "3", "--workers", "0", "--quiet",
                 "--shots", "2", *weights]) == 0
    assert "summary: 2 steps" in capsys.readouterr().out  # 2 shots x 3 classes of the 9 training clips
    ckpt = str(run / "last.pt")

    def scores(*args):
        assert main(["eval", "--checkpoint", ckpt, "--workers", "0", *args]) == 0
        return dict(kv.split("=") for kv in capsys.readouterr().out.split())

    same = scores("--data", str(tmp_path / "train"))  # the trained classes: no tower needed
    again = scores("--data", str(tmp_path / "train"), "--zero-shot")  # their prompts embedded again
    assert same == again
    zero = scores("--data", str(other), "--zero-shot")
    assert 0.0 <= float(zero["val_accuracy"]) <= 1.0
    probe = scores("--data", str(other), "--zero-shot", "--shots", "1")
    assert (probe["shots"], probe["probe_clips"], probe["scored_clips"]) == ("1", "2", "4")
    from avfast.train.tasks import text_evaluator

    trainer = text_evaluator(ckpt, str(other), zero_shot=True, workers=0)
    tower = load_text_tower(_specs(towers, "clap")[0])
    torch.testing.assert_close(trainer.model.head.clap_classes,
                               tower.embed_classes(["dog_barking", "rain"], ("this is a sound of {}.",)))
    for args, message in (
            (["--data", str(other)], "data: expected the checkpoint's classes"),
            (["--data", str(other), "--zero-shot", "--text-weights", _specs(towers, "clap")[0]],
             r"text_weights: expected towers of the checkpoint's widths \{'clip': 16, 'clap': 8\}, got \{'clap': 8\}"),
            (["--data", str(other), "--text-weights", _specs(towers, "clap")[0]],
             "--text-weights: expected with --zero-shot"),
            (["--data", str(other), "--zero-shot", "--shots", "3"],
             "shots: expected clips left to score after 3 per class, got none of 6"),
            (["--data", str(other), "--zero-shot", "--shots", "4"],
             r"shots: expected at least 4 labelled clips per class, got fewer for \{'dog_barking': 3, 'rain': 3\}")):
        with pytest.raises(SystemExit):
            main(["eval", "--checkpoint", ckpt, "--workers", "0", *args])
        err = capsys.readouterr().err
        assert re.search(message, err), err
    with pytest.raises(SystemExit):
        main(["train", "--method", "dgsct", "--task", "text", "--size", "tiny", "--data", str(tmp_path / "train"),
              "--out", str(tmp_path / "run2"), "--workers", "0"])
    assert "text_weights: expected a 'clip[:MODEL]=PATH' and/or a 'clap=PATH' tower, got none" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run2" / "last.pt")
