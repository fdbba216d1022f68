"""Clip tables: ``Manifest`` (a list of ``Clip``) with an exact CSV round trip, and readers for
a class-per-folder tree, VGGSound, AVE, AudioSet and avfast's own manifest files.

Readers never drop a row silently: a clip whose file is not found raises
(``missing="error"``), is left out with a warning giving the count and the first paths
(``"skip"``), or is kept with its expected path (``"keep"``, so ``prepare`` reports it).
Given a list as ``bad``, readers append a ``BadRow`` (file, row number, reason) for each row
they cannot use instead of raising; ``check_clips`` adds missing files, paths that escape
the root and duplicate ids, and ``align_classes`` unknown labels of a second manifest.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi")
MISSING = ("error", "skip", "keep")
MAGIC = "# avfast manifest v1"
COLUMNS = ("path", "labels", "start", "end", "audio_path", "segment_labels", "fps", "num_frames",
           "duration", "sample_rate", "width", "height")
AVE_SEGMENTS = 10  # AVE videos are 10 s, labelled per second
# the 28 AVE categories (as spelled in Annotations.txt)
AVE_CATEGORIES = frozenset({
    "Accordion", "Acoustic guitar", "Baby cry, infant cry", "Banjo", "Bark", "Bus", "Cat",
    "Chainsaw", "Church bell", "Clock", "Female speech, woman speaking", "Fixed-wing aircraft, airplane",
    "Flute", "Frying (food)", "Goat", "Helicopter", "Horse", "Male speech, man speaking", "Mandolin",
    "Motorcycle", "Race car, auto racing", "Rodents, rats, mice", "Shofar", "Toilet flush",
    "Train horn", "Truck", "Ukulele", "Violin, fiddle",
})
SHOW = 5  # paths quoted in messages
BAD_REASONS = ("malformed", "unknown label", "missing file", "escapes root", "duplicate id", "unreadable")


@contextlib.contextmanager
def atomic_output(dst) -> Iterator[str]:
    """A hidden temporary path next to ``dst`` that is renamed to ``dst`` when the block
    succeeds and deleted when it fails (so ``dst`` is never left half written)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        yield str(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _int_tuple(name: str, value, allow_empty: bool) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
        ok = all(o == v and o >= 0 for o, v in zip(out, value)) and (allow_empty or out)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"Clip: {name} must be a {'' if allow_empty else 'non-empty '}sequence of "
                         f"integers >= 0, got {value!r}")
    return out


@dataclasses.dataclass(frozen=True)
class Clip:
    """One clip. ``path``: the video file (relative paths resolve against Manifest.root);
    ``labels``: class indices (several for multi-label data, none for unlabelled clips);
    ``start``/``end``: s into the file (end None = end of file); ``audio_path``: prepared
    audio (FLAC; None = the audio track of ``path``); ``segment_labels``: one class per
    second (AVE; background = len(classes)). The rest is metadata ``prepare`` fills (None =
    unknown): ``fps``, ``num_frames``, ``width``, ``height`` of the video, ``duration`` (s)
    and ``sample_rate`` of the audio that loaders read (``audio_path`` if set). ``origin``:
    (file, row number) the clip was read from, for messages (not compared, not saved)."""

    path: str
    labels: tuple[int, ...]
    start: float = 0.0
    end: float | None = None
    audio_path: str | None = None
    segment_labels: tuple[int, ...] | None = None
    fps: float | None = None
    num_frames: int | None = None
    duration: float | None = None
    sample_rate: int | None = None
    width: int | None = None
    height: int | None = None
    origin: tuple[str, int] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"Clip: path must be a non-empty string, got {self.path!r}")
        object.__setattr__(self, "labels", _int_tuple("labels", self.labels, allow_empty=True))
        if self.segment_labels is not None:
            object.__setattr__(self, "segment_labels",
                               _int_tuple("segment_labels", self.segment_labels, allow_empty=False))
        if not (isinstance(self.start, (int, float)) and math.isfinite(self.start) and self.start >= 0):
            raise ValueError(f"Clip: start must be a finite number >= 0 s, got {self.start!r} ({self.path})")
        if self.end is not None and not (isinstance(self.end, (int, float)) and self.end > self.start):
            raise ValueError(f"Clip: end must be None or > start={self.start} s, got {self.end!r} ({self.path})")
        for name in ("num_frames", "sample_rate", "width", "height"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"Clip: {name} must be None or an integer >= 0, got {value!r} ({self.path})")


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row that cannot be used: the ``file`` and 1-based ``row`` it was read from (row None
    for a clip found by walking a folder), the clip's ``path`` (or id), one of
    ``BAD_REASONS`` and a free-text ``detail``."""

    file: str
    row: int | None
    path: str
    reason: str
    detail: str = ""

    def __post_init__(self):
        if self.reason not in BAD_REASONS:
            raise ValueError(f"BadRow: reason must be one of {BAD_REASONS}, got {self.reason!r}")

    @classmethod
    def of(cls, clip: Clip, reason: str, detail: str = "") -> "BadRow":
        file, row = clip.origin or (clip.path, None)
        return cls(file, row, clip.path, reason, detail)

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file}:{self.row}"
        return f"{where}: {self.reason}: {self.path}" + (f" ({self.detail})" if self.detail else "")


def report_bad_row(fn: str, bad: list[BadRow] | None, row: BadRow) -> None:
    """Append ``row`` to ``bad``; with no list, raise it as a ValueError."""
    if bad is None:
        raise ValueError(f"{fn}: {row}")
    bad.append(row)


@dataclasses.dataclass
class Manifest:
    """Clips, class names (label k is ``classes[k]``) and the folder relative paths resolve
    against (``root``; "" = the working directory)."""

    clips: list[Clip]
    classes: list[str]
    root: str = ""

    def __post_init__(self):
        self.clips, self.classes, self.root = list(self.clips), list(self.classes), os.fspath(self.root)
        for clip in self.clips:
            unknown = _unknown_labels(clip, len(self.classes))
            if unknown:
                raise ValueError(f"Manifest: {unknown} ({clip.path})")

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Clip:
        return self.clips[index]

    def resolve(self, p: str) -> str:
        """``p`` joined to ``root`` unless it is absolute."""
        return p if os.path.isabs(p) or not self.root else os.path.join(self.root, p)

    def save(self, path) -> None:
        """Write a CSV: a magic line, '# root: <json>', '# classes: <json>', a header, one row
        per clip (labels '|'-joined, None as an empty field). ``load`` returns an equal Manifest."""
        with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(f"{MAGIC}\n# root: {json.dumps(self.root)}\n# classes: {json.dumps(self.classes)}\n")
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for clip in self.clips:
                writer.writerow([_field(getattr(clip, name)) for name in COLUMNS])

    @classmethod
    def load(cls, path, *, bad: list[BadRow] | None = None) -> "Manifest":
        """Read a file written by ``save``. A row that does not parse ('malformed') or has a
        label outside the classes ('unknown label') raises naming file:row, or is appended
        to ``bad`` and left out when a list is given."""
        path = os.fspath(path)
        with open(path, newline="", encoding="utf-8") as f:
            head = [f.readline().rstrip("\r\n") for _ in range(3)]
            if head[0] != MAGIC or not head[1].startswith("# root: ") or not head[2].startswith("# classes: "):
                raise ValueError(f"Manifest.load: {path!r} must start with {MAGIC!r}, '# root: ', "
                                 f"'# classes: ', got {head}")
            root, classes = json.loads(head[1][8:]), json.loads(head[2][11:])
            reader = csv.reader(f)
            header = next(reader, None)
            if tuple(header or ()) != COLUMNS:
                raise ValueError(f"Manifest.load: {path!r} header must be {','.join(COLUMNS)}, got {header}")
            clips = []
            for row in reader:
                if not row:  # a blank line holds no clip
                    continue
                line = reader.line_num + 3  # the reader starts after the three head lines
                name = row[0] if row else ""
                if len(row) != len(COLUMNS):
                    report_bad_row("Manifest.load", bad, BadRow(path, line, name, "malformed",
                                                         f"expected {len(COLUMNS)} fields, got {len(row)}"))
                    continue
                try:
                    clip = _clip_from_row(dict(zip(COLUMNS, row)), origin=(path, line))
                except ValueError as err:
                    report_bad_row("Manifest.load", bad, BadRow(path, line, name, "malformed", str(err)))
                    continue
                unknown = _unknown_labels(clip, len(classes))
                if unknown:
                    report_bad_row("Manifest.load", bad, BadRow(path, line, name, "unknown label", unknown))
                    continue
                clips.append(clip)
        return cls(clips=clips, classes=classes, root=root)


def _unknown_labels(clip: Clip, n: int) -> str:
    """What is wrong with the labels of ``clip`` for ``n`` classes ("" when nothing)."""
    if any(k >= n for k in clip.labels):
        return f"labels must be < len(classes)={n}, got {clip.labels}"
    if clip.segment_labels is not None and any(k > n for k in clip.segment_labels):
        return f"segment_labels must be <= len(classes)={n} (background), got {clip.segment_labels}"
    return ""


def _field(value) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return "|".join(str(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def _clip_from_row(row: dict[str, str], origin: tuple[str, int]) -> Clip:
    def opt(name, kind):
        return None if row[name] == "" else kind(row[name])

    def ints(text):
        return tuple(int(v) for v in text.split("|")) if text else ()

    return Clip(path=row["path"], labels=ints(row["labels"]), start=float(row["start"]),
                end=opt("end", float), audio_path=opt("audio_path", str),
                segment_labels=opt("segment_labels", ints), fps=opt("fps", float),
                num_frames=opt("num_frames", int), duration=opt("duration", float),
                sample_rate=opt("sample_rate", int), width=opt("width", int), height=opt("height", int),
                origin=origin)


# ---------------------------------------------------------------- readers

def _check_missing(fn: str, missing: str) -> None:
    if missing not in MISSING:
        raise ValueError(f"{fn}: missing must be one of {MISSING}, got {missing!r}")


def _check_dir(fn: str, name: str, path) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{fn}: {name} must be an existing folder, got {path!r}")
    return path


def _check_file(fn: str, name: str, path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: {name} must be an existing file, got {path!r}")
    return path


def _extensions(fn: str, extensions) -> tuple[str, ...]:
    if isinstance(extensions, str) or not extensions or not all(
            isinstance(e, str) and e.startswith(".") for e in extensions):
        raise ValueError(f"{fn}: extensions must be a non-empty sequence like ('.mp4', '.mkv'), got {extensions!r}")
    return tuple(e.lower() for e in extensions)


def _files_under(root: str) -> set[str]:
    """Relative paths ('/'-separated) of the files under ``root`` (hidden names excluded)."""
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found.update(prefix + name for name in files if not name.startswith("."))
    return found


def _match(files: set[str], stems: Iterable[str], extensions: Sequence[str]) -> str | None:
    """The first candidate '<stem><ext>' present in ``files`` (extension case ignored)."""
    for stem in stems:
        for ext in extensions:
            for candidate in (stem + ext, stem + ext.upper()):
                if candidate in files:
                    return candidate
    return None


def _place(fn: str, rows: list[tuple[list[str], dict, tuple[str, int]]], clips_root: str, extensions,
           missing: str) -> list[Clip]:
    """Clips for rows of (candidate stems, Clip fields, origin), resolving files under ``clips_root``."""
    files = _files_under(clips_root)
    clips, absent = [], []
    for stems, fields, origin in rows:
        path = _match(files, stems, extensions)
        if path is None:
            absent.append(stems[0] + extensions[0])
            if missing == "skip":
                continue
            path = stems[0] + extensions[0]
        clips.append(Clip(path=path, origin=origin, **fields))
    if absent and missing == "error":
        raise FileNotFoundError(
            f"{fn}: {len(absent)} of {len(rows)} clips have no file under {clips_root!r} (extensions "
            f"{tuple(extensions)}), first: {absent[:SHOW]}; pass missing='skip' to leave them out "
            f"or missing='keep' to keep them")
    if absent and missing == "skip":
        warnings.warn(f"{fn}: left out {len(absent)} of {len(rows)} clips with no file under "
                      f"{clips_root!r}, first: {absent[:SHOW]}", stacklevel=3)
    return clips


def read_folder(root, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> Manifest:
    """root/<class>/<clip> (clips may sit deeper inside the class folder): classes are the
    sorted class folder names, clips sorted by path. Files with other extensions and files
    directly in ``root`` are left out with a warning; hidden names are ignored."""
    root = _check_dir("read_folder", "root", root)
    extensions = _extensions("read_folder", extensions)
    files = sorted(_files_under(root))
    media = [f for f in files if "/" in f and os.path.splitext(f)[1].lower() in extensions]
    chosen = set(media)
    other = [f for f in files if f not in chosen]
    if not media:
        raise ValueError(f"read_folder: root must hold clips in class sub-folders (root/<class>/<clip>) "
                         f"with extensions {extensions}, got none in {root!r} ({len(other)} other files)")
    if other:
        warnings.warn(f"read_folder: left out {len(other)} files that are not <class>/<clip> with "
                      f"extensions {extensions}, first: {other[:SHOW]}", stacklevel=2)
    classes = sorted({f.split("/", 1)[0] for f in media})
    index = {name: k for k, name in enumerate(classes)}
    clips = [Clip(path=f, labels=(index[f.split("/", 1)[0]],)) for f in media]
    return Manifest(clips=clips, classes=classes, root=root)


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {text!r}")
    return value


def read_vggsound(csv_path, clips_root, split: str | None = None, *, missing: str = "error",
                  extensions: Sequence[str] = VIDEO_EXTENSIONS, bad: list[BadRow] | None = None) -> Manifest:
    """VGGSound's vggsound.csv (rows ``youtube_id,start_s,label,split``, no header).

    Classes are the sorted labels of the whole file (the same indices for every split);
    ``split`` keeps only that split's rows. The clip of (yid, start) is the first of
    {yid}_{start:06d}<ext>, {yid}_{start:06d}_{start+10:06d}<ext>, found in ``clips_root`` or
    in clips_root/<label with each non-alphanumeric character replaced by '_'>/; the file
    holds only the 10-s clip, so start = 0 and end = None. Rows that do not parse raise, or
    go to ``bad`` when it is a list."""
    fn = "read_vggsound"
    csv_path = _check_file(fn, "csv_path", csv_path)
    clips_root = _check_dir(fn, "clips_root", clips_root)
    _check_missing(fn, missing)
    extensions = _extensions(fn, extensions)
    entries = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 4:
                report_bad_row(fn, bad, BadRow(csv_path, line, row[0], "malformed",
                                        f"must have 4 fields youtube_id,start_s,label,split, got {row}"))
                continue
            yid, start, label, part = (v.strip() for v in row)
            try:
                entries.append((yid, int(_number("start_s", start)), label, part, line))
            except ValueError as err:
                report_bad_row(fn, bad, BadRow(csv_path, line, yid, "malformed", str(err)))
    if not entries and not bad:
        raise ValueError(f"{fn}: csv_path must hold rows youtube_id,start_s,label,split, got none in {csv_path!r}")
    splits = sorted({e[3] for e in entries})
    if split is not None and split not in splits:
        raise ValueError(f"{fn}: split must be one of {splits} (or None), got {split!r}")
    classes = sorted({e[2] for e in entries})
    index = {name: k for k, name in enumerate(classes)}
    rows = []
    for yid, start, label, part, line in entries:
        if split is not None and part != split:
            continue
        folder = re.sub(r"[^0-9A-Za-z]", "_", label) + "/"
        names = [f"{yid}_{start:06d}", f"{yid}_{start:06d}_{start + 10:06d}"]
        rows.append((names + [folder + n for n in names], {"labels": (index[label],)}, (csv_path, line)))
    return Manifest(clips=_place(fn, rows, clips_root, extensions, missing), classes=classes, root=clips_root)


def read_ave(annotations_path, clips_root, *, missing: str = "error",
             extensions: Sequence[str] = VIDEO_EXTENSIONS, bad: list[BadRow] | None = None) -> Manifest:
    """AVE's Annotations.txt or trainSet/valSet/testSet.txt: '&'-separated
    ``Category&VideoID&Quality&StartTime&EndTime`` (an optional header line first).

    Classes: the 28 AVE categories sorted (the same indices for every split file), or the
    file's sorted categories when it has one outside AVE's. Clip file: clips_root/<VideoID><ext>.
    ``labels = (category,)``; ``segment_labels``: 10 entries, second t in [StartTime, EndTime)
    -> the category, else background = len(classes). Rows that do not parse raise, or go to
    ``bad`` when it is a list."""
    fn = "read_ave"
    annotations_path = _check_file(fn, "annotations_path", annotations_path)
    clips_root = _check_dir(fn, "clips_root", clips_root)
    _check_missing(fn, missing)
    extensions = _extensions(fn, extensions)
    entries = []
    with open(annotations_path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            text = text.strip()
            if not text or (line == 1 and text.startswith("Category&")):
                continue
            fields = text.split("&")
            if len(fields) != 5:
                report_bad_row(fn, bad, BadRow(annotations_path, line, text, "malformed",
                                        "must be Category&VideoID&Quality&StartTime&EndTime"))
                continue
            try:
                start, end = _number("StartTime", fields[3]), _number("EndTime", fields[4])
                if not start < end <= AVE_SEGMENTS:
                    raise ValueError(f"StartTime < EndTime <= {AVE_SEGMENTS} required, got {fields[3]}, {fields[4]}")
            except ValueError as err:
                report_bad_row(fn, bad, BadRow(annotations_path, line, fields[1], "malformed", str(err)))
                continue
            entries.append((fields[0], fields[1], start, end, line))
    if not entries and not bad:
        raise ValueError(f"{fn}: annotations_path must hold Category&VideoID&Quality&StartTime&EndTime "
                         f"rows, got none in {annotations_path!r}")
    found = {e[0] for e in entries}
    classes = sorted(AVE_CATEGORIES if found <= AVE_CATEGORIES else found)
    index = {name: k for k, name in enumerate(classes)}
    background = len(classes)
    rows = []
    for category, vid, start, end, line in entries:
        k = index[category]
        segments = tuple(k if start <= t < end else background for t in range(AVE_SEGMENTS))
        rows.append(([vid], {"labels": (k,), "segment_labels": segments}, (annotations_path, line)))
    return Manifest(clips=_place(fn, rows, clips_root, extensions, missing), classes=classes, root=clips_root)


def read_audioset(segments_csv, class_labels_csv, clips_root, *, missing: str = "error",
                  extensions: Sequence[str] = VIDEO_EXTENSIONS, bad: list[BadRow] | None = None) -> Manifest:
    """AudioSet segments (``# ...`` comment lines, then rows ``YTID, start, end, "m1,m2"``)
    with class_labels_indices.csv (``index,mid,display_name``; classes = display names by index).

    The clip of (YTID, start, end) is the first of {YTID}_{start:06d}, {YTID}_{start:06d}_
    {end:06d} (whole seconds), {YTID}_{start}_{end} and {YTID}_{start} (as written in the CSV),
    {YTID}, in ``clips_root`` or clips_root/<YTID[:2]>/; it holds the cut segment, so
    start = 0 and end = None. Rows that do not parse or name a mid that class_labels_csv
    does not list raise, or go to ``bad`` when it is a list."""
    fn = "read_audioset"
    segments_csv = _check_file(fn, "segments_csv", segments_csv)
    class_labels_csv = _check_file(fn, "class_labels_csv", class_labels_csv)
    clips_root = _check_dir(fn, "clips_root", clips_root)
    _check_missing(fn, missing)
    extensions = _extensions(fn, extensions)
    by_index = {}
    with open(class_labels_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"index", "mid", "display_name"} <= set(reader.fieldnames):
            raise ValueError(f"{fn}: class_labels_csv must have the header index,mid,display_name, "
                             f"got {reader.fieldnames}")
        for row in reader:
            by_index[int(row["index"])] = (row["mid"], row["display_name"])
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"{fn}: class_labels_csv indices must be 0..{len(by_index) - 1}, got {sorted(by_index)[:SHOW]}...")
    classes = [by_index[k][1] for k in range(len(by_index))]
    mid_index = {by_index[k][0]: k for k in range(len(by_index))}
    rows = []
    with open(segments_csv, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 4:
                report_bad_row(fn, bad, BadRow(segments_csv, line, row[0], "malformed",
                                        f"must have 4 fields YTID,start,end,\"labels\", got {row}"))
                continue
            ytid, start_text, end_text, mids = (v.strip() for v in row)
            try:
                start, end = int(_number("start", start_text)), int(_number("end", end_text))
            except ValueError as err:
                report_bad_row(fn, bad, BadRow(segments_csv, line, ytid, "malformed", str(err)))
                continue
            unknown = [m for m in mids.split(",") if m not in mid_index]
            if unknown or not mids:
                report_bad_row(fn, bad, BadRow(segments_csv, line, ytid, "unknown label",
                                        f"labels must be mids listed in {class_labels_csv}, got {unknown or mids!r}"))
                continue
            names = [f"{ytid}_{start:06d}", f"{ytid}_{start:06d}_{end:06d}",
                     f"{ytid}_{start_text}_{end_text}", f"{ytid}_{start_text}", ytid]
            labels = tuple(mid_index[m] for m in mids.split(","))
            rows.append((names + [f"{ytid[:2]}/{n}" for n in names], {"labels": labels}, (segments_csv, line)))
    if not rows and not bad:
        raise ValueError(f"{fn}: segments_csv must hold rows YTID,start,end,\"labels\", got none in {segments_csv!r}")
    return Manifest(clips=_place(fn, rows, clips_root, extensions, missing), classes=classes, root=clips_root)


def read_manifest(path, *, clips_root=None, missing: str = "error", bad: list[BadRow] | None = None) -> Manifest:
    """Read ``path`` by what it holds: a folder (``read_folder``), an avfast manifest
    (``Manifest.load``), AVE annotations (``read_ave``), AudioSet segments with
    class_labels_indices.csv beside them (``read_audioset``) or VGGSound's CSV
    (``read_vggsound``). ``clips_root`` (default: the file's folder) is where the readers of
    dataset files look for clips; ``missing`` and ``bad`` as for them."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_folder(path)
    path = _check_file("read_manifest", "path", path)
    root = os.path.dirname(os.path.abspath(path)) if clips_root is None else os.fspath(clips_root)
    with open(path, encoding="utf-8") as f:
        first = next((line.strip() for line in f if line.strip()), "")
    if first == MAGIC:
        return Manifest.load(path, bad=bad)
    if first.count("&") == 4:
        return read_ave(path, root, missing=missing, bad=bad)
    if first.startswith("#"):
        labels = Path(path).with_name("class_labels_indices.csv")
        if not labels.is_file():
            raise ValueError(f"read_manifest: AudioSet segments need {labels} beside them; "
                             f"call read_audioset(segments_csv, class_labels_csv, clips_root) instead")
        return read_audioset(path, labels, root, missing=missing, bad=bad)
    fields = next(csv.reader([first], skipinitialspace=True))
    if len(fields) == 4:
        return read_vggsound(path, root, missing=missing, bad=bad)
    raise ValueError(f"read_manifest: path must be a folder, an avfast manifest, AVE annotations, "
                     f"AudioSet segments or VGGSound's CSV, got {path!r} starting with {first[:80]!r}")


# ---------------------------------------------------------------- checks

def _escapes(p: str) -> bool:
    """A relative path that leaves its root once normalised ('../x', 'a/../../x')."""
    if os.path.isabs(p):
        return False
    norm = os.path.normpath(p)
    return norm == os.pardir or norm.startswith(os.pardir + os.sep)


def check_clips(manifest: Manifest, bad: list[BadRow] | None = None) -> Manifest:
    """The usable clips of ``manifest``. Bad rows: a relative ``path`` or ``audio_path``
    that leaves the root once normalised ('escapes root'; absolute paths are taken as
    written, as ``prepare`` writes them), the same (file, start, end) listed again
    ('duplicate id', the first one is kept) and a file that does not exist ('missing
    file'). They are appended to ``bad`` and left out, or, with ``bad=None``, raised
    together as one ValueError (count and the first few)."""
    found: list[BadRow] = []
    seen: dict[tuple, Clip] = {}
    clips = []
    for clip in manifest.clips:
        files = [clip.path] + ([clip.audio_path] if clip.audio_path else [])
        escaping = [p for p in files if _escapes(p)]
        if escaping:
            found.append(BadRow.of(clip, "escapes root", f"{escaping[0]!r} leaves root {manifest.root!r}"))
            continue
        key = (os.path.abspath(manifest.resolve(clip.path)), clip.start, clip.end)
        if key in seen:
            first = seen[key].origin
            where = seen[key].path if first is None else f"{first[0]}:{first[1]}"
            found.append(BadRow.of(clip, "duplicate id", f"the same file, start and end as {where}"))
            continue
        seen[key] = clip
        absent = [p for p in files if not os.path.isfile(manifest.resolve(p))]
        if absent:
            found.append(BadRow.of(clip, "missing file", f"no file at {manifest.resolve(absent[0])!r}"))
            continue
        clips.append(clip)
    if found and bad is None:
        raise ValueError(f"check_clips: {len(found)} of {len(manifest)} rows cannot be used, first: "
                         + "; ".join(str(b) for b in found[:SHOW]))
    if bad is not None:
        bad.extend(found)
    return Manifest(clips=clips, classes=manifest.classes, root=manifest.root)


def align_classes(manifest: Manifest, classes: Sequence[str], bad: list[BadRow] | None = None) -> Manifest:
    """``manifest`` with its labels re-indexed to ``classes`` by name (e.g. a validation set
    read on its own, whose class list may miss some of the training set's). A clip with a
    class that ``classes`` does not list is an 'unknown label' row: appended to ``bad`` and
    left out, or raised (with ``bad=None``)."""
    classes = list(classes)
    if manifest.classes == classes:
        return manifest
    index = {name: k for k, name in enumerate(classes)}
    old_bg, new_bg = len(manifest.classes), len(classes)
    clips = []
    for clip in manifest.clips:
        names = [manifest.classes[k] for k in clip.labels]
        segments = [k for k in clip.segment_labels or () if k != old_bg]
        unknown = sorted({n for n in names + [manifest.classes[k] for k in segments] if n not in index})
        if unknown:
            report_bad_row("align_classes", bad, BadRow.of(clip, "unknown label", f"classes {unknown} are not among "
                                                    f"the {len(classes)} expected ({classes[:SHOW]}...)"))
            continue
        seg = None if clip.segment_labels is None else tuple(
            new_bg if k == old_bg else index[manifest.classes[k]] for k in clip.segment_labels)
        clips.append(dataclasses.replace(clip, labels=tuple(index[n] for n in names), segment_labels=seg))
    return Manifest(clips=clips, classes=classes, root=manifest.root)
