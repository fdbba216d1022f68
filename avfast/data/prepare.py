"""``prepare``: check every clip of a dataset, extract its audio to FLAC (and optionally
re-encode its video with short GOPs), and write a manifest with the metadata loaders need.

Layout of ``dst``::

    audio/<relpath>.flac       mono 16-bit FLAC at ``sample_rate`` (relpath: the clip's path
                               relative to the source root, extension kept)
    video/<relpath>.mp4|.mkv   re-encoded video (only with ``reencode``; h264 -> .mp4, vp9 -> .mkv)
    manifest.csv               the prepared clips (avfast manifest, root = dst)
    failed.csv                 path,reason,detail of every clip that could not be prepared
    progress.jsonl             one JSON line per finished source file (ok or failed)
    settings.json              the options of the first run (a rerun must use the same)

Resumable: files already in progress.jsonl are skipped, so an interrupted run continues where
it stopped. Files are processed in parallel (one process per worker); a failing file is
recorded with its reason and never stops the run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import json
import multiprocessing
import os
import warnings
from pathlib import Path

from avfast.data import media
from avfast.data.manifest import Manifest, atomic_output, read_manifest

REENCODE = {None: None, "h264": ".mp4", "vp9": ".mkv"}
SILENCE_PEAK = 1e-4  # audio whose peak stays below this (about -80 dBFS) counts as silent


@dataclasses.dataclass
class PrepareReport:
    """``prepared``: files prepared by this run; ``skipped_done``: files a previous run had
    finished (ok or failed); ``failed``: (path, reason) of every failed file, this run's and
    earlier runs'; ``manifest_path``: dst/manifest.csv."""

    prepared: int
    skipped_done: int
    failed: list[tuple[str, str]]
    manifest_path: str

    def failures_by_reason(self) -> dict[str, int]:
        return dict(collections.Counter(reason for _, reason in self.failed).most_common())


@dataclasses.dataclass(frozen=True)
class _Job:
    source: str   # absolute path of the source file
    audio: str    # absolute FLAC destination
    video: str | None  # absolute re-encoded destination (None: keep the source)
    sample_rate: int
    reencode: str | None
    gop: int
    max_height: int | None
    min_duration: float


def _prepare_file(job: _Job) -> dict:
    """Prepare one source file; returns its progress record (never raises)."""
    record = {"path": job.source, "ok": False}
    try:
        info = media.probe(job.source)
        if info.video_codec is None:
            raise media.MediaError(job.source, "no video track")
        if info.audio_codec is None:
            raise media.MediaError(job.source, "no audio track")
        if info.duration < job.min_duration or not info.num_frames:
            raise media.MediaError(job.source, "too short", f"{info.duration:.3f} s, {info.num_frames} "
                                   f"frames; min_duration is {job.min_duration} s")
        wave = media.decode_audio_channels(job.source, job.sample_rate).mean(axis=0, keepdims=True)
        peak = float(abs(wave).max(initial=0.0))
        if peak < SILENCE_PEAK:
            raise media.MediaError(job.source, "silent audio", f"peak {peak:.2e} < {SILENCE_PEAK}")
        if job.video is not None:
            media.reencode_video(job.source, job.video, codec=job.reencode, gop=job.gop,
                                 max_height=job.max_height)
            info = media.probe(job.video)
        else:  # the source stays the video: make sure its first and last frames decode
            media.decode_frames(job.source, [0, info.num_frames - 1])
        media.write_flac(job.audio, wave, job.sample_rate)
        record.update(ok=True, fps=info.fps, num_frames=info.num_frames, width=info.width,
                      height=info.height, duration=wave.shape[1] / job.sample_rate)
    except FileNotFoundError as err:
        record.update(reason="missing file", detail=str(err))
    except media.MediaError as err:
        record.update(reason=err.reason, detail=err.detail)
    except Exception as err:  # noqa: BLE001 - any other failure is recorded, not raised
        record.update(reason="unexpected error", detail=f"{type(err).__name__}: {err}")
    return record


def _init_worker() -> None:
    """One torch thread per worker: the parallelism is across processes, and a forked child
    must not enter the OpenMP pool its parent used (it would deadlock)."""
    import torch

    torch.set_num_threads(1)


def _read_progress(path: Path) -> dict[str, dict]:
    """path -> last record of progress.jsonl; an unreadable line (a write cut off by an
    interruption) is warned about and its file is prepared again."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    bad = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            done[record["path"]] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            bad += 1
    if bad:
        warnings.warn(f"prepare: {bad} unreadable lines in {path} (an interrupted write); "
                      f"those files are prepared again", stacklevel=3)
    return done


def _check_settings(dst: Path, settings: dict) -> None:
    path = dst / "settings.json"
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        for key, value in settings.items():
            if before.get(key) != value:
                raise ValueError(f"prepare: {key} must be {before.get(key)!r} as in the run that started "
                                 f"{dst} (see {path}), got {value!r}; use a new dst to change it")
    else:
        dst.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def _check_args(sample_rate, reencode, gop, max_height, min_duration, workers) -> int:
    def positive_int(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"prepare: {name} must be a positive integer, got {value!r}")

    positive_int("sample_rate", sample_rate)
    positive_int("gop", gop)
    if max_height is not None:
        positive_int("max_height", max_height)
    if reencode not in REENCODE:
        raise ValueError(f"prepare: reencode must be one of {tuple(REENCODE)}, got {reencode!r}")
    if not (isinstance(min_duration, (int, float)) and min_duration >= 0):
        raise ValueError(f"prepare: min_duration must be a number >= 0 s, got {min_duration!r}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    positive_int("workers", workers)
    return workers


def _relpath(manifest: Manifest, clip_path: str) -> str:
    """Where a clip's outputs go under dst/audio and dst/video: its path relative to the
    manifest root (an absolute path outside the root keeps its full path, anchor dropped)."""
    source = os.path.abspath(manifest.resolve(clip_path))
    root = os.path.abspath(manifest.root) if manifest.root else os.getcwd()
    rel = os.path.relpath(source, root)
    if rel.startswith(".."):
        rel = os.path.relpath(source, Path(source).anchor)
    return rel.replace(os.sep, "/")


def _run(jobs: list[_Job], workers: int, progress: bool, log) -> int:
    """Run the jobs, passing each record to ``log`` as it finishes; returns the ok count."""
    from tqdm import tqdm

    ok = 0
    with tqdm(total=len(jobs), disable=not progress, unit="file", desc="prepare") as bar:
        if workers == 1 or len(jobs) <= 1:
            results = map(_prepare_file, jobs)
            pool = None
        else:
            # fork where available (no re-import of __main__; scripts need no main guard);
            # _init_worker keeps torch off the OpenMP pool this process may have used
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                                          mp_context=context, initializer=_init_worker)
            futures = [pool.submit(_prepare_file, job) for job in jobs]
            results = (f.result() for f in concurrent.futures.as_completed(futures))
        try:
            for record in results:
                log(record)
                ok += record["ok"]
                bar.update(1)
        except concurrent.futures.process.BrokenProcessPool as err:
            raise RuntimeError("prepare: a worker process died (a decoder crash?); the finished files "
                               "are in progress.jsonl, run prepare again to continue") from err
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return ok


def prepare(src, dst, *, sample_rate: int = 16000, reencode: str | None = None, gop: int = 16,
            max_height: int | None = None, min_duration: float = 0.5, workers: int | None = None,
            progress: bool = True, retry_failed: bool = False) -> PrepareReport:
    """Prepare the clips of ``src`` (a folder, a manifest or dataset file that ``read_manifest``
    reads, or a Manifest) into ``dst`` (layout in the module doc).

    Per source file: probe it (failures: corrupt, truncated, no video/audio track, too short
    (< ``min_duration`` s), missing file), decode its audio at ``sample_rate`` (mono; fails
    as "silent audio" when the peak is below 1e-4), check that its first and last frames
    decode, or with ``reencode`` ("h264" or "vp9") re-encode the video with a key frame every
    ``gop`` frames, at most ``max_height`` px high; then write the FLAC. The manifest keeps
    every input clip whose file succeeded, in input order, with ``audio_path`` set and
    ``fps``, ``num_frames``, ``width``, ``height`` (of the video it points at), ``duration``
    and ``sample_rate`` (of the FLAC) filled. ``workers`` processes (default: all CPUs; 1 runs
    in this process); ``retry_failed`` prepares files a previous run failed on again.
    """
    workers = _check_args(sample_rate, reencode, gop, max_height, min_duration, workers)
    if isinstance(src, Manifest):
        manifest = src
    else:
        if not os.path.exists(src):
            raise FileNotFoundError(f"prepare: src must be an existing folder or manifest file, got {os.fspath(src)!r}")
        manifest = read_manifest(src, missing="keep")
    dst = Path(dst).absolute()
    _check_settings(dst, {"sample_rate": sample_rate, "reencode": reencode, "gop": gop,
                          "max_height": max_height, "min_duration": min_duration})

    # one job per source file (several clips may cut the same file)
    targets: dict[str, tuple[str, str | None]] = {}  # source -> (audio rel, video rel)
    for clip in manifest.clips:
        source = os.path.abspath(manifest.resolve(clip.path))
        if source not in targets:
            rel = _relpath(manifest, clip.path)
            video = None if reencode is None else f"video/{rel}{REENCODE[reencode]}"
            targets[source] = (f"audio/{rel}.flac", video)
    progress_path = dst / "progress.jsonl"
    done = _read_progress(progress_path)
    if retry_failed:
        done = {k: v for k, v in done.items() if v.get("ok")}
    jobs = [_Job(source, str(dst / audio), None if video is None else str(dst / video), sample_rate,
                 reencode, gop, max_height, float(min_duration))
            for source, (audio, video) in targets.items() if source not in done]
    skipped = len(targets) - len(jobs)

    with open(progress_path, "a+", encoding="utf-8") as log_file:
        log_file.seek(0, os.SEEK_END)
        if log_file.tell():  # start on a fresh line after a write cut off mid-line
            log_file.seek(log_file.tell() - 1)
            if log_file.read(1) != "\n":
                log_file.write("\n")

        def log(record: dict) -> None:
            done[record["path"]] = record
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        prepared = _run(jobs, workers, progress, log)

    clips, failed = [], []
    reported = set()
    for clip in manifest.clips:
        source = os.path.abspath(manifest.resolve(clip.path))
        record = done[source]
        if not record["ok"]:
            if source not in reported:
                reported.add(source)
                failed.append((source, record["reason"], record.get("detail", "")))
            continue
        audio, video = targets[source]
        clips.append(dataclasses.replace(
            clip, path=video or source, audio_path=audio, fps=record["fps"],
            num_frames=record["num_frames"], width=record["width"], height=record["height"],
            duration=record["duration"], sample_rate=sample_rate))
    out = Manifest(clips=clips, classes=manifest.classes, root=str(dst))
    manifest_path = dst / "manifest.csv"
    out.save(manifest_path)
    with atomic_output(dst / "failed.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "reason", "detail"))
        writer.writerows(failed)
    return PrepareReport(prepared=prepared, skipped_done=skipped,
                         failed=[(path, reason) for path, reason, _ in failed],
                         manifest_path=str(manifest_path))

