"""avfast.data.manifest: Clip checks, the CSV round trip, and the dataset readers on
hand-written fixture files (the readers only look for files, so empty files stand in for clips)."""

from pathlib import Path

import pytest

from avfast.data.manifest import (AVE_CATEGORIES, MAGIC, BadRow, Clip, Manifest, align_classes, check_clips,
                                  read_audioset, read_ave, read_folder, read_manifest, read_vggsound)


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


# ------------------------------------------------------------------ Clip / Manifest

def test_clip_normalises_sequences_and_rejects_bad_fields():
    clip = Clip(path="a.mp4", labels=[3, 1], segment_labels=[0] * 10)
    assert clip.labels == (3, 1) and clip.segment_labels == (0,) * 10
    with pytest.raises(ValueError, match="path must be a non-empty string, got ''"):
        Clip(path="", labels=(0,))
    with pytest.raises(ValueError, match="labels must be a sequence of integers >= 0, got \\(-1,\\)"):
        Clip(path="a", labels=(-1,))
    with pytest.raises(ValueError, match="labels must be .*got \\('1',\\)"):
        Clip(path="a", labels=("1",))
    with pytest.raises(ValueError, match="segment_labels must be a non-empty sequence.*got \\(\\)"):
        Clip(path="a", labels=(0,), segment_labels=())
    with pytest.raises(ValueError, match="end must be None or > start=2.0 s, got 1.0"):
        Clip(path="a", labels=(0,), start=2.0, end=1.0)
    with pytest.raises(ValueError, match="start must be a finite number >= 0 s, got -1"):
        Clip(path="a", labels=(0,), start=-1)
    with pytest.raises(ValueError, match="num_frames must be None or an integer >= 0, got 2.5"):
        Clip(path="a", labels=(0,), num_frames=2.5)


def test_manifest_checks_labels_against_classes():
    with pytest.raises(ValueError, match="labels must be < len\\(classes\\)=2, got \\(2,\\)"):
        Manifest(clips=[Clip("a", (2,))], classes=["x", "y"])
    with pytest.raises(ValueError, match="segment_labels must be <= len\\(classes\\)=2"):
        Manifest(clips=[Clip("a", (0,), segment_labels=(3,))], classes=["x", "y"])
    Manifest(clips=[Clip("a", (0,), segment_labels=(2, 0))], classes=["x", "y"])  # 2 = background


def test_manifest_save_load_round_trips_exactly(tmp_path):
    clips = [
        Clip("class a/clip, 1.mp4", (0,), 0.1 + 0.2, 10.0 / 3, "audio/x.flac", (0, 2, 2), 29.97002997002997,
             300, 9.999937500000001, 16000, 640, 360),
        Clip("/abs/path/\"quoted\".mkv", (1, 0), end=4.0),
        Clip("ü/ñ.webm", ()),
    ]
    m = Manifest(clips=clips, classes=["Male speech, man speaking", 'say "hi"'], root="/data/root, x")
    m.save(tmp_path / "m.csv")
    loaded = Manifest.load(tmp_path / "m.csv")
    assert loaded == m
    assert loaded.clips[0].start == 0.1 + 0.2 and loaded.clips[1].segment_labels is None
    assert len(loaded) == 3 and loaded[2].labels == ()
    assert [p.name for p in tmp_path.iterdir()] == ["m.csv"]  # no temporary file left


def test_manifest_load_rejects_other_files(tmp_path):
    (tmp_path / "x.csv").write_text("path,labels\na.mp4,0\n")
    with pytest.raises(ValueError, match="must start with '# avfast manifest v1'"):
        Manifest.load(tmp_path / "x.csv")


def test_resolve_joins_relative_paths_only():
    m = Manifest(clips=[], classes=[], root="/data")
    assert m.resolve("a/b.mp4") == "/data/a/b.mp4"
    assert m.resolve("/x/b.mp4") == "/x/b.mp4"
    assert Manifest(clips=[], classes=[]).resolve("a.mp4") == "a.mp4"


# ------------------------------------------------------------------ read_folder

def test_read_folder_sorted_classes_and_reported_strays(tmp_path):
    touch(tmp_path, "dog/b.mp4", "dog/a.MKV", "cat/x/c.webm", "cat/notes.txt", "loose.mp4", ".hidden/z.mp4",
          "cat/.part.mp4")
    with pytest.warns(UserWarning, match="left out 2 files.*cat/notes.txt.*loose.mp4"):
        m = read_folder(tmp_path)
    assert m.classes == ["cat", "dog"] and m.root == str(tmp_path)
    assert [(c.path, c.labels) for c in m.clips] == [("cat/x/c.webm", (0,)), ("dog/a.MKV", (1,)), ("dog/b.mp4", (1,))]


def test_read_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="root must be an existing folder, got .*nope"):
        read_folder(tmp_path / "nope")
    touch(tmp_path, "a.mp4")
    with pytest.raises(ValueError, match="root must hold clips in class sub-folders.*got none"):
        read_folder(tmp_path)
    with pytest.raises(ValueError, match="extensions must be a non-empty sequence like.*got 'mp4'"):
        read_folder(tmp_path, extensions="mp4")


# ------------------------------------------------------------------ VGGSound

VGGSOUND_CSV = """\
---g-f_I2yQ,1,people marching,test
--0PQM4-hqg,30,waterfall burbling,train
--56QUhyDQM,185,"playing tambourine, hand",train
--5OkAjCI7g,40,waterfall burbling,train
--8puiAGLhs,30,people marching,test
"""


@pytest.fixture
def vggsound(tmp_path):
    clips = tmp_path / "clips"
    touch(clips, "---g-f_I2yQ_000001.mp4",                                  # {yid}_{start:06d}
          "--0PQM4-hqg_000030_000040.mp4",                                  # with the end
          "playing_tambourine__hand/--56QUhyDQM_000185_000195.mkv",         # in the label folder
          "--5OkAjCI7g_000040.mp4")
    (tmp_path / "vggsound.csv").write_text(VGGSOUND_CSV)
    return tmp_path / "vggsound.csv", clips


def test_read_vggsound_finds_each_naming_and_keeps_class_indices_across_splits(vggsound):
    csv_path, clips = vggsound
    with pytest.raises(FileNotFoundError, match="1 of 5 clips have no file.*--8puiAGLhs_000030.mp4.*missing='skip'"):
        read_vggsound(csv_path, clips)
    with pytest.warns(UserWarning, match="left out 1 of 5 clips.*--8puiAGLhs_000030.mp4"):
        m = read_vggsound(csv_path, clips, missing="skip")
    assert m.classes == ["people marching", "playing tambourine, hand", "waterfall burbling"]
    assert [(c.path, c.labels, c.start, c.end) for c in m.clips] == [
        ("---g-f_I2yQ_000001.mp4", (0,), 0.0, None),
        ("--0PQM4-hqg_000030_000040.mp4", (2,), 0.0, None),
        ("playing_tambourine__hand/--56QUhyDQM_000185_000195.mkv", (1,), 0.0, None),
        ("--5OkAjCI7g_000040.mp4", (2,), 0.0, None)]
    train = read_vggsound(csv_path, clips, split="train")
    assert train.classes == m.classes and [c.labels for c in train.clips] == [(2,), (1,), (2,)]
    kept = read_vggsound(csv_path, clips, split="test", missing="keep")
    assert [c.path for c in kept.clips] == ["---g-f_I2yQ_000001.mp4", "--8puiAGLhs_000030.mp4"]


def test_read_vggsound_errors(vggsound, tmp_path):
    csv_path, clips = vggsound
    with pytest.raises(ValueError, match="split must be one of \\['test', 'train'\\] \\(or None\\), got 'val'"):
        read_vggsound(csv_path, clips, split="val")
    with pytest.raises(ValueError, match="missing must be one of \\('error', 'skip', 'keep'\\), got 'drop'"):
        read_vggsound(csv_path, clips, missing="drop")
    (tmp_path / "bad.csv").write_text("abc,30,label\n")
    with pytest.raises(ValueError, match="bad.csv:1: malformed: abc \\(must have 4 fields youtube_id,start_s,label,split"):
        read_vggsound(tmp_path / "bad.csv", clips)
    (tmp_path / "bad.csv").write_text("abc,thirty,label,train\n")
    with pytest.raises(ValueError, match="bad.csv:1: malformed: abc \\(start_s must be a number >= 0, got 'thirty'"):
        read_vggsound(tmp_path / "bad.csv", clips)


# ------------------------------------------------------------------ AVE

AVE_ANNOTATIONS = """\
Category&VideoID&Quality&StartTime&EndTime
Church bell&RUhOCu3LNXM&good&0&10
Male speech, man speaking&MwPBWe3CI_s&good&2&7
Rodents, rats, mice&VSzrr6Ok1fo&good&9&10
"""


def test_read_ave_segment_labels_and_the_28_classes(tmp_path):
    touch(tmp_path / "AVE", "RUhOCu3LNXM.mp4", "MwPBWe3CI_s.mp4", "VSzrr6Ok1fo.mp4")
    (tmp_path / "Annotations.txt").write_text(AVE_ANNOTATIONS)
    m = read_ave(tmp_path / "Annotations.txt", tmp_path / "AVE")
    assert m.classes == sorted(AVE_CATEGORIES) and len(m.classes) == 28
    bell, speech, rodents = (m.classes.index(n) for n in ("Church bell", "Male speech, man speaking",
                                                           "Rodents, rats, mice"))
    bg = 28
    assert [(c.path, c.labels) for c in m.clips] == [
        ("RUhOCu3LNXM.mp4", (bell,)), ("MwPBWe3CI_s.mp4", (speech,)), ("VSzrr6Ok1fo.mp4", (rodents,))]
    assert m.clips[0].segment_labels == (bell,) * 10
    assert m.clips[1].segment_labels == (bg, bg, speech, speech, speech, speech, speech, bg, bg, bg)
    assert m.clips[2].segment_labels == (bg,) * 9 + (rodents,)
    # a split file without the header gives the same class indices
    (tmp_path / "testSet.txt").write_text("Male speech, man speaking&MwPBWe3CI_s&good&2&7\n")
    split = read_ave(tmp_path / "testSet.txt", tmp_path / "AVE")
    assert split.classes == m.classes and split.clips == [m.clips[1]]


def test_read_ave_other_categories_and_errors(tmp_path):
    touch(tmp_path, "a.mkv", "b.mkv")
    (tmp_path / "ann.txt").write_text("Zebra&a&good&0&3\nAardvark&b&good&1&2\n")
    m = read_ave(tmp_path / "ann.txt", tmp_path)
    assert m.classes == ["Aardvark", "Zebra"] and m.clips[0].segment_labels == (1, 1, 1) + (2,) * 7
    (tmp_path / "bad.txt").write_text("Zebra&a&good&5&3\n")
    with pytest.raises(ValueError, match="bad.txt:1: malformed: .*StartTime < EndTime <= 10 required, got 5, 3"):
        read_ave(tmp_path / "bad.txt", tmp_path)
    (tmp_path / "bad.txt").write_text("Zebra,a,good,0,3\n")
    with pytest.raises(ValueError, match="bad.txt:1: malformed: .*must be Category&VideoID&Quality&StartTime&EndTime"):
        read_ave(tmp_path / "bad.txt", tmp_path)
    (tmp_path / "ann.txt").write_text("Zebra&a&good&0&3\nZebra&missing&good&0&3\n")
    with pytest.raises(FileNotFoundError, match="1 of 2 clips have no file.*missing.mp4"):
        read_ave(tmp_path / "ann.txt", tmp_path)


# ------------------------------------------------------------------ AudioSet

AUDIOSET_SEGMENTS = """\
# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=5
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
--ZhevVpy1s, 50.000, 60.000, "/m/012xff"
-0RWZT-miFs, 420.000, 430.000, "/m/09x0r,/m/012xff,/t/dd00088"
"""
CLASS_LABELS = """\
index,mid,display_name
0,/m/09x0r,"Speech"
1,/t/dd00088,"Male speech, man speaking"
2,/m/012xff,"Toothbrush"
"""


@pytest.fixture
def audioset(tmp_path):
    clips = tmp_path / "clips"
    touch(clips, "--/--PJHxphWEs_000030.mp4", "--ZhevVpy1s_50.000_60.000.mkv", "-0/-0RWZT-miFs_000420_000430.mp4")
    (tmp_path / "balanced_train_segments.csv").write_text(AUDIOSET_SEGMENTS)
    (tmp_path / "class_labels_indices.csv").write_text(CLASS_LABELS)
    return tmp_path / "balanced_train_segments.csv", tmp_path / "class_labels_indices.csv", clips


def test_read_audioset_multi_labels_and_file_layouts(audioset):
    segments, labels, clips = audioset
    m = read_audioset(segments, labels, clips)
    assert m.classes == ["Speech", "Male speech, man speaking", "Toothbrush"]
    assert [(c.path, c.labels) for c in m.clips] == [
        ("--/--PJHxphWEs_000030.mp4", (0, 1)), ("--ZhevVpy1s_50.000_60.000.mkv", (2,)),
        ("-0/-0RWZT-miFs_000420_000430.mp4", (0, 2, 1))]


def test_read_audioset_errors(audioset, tmp_path):
    segments, labels, clips = audioset
    segments.write_text(AUDIOSET_SEGMENTS + 'abc, 0.000, 10.000, "/m/nope"\n')
    with pytest.raises(ValueError, match="segments.csv:7: unknown label: .*labels must be mids listed in .*got \\['/m/nope'\\]"):
        read_audioset(segments, labels, clips)
    (tmp_path / "labels2.csv").write_text("mid,name\n")
    with pytest.raises(ValueError, match="class_labels_csv must have the header index,mid,display_name"):
        read_audioset(segments, tmp_path / "labels2.csv", clips)


# ------------------------------------------------------------------ read_manifest

def test_read_manifest_dispatches_on_content(tmp_path, vggsound, audioset):
    csv_path, clips = vggsound
    assert read_manifest(csv_path, clips_root=clips, missing="keep") == read_vggsound(csv_path, clips, missing="keep")
    segments, labels, as_clips = audioset
    assert read_manifest(segments, clips_root=as_clips) == read_audioset(segments, labels, as_clips)
    touch(tmp_path / "ave", "RUhOCu3LNXM.mp4", "MwPBWe3CI_s.mp4", "VSzrr6Ok1fo.mp4")
    (tmp_path / "ave" / "Annotations.txt").write_text(AVE_ANNOTATIONS)
    ave = read_manifest(tmp_path / "ave" / "Annotations.txt")  # clips beside the file by default
    assert ave == read_ave(tmp_path / "ave" / "Annotations.txt", tmp_path / "ave")
    ave.save(tmp_path / "saved.csv")
    assert read_manifest(tmp_path / "saved.csv") == ave
    touch(tmp_path / "tree", "a/x.mp4", "b/y.mp4")
    assert read_manifest(tmp_path / "tree") == read_folder(tmp_path / "tree")
    (tmp_path / "other.txt").write_text("hello world\n")
    with pytest.raises(ValueError, match="path must be a folder, an avfast manifest.*other.txt.*'hello world'"):
        read_manifest(tmp_path / "other.txt")
    with pytest.raises(FileNotFoundError, match="path must be an existing file"):
        read_manifest(tmp_path / "nope.csv")


# ------------------------------------------------------------------ bad rows

GOOD_ROWS = ["a/1.mkv,0,0.0,,,,,,,,,", "b/2.mkv,1,0.0,,,,,,,,,", "a/3.mkv,0,0.0,,,,,,,,,"]
BAD_ROWS = {  # kind: (row written after the good ones, reason)
    "missing file": ("a/absent.mkv,0,0.0,,,,,,,,,", "missing file"),
    "unknown label": ("a/1.mkv,7,0.0,4.0,,,,,,,,", "unknown label"),
    "duplicate id": ("b/2.mkv,1,0.0,,,,,,,,,", "duplicate id"),
    "escaping path": ("../../etc/passwd,0,0.0,,,,,,,,,", "escapes root"),
    "path normalising outside": ("a/../../outside.mkv,0,0.0,,,,,,,,,", "escapes root"),
    "audio path escaping": ("a/1.mkv,0,1.0,,../../x.flac,,,,,,,", "escapes root"),
    "too few fields": ("a/1.mkv,0", "malformed"),
    "not a number": ("a/1.mkv,zero,0.0,,,,,,,,,", "malformed"),
}


def bad_manifest(tmp_path: Path, kind: str) -> tuple[Path, int]:
    """A manifest of three good rows (files under tmp/clips) and the ``kind`` bad row at
    line 7 (after the magic, root, classes and header lines and one good row), returned
    with that line number."""
    touch(tmp_path / "clips", "a/1.mkv", "b/2.mkv", "a/3.mkv")
    (tmp_path / "outside.mkv").write_bytes(b"")
    rows = GOOD_ROWS[:2] + [BAD_ROWS[kind][0]] + GOOD_ROWS[2:]
    path = tmp_path / "manifest.csv"
    path.write_text(f'{MAGIC}\n# root: "{tmp_path / "clips"}"\n# classes: ["a", "b"]\n'
                    "path,labels,start,end,audio_path,segment_labels,fps,num_frames,duration,sample_rate,"
                    "width,height\n" + "\n".join(rows) + "\n")
    return path, 7


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_manifest_row_is_reported_with_its_file_and_row_and_the_good_rows_kept(tmp_path, kind):
    path, line = bad_manifest(tmp_path, kind)
    bad = []
    m = check_clips(read_manifest(path, bad=bad), bad)
    assert [c.path for c in m.clips] == ["a/1.mkv", "b/2.mkv", "a/3.mkv"]
    assert [c.origin for c in m.clips] == [(str(path), 5), (str(path), 6), (str(path), 8)]
    assert len(bad) == 1 and (bad[0].file, bad[0].row, bad[0].reason) == (str(path), line, BAD_ROWS[kind][1])
    assert str(bad[0]).startswith(f"{path}:{line}: {BAD_ROWS[kind][1]}: ")
    with pytest.raises(ValueError, match=f"{path}:{line}: {BAD_ROWS[kind][1]}: "):  # strict without a list
        check_clips(read_manifest(path))


def test_blank_lines_are_not_rows(tmp_path):
    path, _ = bad_manifest(tmp_path, "duplicate id")
    path.write_text(path.read_text().replace("\na/3.mkv", "\n\na/3.mkv") + "\n")
    bad = []
    m = Manifest.load(path, bad=bad)
    assert [c.origin[1] for c in m.clips] == [5, 6, 7, 9] and bad == []


def test_bad_row_details_name_the_cause(tmp_path):
    details = {}
    for kind in ("missing file", "duplicate id", "path normalising outside", "unknown label"):
        bad = []
        check_clips(Manifest.load(bad_manifest(tmp_path, kind)[0], bad=bad), bad)
        details[kind] = bad[0].detail
    assert details["missing file"] == f"no file at {str(tmp_path / 'clips' / 'a/absent.mkv')!r}"
    assert details["duplicate id"] == f"the same file, start and end as {tmp_path / 'manifest.csv'}:6"
    assert details["path normalising outside"] == f"'a/../../outside.mkv' leaves root {str(tmp_path / 'clips')!r}"
    assert details["unknown label"] == "labels must be < len(classes)=2, got (7,)"


def test_check_clips_keeps_absolute_paths_and_reports_every_bad_row(tmp_path):
    touch(tmp_path, "in/x.mkv", "elsewhere/y.mkv")
    clips = [Clip(str(tmp_path / "elsewhere/y.mkv"), (0,)), Clip("x.mkv", (0,)), Clip("x.mkv", (0,), start=1.0),
             Clip("./x.mkv", (0,)), Clip("nope.mkv", (0,)), Clip("../elsewhere/y.mkv", (0,))]
    bad = []
    kept = check_clips(Manifest(clips, ["c"], root=str(tmp_path / "in")), bad)
    assert kept.clips == clips[:3]  # absolute paths as written; another start is another clip
    assert [(b.file, b.row, b.reason) for b in bad] == [
        ("./x.mkv", None, "duplicate id"), ("nope.mkv", None, "missing file"), ("../elsewhere/y.mkv", None, "escapes root")]
    with pytest.raises(ValueError, match="check_clips: 3 of 6 rows cannot be used, first: ./x.mkv: duplicate id"):
        check_clips(Manifest(clips, ["c"], root=str(tmp_path / "in")))
    with pytest.raises(ValueError, match="BadRow: reason must be one of .*got 'odd'"):
        BadRow("f", 1, "p", "odd")


def test_dataset_readers_report_bad_rows_with_their_line(vggsound, audioset, tmp_path):
    csv_path, clips = vggsound
    text = Path(csv_path).read_text().splitlines()
    first = text[0]
    (tmp_path / "dup.csv").write_text("\n".join([first, "abc,30,label", first, "xyz,ten,label,train"]) + "\n")
    bad = []
    m = check_clips(read_vggsound(tmp_path / "dup.csv", clips, missing="keep", bad=bad), bad)
    assert len(m) == 1 and m.clips[0].origin == (str(tmp_path / "dup.csv"), 1)
    assert [(b.row, b.reason) for b in bad] == [(2, "malformed"), (4, "malformed"), (3, "duplicate id")]
    segments, labels, root = audioset
    lines = Path(segments).read_text().splitlines()
    bad = []
    m = read_audioset(segments, labels, root, bad=bad, missing="keep")
    assert bad == [] and len(m)
    Path(segments).write_text("\n".join(lines + ['zzz, 0.0, 10.0, "/m/nope"']) + "\n")
    read_audioset(segments, labels, root, bad=bad, missing="keep")
    assert [(b.row, b.reason, b.path) for b in bad] == [(len(lines) + 1, "unknown label", "zzz")]
    Path(segments).write_text("\n".join(lines) + "\n")


def test_align_classes_reindexes_by_name_and_reports_unknown_classes(tmp_path):
    train = Manifest([Clip("x", (0,)), Clip("y", (2,))], ["cat", "dog", "owl"])
    val = Manifest([Clip("a", (0,), segment_labels=(0, 3)), Clip("b", (1,)), Clip("c", (2,))],
                   ["dog", "owl", "yak"])  # no cat, and a yak
    bad = []
    out = align_classes(val, train.classes, bad)
    assert out.classes == train.classes
    assert [(c.path, c.labels, c.segment_labels) for c in out.clips] == [("a", (1,), (1, 3)), ("b", (2,), None)]
    assert [(b.path, b.reason) for b in bad] == [("c", "unknown label")]
    assert "classes ['yak'] are not among the 3 expected" in bad[0].detail
    with pytest.raises(ValueError, match="align_classes: c: unknown label"):
        align_classes(val, train.classes)
    assert align_classes(train, train.classes) is train
