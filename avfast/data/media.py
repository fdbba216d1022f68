"""Media I/O with PyAV: probe a file, decode audio and frames, extract FLAC audio, re-encode video.

Conventions shared with the DALI path:

* Frame index i is the i-th frame in presentation order from the video stream's first frame
  (what DALI's ``fn.decoders.video(frames=...)`` returns). 8-bit 4:2:0 frames become RGB as
  DALI's decoder makes them: BT.601 matrix, limited range unless the stream says full range,
  chroma upsampled bilinearly (half-pixel centres); other pixel formats go through swscale.
* Audio is mono (mean of the channels, as DALI's ``downmix``) float32 in [-1, 1], resampled by
  libswresample when the file's rate differs; sample 0 is the stream's first decoded sample.

Every write goes to a hidden temporary file in the destination folder and is then renamed over
the destination, so a failure never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import os
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from avfast.data.manifest import atomic_output

# container formats PyAV writes, by file suffix
FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm", ".flac": "flac"}
VIDEO_CODECS = {"h264": ("libx264", (".mp4",)), "vp9": ("libvpx-vp9", (".mkv", ".webm"))}
ENCODER_OPTIONS = {
    "libx264": {"preset": "veryfast", "crf": "23"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "32", "b": "0"},
}
# a stream that ends this much before the container's declared duration is truncated
TRUNCATION_TOLERANCE_S = 0.5
TRUNCATION_TOLERANCE_FRACTION = 0.1


class MediaError(RuntimeError):
    """A file that cannot be used: ``path``, a short ``reason`` ("corrupt", "truncated",
    "no video track", "no audio track", "too short", "silent audio", "frame index out of
    range", ...) and a free-text ``detail``."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = os.fspath(path), reason, detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # keep the fields when sent between processes
        return MediaError, (self.path, self.reason, self.detail)


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What ``probe`` found. Video fields are None without a video track, audio fields None
    without an audio track. ``duration`` in s: the container's declared duration, else the
    longest stream's; ``num_frames``: the video stream's packets (one per frame)."""

    duration: float
    fps: float | None
    num_frames: int | None
    width: int | None
    height: int | None
    video_codec: str | None
    audio_codec: str | None
    sample_rate: int | None
    channels: int | None


def _check_file(fn: str, path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: path must be an existing file, got {path!r}")
    return path


@contextlib.contextmanager
def _open(path: str) -> Iterator[av.container.InputContainer]:
    """An input container; FFmpeg errors while opening or reading become MediaError("corrupt")."""
    try:
        container = av.open(path)
    except av.error.FFmpegError as err:
        raise MediaError(path, "corrupt", str(err)) from err
    try:
        yield container
    except av.error.FFmpegError as err:
        raise MediaError(path, "corrupt", str(err)) from err
    finally:
        container.close()


def _container_format(fn: str, dst, allowed: Sequence[str]) -> str:
    suffix = Path(dst).suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"{fn}: dst must end with one of {tuple(allowed)}, got {os.fspath(dst)!r}")
    return FORMATS[suffix]


def probe(path) -> MediaInfo:
    """Streams, duration, frame rate and exact frame count of ``path``.

    Reads every packet (no decoding), so it also catches files cut short: a stream that ends
    more than max(0.5 s, 10%) before the declared duration raises MediaError("truncated").
    Unreadable files raise MediaError("corrupt"); a missing file raises FileNotFoundError.
    """
    path = _check_file("probe", path)
    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        streams = [s for s in (video, audio) if s is not None]
        if not streams:
            raise MediaError(path, "no audio or video track")
        ends: dict[int, float] = {}
        frames = 0
        for packet in container.demux(streams):
            if packet.size == 0:  # end-of-stream marker
                continue
            if packet.stream is video:
                frames += 1
            if packet.pts is not None:
                end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                ends[packet.stream.index] = max(ends.get(packet.stream.index, end), end)
        declared = None if container.duration is None else container.duration / av.time_base
        measured = max(ends.values(), default=0.0)
        if declared is not None:
            tolerance = max(TRUNCATION_TOLERANCE_S, TRUNCATION_TOLERANCE_FRACTION * declared)
            for stream in streams:
                end = ends.get(stream.index, 0.0)
                if end < declared - tolerance:
                    raise MediaError(path, "truncated", f"{stream.type} stream ends at {end:.2f} s, "
                                     f"the container declares {declared:.2f} s")
        rate = None if video is None else (video.average_rate or video.guessed_rate)
        vctx = None if video is None else video.codec_context
        actx = None if audio is None else audio.codec_context
        return MediaInfo(  # read inside the block: streams are invalid once the container closes
            duration=declared if declared is not None else measured,
            fps=None if rate is None else float(rate),
            num_frames=None if video is None else frames,
            width=None if vctx is None else vctx.width,
            height=None if vctx is None else vctx.height,
            video_codec=None if vctx is None else vctx.name,
            audio_codec=None if actx is None else actx.name,
            sample_rate=None if actx is None else actx.sample_rate,
            channels=None if actx is None else actx.channels,
        )


def _check_positive_int(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")
    return int(value)


def decode_audio_channels(path: str, sample_rate: int, start: float = 0.0,
                          duration: float | None = None) -> np.ndarray:
    """Like ``decode_audio`` without the downmix and the argument checks: numpy float32
    (channels, samples)."""
    first = round(start * sample_rate)
    stop = None if duration is None else first + round(duration * sample_rate)
    chunks: list[np.ndarray] = []
    have = 0
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(path, "no audio track")
        stream = container.streams.audio[0]
        channels = stream.codec_context.channels or 1
        resampler = None
        for frame in container.decode(stream):
            if resampler is None:
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=sample_rate)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
                have += out.samples
            if stop is not None and have >= stop:
                break
        else:
            if resampler is not None:
                chunks.extend(out.to_ndarray() for out in resampler.resample(None))
    if not chunks:
        return np.zeros((channels, 0), np.float32)
    return np.concatenate(chunks, axis=1)[:, first:stop].astype(np.float32, copy=False)


def decode_audio(path, sample_rate: int = 16000, start: float = 0.0,
                 duration: float | None = None) -> torch.Tensor:
    """Mono float32 (samples,) of ``path`` at ``sample_rate``: the mean of the channels,
    samples [round(start * sample_rate), + round(duration * sample_rate)) of the resampled
    stream (``duration=None``: to the end); shorter only where the file ends. Decodes from
    the start of the file (exact positions; fine for clips, slow deep into long files)."""
    path = _check_file("decode_audio", path)
    sample_rate = _check_positive_int("decode_audio", "sample_rate", sample_rate)
    if not start >= 0:
        raise ValueError(f"decode_audio: start must be >= 0 s, got {start!r}")
    if duration is not None and not duration >= 0:
        raise ValueError(f"decode_audio: duration must be None or >= 0 s, got {duration!r}")
    return torch.from_numpy(decode_audio_channels(path, sample_rate, start, duration).mean(axis=0))


def _plane(plane, height: int, width: int) -> np.ndarray:
    """uint8 (height, width) view of one picture plane (without the line padding)."""
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:height, :width]


def frame_to_rgb(frame: av.VideoFrame) -> torch.Tensor:
    """uint8 (H, W, 3) RGB of a decoded frame, converted as DALI's decoder does (module doc)."""
    name = frame.format.name
    if name not in ("yuv420p", "yuvj420p"):
        return torch.from_numpy(frame.to_ndarray(format="rgb24"))
    h, w = frame.height, frame.width
    ch, cw = (h + 1) // 2, (w + 1) // 2
    y = torch.from_numpy(_plane(frame.planes[0], h, w).astype(np.float32))
    uv = torch.from_numpy(np.stack([_plane(frame.planes[1], ch, cw), _plane(frame.planes[2], ch, cw)])
                          .astype(np.float32))
    uv = F.interpolate(uv[None], scale_factor=2, mode="bilinear", align_corners=False)[0, :, :h, :w]
    u, v = uv[0] - 128.0, uv[1] - 128.0
    if name == "yuv420p" and frame.color_range != 2:  # limited ("tv") range
        y, u, v = (y - 16.0) * (255.0 / 219.0), u * (255.0 / 224.0), v * (255.0 / 224.0)
    rgb = torch.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], dim=-1)
    return rgb.round_().clamp_(0, 255).to(torch.uint8)


def _video_index(container, stream) -> tuple[list[int], list[int]] | None:
    """Presentation timestamps of every frame (sorted) and of the key frames, from the
    packets; None when timestamps are missing or repeated (then frames are counted)."""
    pts, keys = [], []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if packet.pts is None:
            return None
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    pts.sort()
    keys.sort()
    if len(set(pts)) != len(pts) or not keys or keys[0] != pts[0]:
        return None
    return pts, keys


def _decode_by_pts(container, stream, keys: list[int], wanted: set[int]) -> dict[int, torch.Tensor]:
    """Frames at the timestamps ``wanted``, seeking to the key frame before each one that is
    not reached by decoding on. Returns what it found (a frame may be missing if the decoder
    drops it after a seek)."""
    found: dict[int, torch.Tensor] = {}
    frames = None
    last = None  # pts of the last decoded frame
    for target in sorted(wanted):
        if target in found:
            continue
        key = keys[bisect_right(keys, target) - 1]
        if frames is None or last is None or key > last:
            container.seek(key, stream=stream, backward=True)
            frames = container.decode(stream)
        for frame in frames:
            last = frame.pts
            if last in wanted and last not in found:
                found[last] = frame_to_rgb(frame)
            if last is None or last >= target:
                break
        else:
            frames = None
    return found


def _decode_by_count(container, stream, wanted: set[int]) -> dict[int, torch.Tensor]:
    """Frames at the positions ``wanted``, counting decoded frames from the start."""
    found: dict[int, torch.Tensor] = {}
    stop = max(wanted)
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            found[i] = frame_to_rgb(frame)
        if i >= stop:
            break
    return found


def decode_frames(path, indices: Sequence[int]) -> torch.Tensor:
    """uint8 RGB frames (T, H, W, 3) at ``indices`` (T of them, any order, repeats allowed):
    index i is the i-th frame in presentation order. Seeks to key frames, so short GOPs make
    it fast. An index past the last frame raises MediaError("frame index out of range")."""
    path = _check_file("decode_frames", path)
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0:
        raise ValueError(f"decode_frames: indices must be a non-empty sequence of frame indices "
                         f">= 0, got {indices[:8]}")
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(path, "no video track")
        stream = container.streams.video[0]
        index = _video_index(container, stream)
        count = None if index is None else len(index[0])
        if count is not None and max(indices) >= count:
            raise MediaError(path, "frame index out of range",
                             f"indices must be < num_frames={count}, got {max(indices)}")
        found = {}
        if index is not None:
            pts, keys = index
            by_pts = _decode_by_pts(container, stream, keys, {pts[i] for i in indices})
            found = {i: by_pts[pts[i]] for i in set(indices) if pts[i] in by_pts}
        if len(found) < len(set(indices)):  # no usable timestamps, or a seek lost frames
            container.seek(0)
            found = _decode_by_count(container, stream, set(indices))
        missing = sorted(set(indices) - set(found))
        if missing:
            raise MediaError(path, "frame index out of range",
                             f"the file decodes to fewer frames than index {missing[0]} needs")
    return torch.stack([found[i] for i in indices])


def write_flac(dst, wave: np.ndarray, sample_rate: int) -> None:
    """Write ``wave`` float (channels, samples) in [-1, 1] as 16-bit FLAC (rounded, clipped)."""
    channels = wave.shape[0]
    pcm = np.clip(np.round(wave * 32768.0), -32768, 32767).astype(np.int16)
    layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")
    chunk = 4608
    with atomic_output(dst) as tmp, av.open(tmp, "w", format="flac") as out:
        stream = out.add_stream("flac", rate=sample_rate)
        stream.layout = layout
        stream.format = "s16"
        time_base = fractions.Fraction(1, sample_rate)
        for offset in range(0, pcm.shape[1], chunk):
            block = np.ascontiguousarray(pcm[:, offset:offset + chunk].T).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = sample_rate, offset, time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def extract_audio(src, dst_flac, sample_rate: int = 16000, mono: bool = True) -> int:
    """Decode the audio of ``src`` (resampled to ``sample_rate``; mono = mean of channels)
    and write it to ``dst_flac`` as 16-bit FLAC. Returns the number of samples written."""
    src = _check_file("extract_audio", src)
    sample_rate = _check_positive_int("extract_audio", "sample_rate", sample_rate)
    _container_format("extract_audio", dst_flac, (".flac",))
    wave = decode_audio_channels(src, sample_rate)
    if mono:
        wave = wave.mean(axis=0, keepdims=True)
    write_flac(dst_flac, wave, sample_rate)
    return wave.shape[1]


def _encode(out, stream, frame, dst) -> None:
    """Encode and mux ``frame`` (None flushes); FFmpeg errors here are about writing ``dst``,
    not about the source, so they are not turned into MediaError("corrupt")."""
    try:
        out.mux(stream.encode(frame))
    except av.error.FFmpegError as err:
        raise OSError(f"reencode_video: writing {os.fspath(dst)!r} failed: {err}") from err


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def reencode_video(src, dst, codec: str = "h264", gop: int = 16, max_height: int | None = None) -> int:
    """Re-encode the video of ``src`` into ``dst`` (no audio) with a key frame at least every
    ``gop`` frames, keeping every frame and its timestamp; frames taller than ``max_height``
    are scaled down (aspect kept, even sizes). ``codec="h264"`` needs a .mp4 ``dst``,
    ``"vp9"`` a .mkv or .webm one. Returns the number of frames written."""
    src = _check_file("reencode_video", src)
    if codec not in VIDEO_CODECS:
        raise ValueError(f"reencode_video: codec must be one of {tuple(VIDEO_CODECS)}, got {codec!r}")
    encoder, suffixes = VIDEO_CODECS[codec]
    fmt = _container_format("reencode_video", dst, suffixes)
    gop = _check_positive_int("reencode_video", "gop", gop)
    if max_height is not None:
        max_height = _check_positive_int("reencode_video", "max_height", max_height)
    count = 0
    with _open(src) as container:
        if not container.streams.video:
            raise MediaError(src, "no video track")
        source = container.streams.video[0]
        width, height = source.codec_context.width, source.codec_context.height
        if max_height is not None and height > max_height:
            width, height = width * max_height / height, max_height
        width, height = _even(width), _even(height)
        rate = source.average_rate or source.guessed_rate or fractions.Fraction(25)
        with atomic_output(dst) as tmp, av.open(tmp, "w", format=fmt) as out:
            stream = out.add_stream(encoder, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.time_base = source.time_base
            stream.codec_context.gop_size = gop
            stream.options = dict(ENCODER_OPTIONS[encoder], g=str(gop))
            for frame in container.decode(source):
                if frame.pts is None:
                    raise MediaError(src, "corrupt", f"video frame {count} has no timestamp")
                pts = frame.pts
                frame = frame.reformat(width=width, height=height, format="yuv420p")
                frame.pts, frame.time_base = pts, source.time_base
                _encode(out, stream, frame, dst)
                count += 1
            if count == 0:
                raise MediaError(src, "corrupt", "the video track has no decodable frame")
            _encode(out, stream, None, dst)
    return count
