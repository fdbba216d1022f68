"""Audio-visual question answering (MUSIC-AVQA): the question JSON, its vocabularies, a
synthetic set of templated questions, the question encoder, the spatio-temporal grounding
and fusion head on a per-second method's features, and accuracy per question type.

Format (``read_avqa``): MUSIC-AVQA's ``avqa-{train,val,test}.json``, a list of questions::

    {"video_id": "00000272", "question_id": 1, "type": "[\\"Audio\\", \\"Counting\\"]",
     "question_content": "Is the <Object> louder than the <Object>?",
     "templ_values": "[\\"cello\\", \\"piano\\"]", "anser": "yes", "question_deleted": 0}

(``anser`` is the release's spelling; ``type`` and ``templ_values`` are JSON strings; each
``<...>`` placeholder takes the next template value). Videos at
``<root>/video/<video_id>.<mp4|mkv|webm>``; root is the json's folder by default. Rows with
``question_deleted`` 1 are left out, as the release intends.

Question types: the modality ("Audio", "Visual", "Audio-Visual") x the kind ("Counting",
"Comparative", "Location", "Existential", "Temporal"); MUSIC-AVQA uses 9 of the 15 pairs.

Head (ST-AVQA's, Li et al. CVPR 2022, on a method's per-second features): the question's
words (lower-cased, the placeholders filled) through an embedding and an LSTM, tanh of a
linear map of its last (h, c) -> q. Per second, the audio vector is projected to a and the
cells of the deepest visual map with at least ``min_cells`` cells (``grounding_level``) to v;
spatial grounding: a attends over that second's cells
(scaled dot product) and the attended cell feature is merged with the cells' mean (tanh of
a linear map). Temporal grounding: q attends over the seconds of a and of the grounded v
(multi-head attention, residual feed-forward). Fusion: tanh of a linear map of the two
attended vectors (each plus its mean over seconds), times q, tanh, a linear map to the
answers. Loss: cross-entropy (upstream adds a contrastive audio-visual matching term; not
here). Accuracy: correct / questions, overall, per modality and per type.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from avfast.data.manifest import BadRow, Clip, Manifest, report_bad_row
from avfast.data.presets import Preset, check_per_second, get_preset
from avfast.models.base import freeze

MODALITIES = ("Audio", "Visual", "Audio-Visual")
KINDS = ("Counting", "Comparative", "Location", "Existential", "Temporal")
QUESTION_TYPES = tuple((m, k) for m in MODALITIES for k in KINDS)
FIELDS = ("video_id", "question_id", "type", "question_content", "templ_values", "anser")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
PAD, UNKNOWN = "<pad>", "<unk>"
QA_METHODS = ("stgcma", "dgsct")  # the per-second methods the papers evaluate on MUSIC-AVQA
SECONDS = 10  # the per-second presets' frames and windows per video
_PLACEHOLDER = re.compile(r"<[^<>]*>")
_WORD = re.compile(r"[a-z0-9_']+")


# ---------------------------------------------------------------------- format


@dataclasses.dataclass(frozen=True)
class AVQAQuestion:
    """One question: its ``video_id`` and video ``path``, ``question_id``, ``modality`` and
    ``kind`` (its type), ``words`` (the filled-in question, tokenised), the ``answer`` string
    and ``origin`` (file, 1-based position in the list)."""

    video_id: str
    path: str
    question_id: int
    modality: str
    kind: str
    words: tuple[str, ...]
    answer: str
    origin: tuple[str, int] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def type_index(self) -> int:
        return QUESTION_TYPES.index((self.modality, self.kind))


def question_words(content: str, values: list[str]) -> tuple[str, ...]:
    """The words of ``content`` with each ``<...>`` placeholder replaced by the next of
    ``values``, lower-cased, punctuation dropped."""
    holes = _PLACEHOLDER.findall(content)
    if len(holes) != len(values):
        raise ValueError(f"expected {len(holes)} template values for {holes}, got {len(values)}")
    filled = iter(values)
    text = _PLACEHOLDER.sub(lambda _: str(next(filled)), content)
    return tuple(_WORD.findall(text.lower()))


def _parse_row(row) -> tuple[str, int, str, str, tuple[str, ...], str]:
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise ValueError(f"expected the fields {list(FIELDS)}, missing {missing}")
    kind = json.loads(row["type"]) if isinstance(row["type"], str) else row["type"]
    if not (isinstance(kind, list) and len(kind) == 2 and tuple(kind) in QUESTION_TYPES):
        raise ValueError(f"type: expected [modality, kind] with modality in {MODALITIES} and kind in {KINDS}, "
                         f"got {row['type']!r}")
    values = json.loads(row["templ_values"]) if isinstance(row["templ_values"], str) else row["templ_values"]
    if not isinstance(values, list):
        raise ValueError(f"templ_values: expected a list, got {row['templ_values']!r}")
    if isinstance(row["question_id"], bool) or not isinstance(row["question_id"], int):
        raise ValueError(f"question_id: expected an integer, got {row['question_id']!r}")
    answer = row["anser"]
    if not isinstance(answer, str) or not answer:
        raise ValueError(f"anser: expected a non-empty string, got {answer!r}")
    return (str(row["video_id"]), row["question_id"], kind[0], kind[1],
            question_words(str(row["question_content"]), values), answer)


def read_avqa(path, root=None, bad: list[BadRow] | None = None) -> list[AVQAQuestion]:
    """The questions of a MUSIC-AVQA json (in file order, deleted ones left out). A row
    missing a field or with a malformed type, template or id, a duplicate question_id, a
    video id that leaves the folder or a missing video raises naming the file and position,
    or goes to ``bad`` when it is a list."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_avqa: expected a MUSIC-AVQA json file, got no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"read_avqa: {path} is not JSON: {err}") from err
    if not isinstance(rows, list):
        raise ValueError(f"read_avqa: {path} must hold a list of questions, got {type(rows).__name__}")
    root = os.path.dirname(os.path.abspath(path)) if root is None else os.fspath(root)
    fn, questions, seen = "read_avqa", [], {}
    for position, row in enumerate(rows, start=1):
        name = str(row.get("video_id", "")) if isinstance(row, dict) else ""
        if isinstance(row, dict) and row.get("question_deleted") in (1, "1"):
            continue
        try:
            video_id, qid, modality, kind, words, answer = _parse_row(row)
        except (ValueError, json.JSONDecodeError) as err:
            report_bad_row(fn, bad, BadRow(path, position, name, "malformed", str(err)))
            continue
        if "/" in video_id or os.sep in video_id or video_id in ("", ".", ".."):
            report_bad_row(fn, bad, BadRow(path, position, video_id, "escapes root",
                                           f"video_id must be a plain name, got {video_id!r}"))
            continue
        if qid in seen:
            report_bad_row(fn, bad, BadRow(path, position, video_id, "duplicate id",
                                           f"question_id {qid} first at entry {seen[qid]}"))
            continue
        seen[qid] = position
        video = next((os.path.join(root, "video", video_id + s) for s in VIDEO_SUFFIXES
                      if os.path.isfile(os.path.join(root, "video", video_id + s))), None)
        if video is None:
            report_bad_row(fn, bad, BadRow(path, position, video_id, "missing file",
                                           f"no video/{video_id}{{{','.join(VIDEO_SUFFIXES)}}} under {root}"))
            continue
        questions.append(AVQAQuestion(video_id, video, qid, modality, kind, words, answer, origin=(path, position)))
    return questions


@dataclasses.dataclass(frozen=True)
class QAVocabulary:
    """The question words (index 0 pads, 1 stands for a word not seen in training), the
    answers (the classes) and ``max_words``, the longest question a batch holds."""

    words: tuple[str, ...]
    answers: tuple[str, ...]
    max_words: int

    @classmethod
    def build(cls, questions: list[AVQAQuestion]) -> QAVocabulary:
        """From the training questions: words by first appearance, answers sorted."""
        if not questions:
            raise ValueError("questions: expected training questions to build the vocabulary from, got none")
        words = dict.fromkeys(w for q in questions for w in q.words)
        return cls((PAD, UNKNOWN, *words), tuple(sorted({q.answer for q in questions})),
                   max(len(q.words) for q in questions))

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def encode(self, words: tuple[str, ...]) -> Tensor:
        """int64 (max_words,): word indices, padded with 0."""
        if len(words) > self.max_words:
            raise ValueError(f"words: expected at most {self.max_words} words (the longest training question), "
                             f"got {len(words)}: {' '.join(words)!r}")
        ids = [self._index.get(w, 1) for w in words]
        return torch.tensor(ids + [0] * (self.max_words - len(ids)), dtype=torch.long)


def usable_questions(questions: list[AVQAQuestion], vocab: QAVocabulary,
                     bad: list[BadRow] | None = None) -> list[AVQAQuestion]:
    """The questions whose answer is in ``vocab`` and whose length fits; the others raise, or
    go to ``bad`` ('unknown label' / 'malformed') when it is a list."""
    kept = []
    for q in questions:
        file, row = q.origin or (q.path, None)
        if q.answer not in vocab.answers:
            report_bad_row("read_avqa", bad, BadRow(file, row, q.video_id, "unknown label",
                                                    f"answer {q.answer!r} is not a training answer"))
        elif len(q.words) > vocab.max_words:
            report_bad_row("read_avqa", bad, BadRow(file, row, q.video_id, "malformed",
                                                    f"{len(q.words)} words, more than the longest training "
                                                    f"question's {vocab.max_words}"))
        else:
            kept.append(q)
    return kept


# ---------------------------------------------------------------------- data


class AVQADataset(torch.utils.data.Dataset):
    """The videos of ``questions``, each with all its questions, as a per-second method's
    preset sees them (CPU decoding through ``avfast.data.cpu.ClipDataset``): item i (video
    i, in first-question order) has ``frames`` (10, 3, S, S), ``audio`` (10, *features) and
    its questions padded to Q = the most any video has: ``question`` int64 (Q, max_words),
    ``answer`` int64 (Q,), ``qtype`` int64 (Q,) (the index in ``QUESTION_TYPES``) and
    ``asked`` bool (Q,). A video is decoded and encoded once for all its questions (its
    features do not depend on the question)."""

    def __init__(self, questions: list[AVQAQuestion], vocab: QAVocabulary, preset: str | Preset, *,
                 train: bool, seed: int = 0):
        from avfast.data.cpu import ClipDataset

        if not questions:
            raise ValueError("questions: expected at least one AVQAQuestion, got none")
        self.preset = get_preset(preset)
        check_per_second(self.preset, SECONDS)
        self.vocab = vocab
        self.videos: dict[str, list[AVQAQuestion]] = {}
        for q in usable_questions(questions, vocab):
            self.videos.setdefault(q.path, []).append(q)
        self.paths = list(self.videos)
        self.max_questions = max(len(qs) for qs in self.videos.values())
        clips = [Clip(path=p, labels=(), origin=self.videos[p][0].origin) for p in self.paths]
        self.clips = ClipDataset(Manifest(clips, list(vocab.answers)), self.preset, train=train, seed=seed)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.clips.set_epoch(epoch)

    def load(self, index: int) -> dict:
        from avfast.data.transforms import audio_features, normalize_frames

        _, frames, windows = self.clips.load(index)
        asked = self.videos[self.paths[index]]
        Q, pad = self.max_questions, self.max_questions - len(asked)
        question = torch.zeros(Q, self.vocab.max_words, dtype=torch.long)
        question[:len(asked)] = torch.stack([self.vocab.encode(q.words) for q in asked])
        return {"frames": normalize_frames(frames, self.preset.video.mean, self.preset.video.std),
                "audio": audio_features(windows[None], self.preset)[0], "question": question,
                "answer": torch.tensor([self.vocab.answers.index(q.answer) for q in asked] + [0] * pad),
                "qtype": torch.tensor([q.type_index for q in asked] + [0] * pad),
                "asked": torch.arange(Q) < len(asked)}


def avqa_loader(questions: list[AVQAQuestion], vocab: QAVocabulary, preset: str | Preset, *, train: bool,
                seed: int = 0, **kwargs):
    """An ``avfast.data.cpu.IndexedLoader`` of ``AVQADataset``; ``kwargs`` go to the loader."""
    from avfast.data.cpu import IndexedLoader

    return IndexedLoader(AVQADataset(questions, vocab, preset, train=train, seed=seed), train=train, seed=seed,
                         **kwargs)


INSTRUMENTS = ("cello", "piano", "violin", "flute", "guitar", "trumpet")


def _synthetic_questions(rng, objects: list[dict]) -> list[tuple[str, str, str, list[str], str]]:
    """(modality, kind, content, values, answer) of the templated questions one video answers."""
    words = ("zero", "one", "two", "three", "four")
    heard = [o for o in objects if o["heard"]]
    out = [("Audio", "Counting", "How many instruments are sounding in the video?", [], words[len(heard)]),
           ("Visual", "Counting", "How many instruments are in the video?", [], words[len(objects)])]
    o = objects[int(rng.integers(len(objects)))]
    out.append(("Visual", "Location", "Where is the <Object>?", [o["name"]], o["side"]))
    o = objects[int(rng.integers(len(objects)))]
    out.append(("Audio-Visual", "Existential", "Is the <Object> in the video playing?", [o["name"]],
                "yes" if o["heard"] else "no"))
    if len(heard) == 1:
        out.append(("Audio-Visual", "Location", "Where is the sounding instrument?", [], heard[0]["side"]))
    if len(heard) >= 2:
        x, y = (heard[i] for i in rng.permutation(len(heard))[:2])
        out.append(("Audio", "Comparative", "Is the <Object> louder than the <Object>?", [x["name"], y["name"]],
                    "yes" if x["loudness"] > y["loudness"] else "no"))
        out.append(("Audio-Visual", "Temporal", "Does the <Object> start playing before the <Object>?",
                    [x["name"], y["name"]], "yes" if x["onset"] < y["onset"] else "no"))
    return out


def make_avqa(root, *, instruments: int = 4, videos: dict[str, int] | None = None, size: int = 32, fps: int = 4,
              sample_rate: int = 16000, seed: int = 0) -> None:
    """A synthetic MUSIC-AVQA folder under ``root`` that ``read_avqa`` reads (H.264 + AAC,
    10 s): each video shows one to three of the first ``instruments`` of ``INSTRUMENTS`` (a
    square of its colour in the left or right half), at least one of them playing (its tone,
    from a random onset to the end, at one of two loudnesses), and asks the templated
    questions it answers (counting, location, existential, comparative, temporal).
    ``videos``: videos per split (default train 48, val 12, test 12)."""
    from avfast.data.synthetic import _encode, class_colour, class_frequency, tone

    if isinstance(instruments, bool) or not isinstance(instruments, int) or not 3 <= instruments <= len(INSTRUMENTS):
        raise ValueError(f"instruments: expected an integer in [3, {len(INSTRUMENTS)}], got {instruments!r}")
    videos = {"train": 48, "val": 12, "test": 12} if videos is None else dict(videos)
    if set(videos) - {"train", "val", "test"} or any(not isinstance(n, int) or n < 0 for n in videos.values()):
        raise ValueError(f"videos: expected counts >= 0 for 'train', 'val', 'test', got {videos!r}")
    root = Path(root)
    (root / "video").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    qid, side = 0, size // 2
    for split, count in videos.items():
        rows = []
        for j in range(count):
            video_id = f"{split}{j:05d}"
            chosen = rng.choice(instruments, size=int(rng.integers(1, 4)), replace=False)
            objects = [{"index": int(k), "name": INSTRUMENTS[k], "side": str(rng.choice(("left", "right"))),
                        "heard": bool(rng.random() < 0.6), "loudness": float(rng.choice((0.35, 1.0))),
                        "onset": int(rng.integers(0, 6))} for k in chosen]
            if not any(o["heard"] for o in objects):
                objects[int(rng.integers(len(objects)))]["heard"] = True
            frames = (rng.integers(96, 160, (SECONDS * fps, size, size, 1))
                      + rng.integers(-8, 9, (SECONDS * fps, size, size, 3))).clip(0, 255).astype(np.uint8)
            wave = rng.normal(0, 0.01, SECONDS * sample_rate).astype(np.float32)
            for o in objects:
                x = int(rng.integers(0, side // 2 + 1)) + (side if o["side"] == "right" else 0) - side // 4
                x = min(max(x, 0), size - side // 2)
                y = int(rng.integers(0, size - side // 2 + 1))
                frames[:, y:y + side // 2, x:x + side // 2] = class_colour(o["index"], len(INSTRUMENTS))
                if o["heard"]:
                    n = (SECONDS - o["onset"]) * sample_rate
                    wave[o["onset"] * sample_rate:] += o["loudness"] * tone(
                        rng, class_frequency(o["index"], len(INSTRUMENTS)), n, sample_rate) / 2
            _encode(root / "video" / f"{video_id}.mp4", frames, fps, wave.clip(-1, 1), sample_rate)
            for modality, kind, content, values, answer in _synthetic_questions(rng, objects):
                qid += 1
                rows.append({"video_id": video_id, "question_id": qid, "type": json.dumps([modality, kind]),
                             "question_content": content, "templ_values": json.dumps(values),
                             "question_deleted": 0, "anser": answer})
        with open(root / f"avqa-{split}.json", "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


# ---------------------------------------------------------------------- head


class QuestionEncoder(nn.Module):
    """ST-AVQA's question encoder: word embedding, one LSTM layer, tanh(Linear(cat(h, c))).
    words int64 (B, L) (0 pads, ignored) -> (B, width)."""

    def __init__(self, vocabulary: int, width: int = 512):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width, padding_idx=0)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.out = nn.Linear(2 * width, width)

    def forward(self, words: Tensor) -> Tensor:
        lengths = (words != 0).sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(words), lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, (h, c) = self.lstm(packed)
        return torch.tanh(self.out(torch.cat([h[-1], c[-1]], dim=1)))


class GroundedQAHead(nn.Module):
    """ST-AVQA's spatio-temporal grounding and fusion (module docstring). forward(question
    (B, L) int64, audio (B, T, Da), cells (B, T, C, h, w)) -> answer logits (B, answers)."""

    def __init__(self, vocabulary: int, answers: int, audio_dim: int, visual_dim: int, *, width: int = 512,
                 heads: int = 4, dropout: float = 0.1):
        super().__init__()
        for name, value in (("vocabulary", vocabulary), ("answers", answers), ("audio_dim", audio_dim),
                            ("visual_dim", visual_dim), ("width", width), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if width % heads:
            raise ValueError(f"heads: expected a divisor of width {width}, got {heads}")
        self.question = QuestionEncoder(vocabulary, width)
        self.audio_proj, self.visual_proj = nn.Linear(audio_dim, width), nn.Linear(visual_dim, width)
        self.ground = nn.Linear(2 * width, width)
        self.attn_a = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.attn_v = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ff_a = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width))
        self.ff_v = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width))
        self.norm_a, self.norm_v = nn.LayerNorm(width), nn.LayerNorm(width)
        self.fusion = nn.Linear(2 * width, width)
        self.answer = nn.Linear(width, answers)

    def _temporal(self, q: Tensor, x: Tensor, attn, ff, norm) -> Tensor:
        attended = attn(q[:, None], x, x, need_weights=False)[0][:, 0]
        return norm(attended + ff(attended))

    def forward(self, question: Tensor, audio: Tensor, cells: Tensor) -> Tensor:
        if cells.dim() != 5 or audio.dim() != 3 or audio.shape[:2] != cells.shape[:2]:
            raise ValueError(f"audio, cells: expected (B, T, Da) and (B, T, C, h, w) of equal B and T, got "
                             f"{tuple(audio.shape)} and {tuple(cells.shape)}")
        q = self.question(question)
        a = self.audio_proj(audio)  # (B, T, D)
        v = self.visual_proj(cells.flatten(3).transpose(2, 3))  # (B, T, h*w, D)
        weights = torch.softmax((v @ a[..., None])[..., 0] / a.shape[-1] ** 0.5, dim=-1)  # (B, T, h*w)
        located = (weights[..., None] * v).sum(2)
        v = torch.tanh(self.ground(torch.cat([located, v.mean(2)], dim=-1)))  # (B, T, D)
        a_att = self._temporal(q, a, self.attn_a, self.ff_a, self.norm_a) + a.mean(1)
        v_att = self._temporal(q, v, self.attn_v, self.ff_v, self.norm_v) + v.mean(1)
        fused = torch.tanh(self.fusion(torch.cat([a_att, v_att], dim=-1)))
        return self.answer(torch.tanh(fused * q))


def grounding_level(grids: list[tuple[int, int]], min_cells: int = 1) -> int:
    """The index of the map that spatial grounding uses, given the maps' (h, w): the one with
    the fewest cells among those with at least ``min_cells`` (the finest when none has that
    many; the last of equals): the deepest level with enough cells, whichever order a method
    lists its levels in."""
    cells = [h * w for h, w in grids]
    enough = [i for i, n in enumerate(cells) if n >= min_cells] or [max(reversed(range(len(cells))),
                                                                        key=cells.__getitem__)]
    return min(reversed(enough), key=cells.__getitem__)


class AVQAModel(nn.Module):
    """A per-second method's backbone (``dense_features``: per second its audio vector and
    its deepest visual map of >= ``min_cells`` cells) and a ``GroundedQAHead``. forward(frames (B, 10, 3, S, S), audio
    (B, 10, *features), question (B, Q, L): Q questions per video, each video encoded once)
    -> {"logits": (B, Q, answers)}; ``loss`` is cross-entropy over the asked questions
    (``batch["answer"]`` (B, Q), ``batch["asked"]`` (B, Q)). The backbone's unused heads
    are frozen."""

    batch_inputs = ("question",)  # what the Trainer passes after frames and audio

    def __init__(self, method: str, backbone: nn.Module, vocabulary: int, answers: int, *, min_cells: int = 1,
                 **head_kwargs):
        super().__init__()
        if method not in QA_METHODS:
            raise ValueError(f"method: expected one of {QA_METHODS} (per-second methods), got {method!r}")
        if backbone.config.num_frames != SECONDS:
            raise ValueError(f"backbone: expected num_frames {SECONDS}, got {backbone.config.num_frames}")
        self.method, self.backbone = method, backbone
        self.preset, self.config = backbone.preset, backbone.config
        for name in backbone.dense_unused:
            freeze(backbone.get_submodule(name))
        if isinstance(min_cells, bool) or not isinstance(min_cells, int) or min_cells < 1:
            raise ValueError(f"min_cells: expected an integer >= 1, got {min_cells!r}")
        levels, audio_dim = backbone.dense_shapes()
        self.level = grounding_level([grid for _, grid in levels], min_cells)
        self.head = GroundedQAHead(vocabulary, answers, audio_dim, levels[self.level][0], **head_kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, frames: Tensor, audio: Tensor, question: Tensor) -> dict[str, Tensor]:
        if question.dim() != 3 or question.shape[0] != frames.shape[0]:
            raise ValueError(f"question: expected (B, Q, L) word indices with B = {frames.shape[0]}, "
                             f"got {tuple(question.shape)}")
        maps, a = self.backbone.dense_features(frames, audio)
        B, Q = question.shape[:2]
        a = a.float().unflatten(0, (B, -1))
        cells = maps[self.level].float().unflatten(0, (B, -1))
        per_question = lambda x: x[:, None].expand(B, Q, *x.shape[1:]).flatten(0, 1)  # noqa: E731
        logits = self.head(question.flatten(0, 1), per_question(a), per_question(cells))
        return {"logits": logits.unflatten(0, (B, Q))}

    def loss(self, out: dict[str, Tensor], batch: dict) -> tuple[Tensor, dict[str, float]]:
        asked = batch["asked"]
        loss = nn.functional.cross_entropy(out["logits"][asked].float(), batch["answer"][asked])
        return loss, {"loss": loss.item()}


HEAD_SIZES = {"tiny": dict(width=64, heads=2)}  # ST-AVQA's 512 otherwise
MIN_CELLS = {"tiny": 16}  # a tiny backbone's deepest map is 1 x 1: ground on a 4 x 4 one


def build_avqa_model(method: str, vocab: QAVocabulary, size: str = "base", pretrained: str | None = None,
                     head: dict | None = None, min_cells: int | None = None, **overrides) -> AVQAModel:
    """An ``AVQAModel`` for ``vocab``: ``method``'s backbone at ``size`` (``overrides``;
    ``pretrained``: a local upstream checkpoint), a head of ``HEAD_SIZES[size]`` (or
    ST-AVQA's sizes) updated by ``head``, grounding on the deepest map of at least
    ``min_cells`` cells (default ``MIN_CELLS[size]``, else 1: the deepest)."""
    from avfast.models import build_model

    if method not in QA_METHODS:
        raise ValueError(f"method: expected one of {QA_METHODS} (per-second methods), got {method!r}")
    backbone = build_model(method, size, num_classes=2, pretrained=pretrained, **overrides)
    return AVQAModel(method, backbone, len(vocab.words), len(vocab.answers),
                     min_cells=MIN_CELLS.get(size, 1) if min_cells is None else min_cells,
                     **{**HEAD_SIZES.get(size, {}), **(head or {})})


# ---------------------------------------------------------------------- metrics


class QAMetrics:
    """Answer accuracy per question type: ``update(logits or predictions, answers, qtypes)``
    per batch, ``compute()`` -> {"accuracy", "audio", "visual", "audio_visual" (per
    modality), "<modality>_<kind>" for each type asked, "questions"}."""

    def __init__(self):
        self.correct, self.count = np.zeros(len(QUESTION_TYPES)), np.zeros(len(QUESTION_TYPES))

    def update(self, predicted: Tensor, answers: Tensor, qtypes: Tensor) -> None:
        if predicted.dim() == 2:
            predicted = predicted.argmax(1)
        if not (predicted.shape == answers.shape == qtypes.shape and predicted.dim() == 1):
            raise ValueError(f"predicted, answers, qtypes: expected (N,) each, got {tuple(predicted.shape)}, "
                             f"{tuple(answers.shape)}, {tuple(qtypes.shape)}")
        hit = (predicted == answers).double().cpu().numpy()
        kinds = qtypes.long().cpu().numpy()
        if kinds.size and not (0 <= kinds.min() and kinds.max() < len(QUESTION_TYPES)):
            raise ValueError(f"qtypes: expected indices in [0, {len(QUESTION_TYPES)}), got {kinds.min()}..{kinds.max()}")
        np.add.at(self.correct, kinds, hit)
        np.add.at(self.count, kinds, 1)

    def to_tensor(self) -> Tensor:
        """(2 * len(QUESTION_TYPES),) float64: correct, then counts, per type."""
        return torch.tensor(np.concatenate([self.correct, self.count]), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, sums: Tensor) -> QAMetrics:
        metrics, n = cls(), len(QUESTION_TYPES)
        values = sums.double().cpu().numpy()
        metrics.correct, metrics.count = values[:n].copy(), values[n:].copy()
        return metrics

    def compute(self) -> dict[str, float]:
        total = self.count.sum()
        if not total:
            raise ValueError("QAMetrics.compute: expected at least one question, got none")
        result = {"accuracy": float(self.correct.sum() / total)}
        for m, modality in enumerate(MODALITIES):
            rows = slice(m * len(KINDS), (m + 1) * len(KINDS))
            if self.count[rows].sum():
                result[_key(modality)] = float(self.correct[rows].sum() / self.count[rows].sum())
        for i, (modality, kind) in enumerate(QUESTION_TYPES):
            if self.count[i]:
                result[f"{_key(modality)}_{kind.lower()}"] = float(self.correct[i] / self.count[i])
        return {**result, "questions": int(total)}


def _key(modality: str) -> str:
    return modality.lower().replace("-", "_")


def answer_baselines(train: list[AVQAQuestion], questions: list[AVQAQuestion]) -> dict[str, float]:
    """Accuracy on ``questions`` of answering every question with the training set's most
    common answer (``majority``) and with the most common training answer of its question
    type (``type_majority``: what a model that reads only the question type can reach)."""
    if not train or not questions:
        raise ValueError(f"train, questions: expected questions in both, got {len(train)} and {len(questions)}")
    overall = Counter(q.answer for q in train).most_common(1)[0][0]
    by_type = {}
    for q in train:
        by_type.setdefault((q.modality, q.kind), Counter())[q.answer] += 1
    typed = [by_type.get((q.modality, q.kind), Counter({overall: 1})).most_common(1)[0][0] for q in questions]
    return {"majority": float(np.mean([q.answer == overall for q in questions])),
            "type_majority": float(np.mean([q.answer == t for q, t in zip(questions, typed)]))}
