"""Sample plans: crops, frame indices, audio windows, background partners, shards."""

import math

import numpy as np
import pytest

from avfast.data.presets import PRESETS, VideoSpec, get_preset
from avfast.data.sampling import (BackgroundPartners, ClipInfo, epoch_indices, eval_crop,
                                  plan_sample, random_resized_crop, sample_rng)
from seeding import module_seed

SEED = module_seed()


def info(width=96, height=64, fps=10.0, frames=100, seconds=10.0, rate=16000, **kw):
    return ClipInfo(width, height, fps, frames, round(seconds * rate), **kw)


@pytest.mark.parametrize("height,width", [(64, 96), (97, 31), (1, 1), (5, 300)])
def test_random_resized_crop_stays_inside_and_follows_scale(height, width):
    spec = VideoSpec(train_scale=(0.3, 0.9))
    rng = np.random.default_rng(SEED)
    inside_scale = 0
    for _ in range(200):
        top, left, h, w = random_resized_crop(height, width, spec, rng)
        assert 0 <= top and 0 <= left and h >= 1 and w >= 1
        assert top + h <= height and left + w <= width
        inside_scale += 0.25 <= h * w / (height * width) <= 0.95
    if (height, width) == (64, 96):
        assert inside_scale > 150  # the fallback centre crop is rare for ordinary frames


def test_random_resized_crop_fallback_is_centred_with_clamped_ratio():
    spec = VideoSpec(train_scale=(1.0, 1.0), train_ratio=(1.0, 1.0))
    assert random_resized_crop(10, 40, spec, np.random.default_rng(0)) == (0, 15, 10, 10)


def test_eval_crop_geometry():
    assert eval_crop(64, 96, VideoSpec(eval_crop_fraction=None)) == (0, 0, 64, 96)
    assert eval_crop(64, 96, VideoSpec(eval_crop_fraction=1.0)) == (0, 16, 64, 64)
    top, left, h, w = eval_crop(256, 320, VideoSpec(eval_crop_fraction=224 / 256))
    assert (h, w) == (224, 224) and (top, left) == (16, 48)


def test_window_plans_train_random_eval_centred():
    preset = get_preset("deepavfusion")  # 3 s window, 1 frame inside it
    clip = info(seconds=10.0)
    starts, frames = set(), set()
    for index in range(60):
        plan = plan_sample(0, [clip], preset, train=True, seed=SEED, epoch=index)
        (start,) = plan.audio_starts
        assert 0 <= start <= 7 * 16000
        t0, t1 = start / 16000, start / 16000 + 3.0
        (frame,) = plan.frame_indices
        assert math.floor(t0 * 10) <= frame <= min(99, math.floor(t1 * 10))
        starts.add(start)
        frames.add(frame)
    assert len(starts) > 30 and len(frames) > 10
    plan = plan_sample(0, [clip], preset, train=False, seed=SEED, epoch=0)
    assert plan.audio_starts == (56000,) and plan.frame_indices == (50,) and not plan.flip


def test_short_clip_window_starts_at_zero():
    plan = plan_sample(0, [info(seconds=1.2)], get_preset("deepavfusion"), train=True, seed=SEED, epoch=1)
    assert plan.audio_starts == (0,)


def test_segment_plans_follow_upstream_linspace():
    preset = get_preset("stgcma")  # 10 x 1 s windows at linspace(0, len - 1.1 s), 10 frames
    plan = plan_sample(0, [info(seconds=10.0, frames=250, fps=25.0)], preset, train=True, seed=SEED, epoch=0)
    expected = np.linspace(0, 160000 - 17600, 10).round().astype(int)
    assert plan.audio_starts == tuple(expected)
    assert plan.frame_indices == tuple(np.linspace(0, 249, 10).round().astype(int))


def test_clip_start_and_end_bound_the_plan():
    preset = get_preset("stgcma")
    clip = info(seconds=30.0, frames=300, start_s=10.0, end_s=20.0)
    plan = plan_sample(0, [clip], preset, train=False, seed=SEED, epoch=0)
    assert plan.audio_starts[0] == 160000 and plan.audio_starts[-1] == 320000 - 17600
    assert plan.frame_indices[0] == 100 and plan.frame_indices[-1] == 199


def test_plans_are_deterministic_per_seed_epoch_index():
    preset = get_preset("mavt")
    infos = [info(), info(width=50, height=70)]
    a = plan_sample(1, infos, preset, train=True, seed=SEED, epoch=3)
    assert a == plan_sample(1, infos, preset, train=True, seed=SEED, epoch=3)
    draws = {plan_sample(1, infos, preset, train=True, seed=SEED, epoch=e) for e in range(8)}
    assert len(draws) > 1
    assert sample_rng(SEED, 3, 1).random() == sample_rng(SEED, 3, 1).random()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_plans_inside_its_clip(name):
    preset = PRESETS[name]
    clip = info(width=80, height=60, fps=25.0, frames=250, rate=preset.audio.sample_rate)
    for train in (True, False):
        plan = plan_sample(0, [clip], preset, train=train, seed=SEED, epoch=2)
        assert len(plan.frame_indices) == preset.video.frames
        assert all(0 <= f < 250 for f in plan.frame_indices)
        assert len(plan.audio_starts) == preset.audio.segments
        top, left, h, w = plan.crop
        assert top + h <= 60 and left + w <= 80


def test_background_partners_are_of_another_class():
    labels = [(0,), (0,), (1,), (2,), (1, 2)]
    partners = BackgroundPartners(labels)
    rng = np.random.default_rng(SEED)
    seen = set()
    for _ in range(200):
        j = partners.draw(0, rng)
        assert not set(labels[j]) & {0}
        seen.add(j)
    assert seen == {2, 3, 4}
    assert {partners.draw(4, rng) for _ in range(50)} == {0, 1}
    with pytest.raises(ValueError, match="background_p: needs a clip of another class"):
        BackgroundPartners([(0,), (0,)]).draw(0, rng)


def test_background_probability_in_plans():
    preset = get_preset("mavt")
    infos = [info() for _ in range(6)]
    partners = BackgroundPartners([(i % 3,) for i in range(6)])
    plans = [plan_sample(i % 6, infos, preset, train=True, seed=SEED, epoch=i // 6, background_p=0.3,
                         partners=partners) for i in range(600)]
    background = [p for p in plans if p.background]
    assert 120 < len(background) < 240  # 0.3 of 600 = 180, sd ~11
    assert all(p.audio_index % 3 != p.index % 3 for p in background)
    assert all(p.audio_index == p.index for p in plans if not p.background)
    evals = [plan_sample(i, infos, preset, train=False, seed=SEED, epoch=0, background_p=0.3,
                         partners=partners) for i in range(6)]
    assert not any(p.background for p in evals)
    with pytest.raises(ValueError, match="partners: expected BackgroundPartners"):
        plan_sample(0, infos, preset, train=True, seed=SEED, epoch=0, background_p=1.0)


def test_epoch_indices_shard_the_permutation():
    shards = [epoch_indices(10, train=True, seed=SEED, epoch=1, shard_id=r, num_shards=3) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    together = np.concatenate(shards)
    assert set(together.tolist()) == set(range(10)) and len(together) == 12
    assert not np.array_equal(epoch_indices(10, train=True, seed=SEED, epoch=2, shard_id=0, num_shards=1),
                              epoch_indices(10, train=True, seed=SEED, epoch=1, shard_id=0, num_shards=1))
    assert epoch_indices(5, train=False, seed=SEED, epoch=9, shard_id=0, num_shards=1).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="shard_id: expected 0 <= shard_id < num_shards=2, got 2"):
        epoch_indices(5, train=False, seed=0, epoch=0, shard_id=2, num_shards=2)


def test_get_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"preset: expected one of \['deepavfusion', 'dgsct', 'mavt', 'stgcma'\], got 'x'"):
        get_preset("x")
