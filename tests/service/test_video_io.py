"""PyAV video I/O: round trips, odd sizes, rotation metadata, and every kind of bad file."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from service.video_io import VideoError, VideoWriter, apply_rotation, normalize_rotation, probe_video, read_frames


def smooth_frames(n: int, h: int, w: int) -> list[np.ndarray]:
    """Frames with a bright top-left block and a moving gradient (survive 4:2:0 coding well)."""
    ys, xs = np.mgrid[0:h, 0:w]
    out = []
    for t in range(n):
        f = np.stack([(xs * 255 // max(w - 1, 1) + 10 * t) % 256, ys * 255 // max(h - 1, 1),
                      np.full_like(xs, 60)], axis=-1).astype(np.uint8)
        f[: h // 4, : w // 4] = 250
        out.append(f)
    return out


def write(path: Path, frames: list[np.ndarray], **kw) -> Path:
    h, w = frames[0].shape[:2]
    with VideoWriter(path, 10.0, w, h, crf=kw.pop("crf", 12), **kw) as writer:
        for f in frames:
            writer.write(f)
    return path


def test_round_trip(tmp_path: Path) -> None:
    frames = smooth_frames(7, 64, 128)
    path = write(tmp_path / "a.mp4", frames)
    info = probe_video(path)
    assert (info.width, info.height, info.frames, info.rotation, info.codec) == (128, 64, 7, 0, "h264")
    assert info.fps == pytest.approx(10.0) and info.duration_s == pytest.approx(0.7, abs=0.05)
    got = list(read_frames(path))
    assert len(got) == 7 and all(g.shape == (64, 128, 3) and g.dtype == np.uint8 for g in got)
    assert np.abs(got[3].astype(int) - frames[3]).mean() < 4
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]  # no temp file left behind
    assert len(list(read_frames(path, max_frames=3))) == 3
    strided = list(read_frames(path, stride=3))  # frames 0, 3, 6
    assert len(strided) == 3 and np.abs(strided[1].astype(int) - frames[3]).mean() < 4


def test_odd_sizes_are_padded_to_even(tmp_path: Path) -> None:
    frames = smooth_frames(3, 33, 65)
    path = write(tmp_path / "odd.mp4", frames)
    got = list(read_frames(path))
    assert got[0].shape == (34, 66, 3)
    assert np.abs(got[0][:33, :65].astype(int) - frames[0]).mean() < 4


def test_odd_sized_videos_decode(tmp_path: Path) -> None:
    path = tmp_path / "odd.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=10)
        s.width, s.height, s.pix_fmt = 65, 33, "yuv444p"
        for f in smooth_frames(2, 33, 65):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    assert probe_video(path).width == 65
    assert [f.shape for f in read_frames(path)] == [(33, 65, 3)] * 2


@pytest.mark.parametrize("rotation, k", [(-90, -1), (90, 1), (180, 2)])
def test_rotation_metadata_is_applied(tmp_path: Path, rotation: int, k: int) -> None:
    frames = smooth_frames(2, 32, 64)
    path = write(tmp_path / "rot.mp4", frames, rotation=rotation)
    info = probe_video(path)
    assert info.rotation == normalize_rotation(rotation)
    expected = np.rot90(frames[0], k)
    assert (info.height, info.width) == expected.shape[:2]
    got = next(read_frames(path))
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected).mean() < 4


def test_rotation_helpers() -> None:
    a = np.arange(6).reshape(2, 3)
    assert normalize_rotation(-90) == 270 and normalize_rotation(-180.0) == 180 and normalize_rotation(None) == 0
    np.testing.assert_array_equal(apply_rotation(a, 90), np.rot90(a))
    np.testing.assert_array_equal(apply_rotation(a, -90), np.rot90(a, -1))
    assert apply_rotation(a, 0) is a


def test_truncated_mp4_fails_mid_stream(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (64, 128, 3), dtype=np.uint8) for _ in range(20)]  # incompressible
    data = write(tmp_path / "full.mp4", frames, crf=23).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # moov is at the front (faststart), so it still opens
    assert probe_video(cut).frames == 20
    got = []
    with pytest.raises(VideoError, match="cut.mp4: corrupt, truncated or unsupported video .* after"):
        for f in read_frames(cut):
            got.append(f)
    assert 0 < len(got) < 20


def test_silently_truncated_webm_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "clip.webm"
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx-vp9", rate=10)
        s.width, s.height, s.pix_fmt = 128, 64, "yuv420p"
        s.options = {"deadline": "realtime", "cpu-used": "8"}
        for _ in range(20):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8))):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    assert len(list(read_frames(path))) == 20
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="truncated video: about 20 frames expected"):
        list(read_frames(path))


def test_silently_truncated_avi_is_detected_by_its_frame_count(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    rng = np.random.default_rng(2)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 128, 64, "yuv420p"
        for _ in range(20):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8))):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.8)])  # the AVI demuxer just stops early
    with pytest.raises(VideoError, match="the container declares 20 frames but only 1?[0-9] are present"):
        list(read_frames(path))


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (np.random.default_rng(0).bytes(50_000), "corrupt, truncated or unsupported"),
    (b"hello, this is not a video\n" * 10, "corrupt, truncated or unsupported"),
])
def test_bad_files_raise_video_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match=message):
        probe_video(path)
    with pytest.raises(VideoError, match=message):
        list(read_frames(path))


def test_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="video not found"):
        probe_video(tmp_path / "nope.mp4")
    path = write(tmp_path / "a.mp4", smooth_frames(2, 32, 64))
    with pytest.raises(VideoError, match="stride must be >= 1"):
        next(read_frames(path, stride=0))
    assert issubclass(VideoError, ValueError)


def test_writer_discards_output_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(target, 10, 64, 32) as writer:
            writer.write(smooth_frames(1, 32, 64)[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VideoError, match=r"expected a \(32, 64, 3\) uint8 frame"):
        with VideoWriter(target, 10, 64, 32) as writer:
            writer.write(np.zeros((32, 65, 3), np.uint8))
    with pytest.raises(VideoError, match="no frames were written"):
        with VideoWriter(target, 10, 64, 32):
            pass
    assert list(tmp_path.iterdir()) == []
