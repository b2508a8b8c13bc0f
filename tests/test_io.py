"""Footage readers and the video writer: exact counts, frame-exact seeking, damaged files, image folders,
synchronization warnings, atomic H.264 writing, and the real recordings in ../shared/data."""
import logging, re, warnings
from fractions import Fraction
from pathlib import Path
import av
import cv2
import numpy as np
import pytest
from deeperfly_nb.core import InputError
from deeperfly_nb.io import (FrameReader, VideoReader, ImageSequenceReader, open_reader, find_source,
                             synchronized_length, VideoWriter, write_video)

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
SAMPLE, EXAMPLE = DATA / "deepfly3d_sample", DATA / "deeperfly_example"
VIEWS = ["rh", "rm", "rf", "f", "lf", "lm", "lh"]


def pattern(n, h=96, w=128, gray=False):
    "(n, h, w, 3) uint8 smooth moving test pattern (every frame different)."
    yy, xx = np.mgrid[:h, :w]
    t = np.arange(n)[:, None, None]
    rgb = np.stack([128 + 90 * np.sin(xx / 23 + t / 5 + yy / 41), 128 + 90 * np.cos(yy / 19 - t / 7),
                    128 + 60 * np.sin((xx + yy) / 29 + t / 3)], -1)
    return np.repeat(rgb[..., :1], 3, -1).astype(np.uint8) if gray else rgb.astype(np.uint8)


def to_rgb(frame):
    "Reference conversion, written independently: 4:2:0 through OpenCV, anything else through swscale."
    if frame.format.name == "yuv420p": return cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2RGB_I420)
    return frame.to_ndarray(format="rgb24")


def make_clip(path, n=60, codec="libx264", fmt="mp4", pix_fmt="yuv420p", options=None, gray=False, faststart=False):
    "Write a test clip with PyAV directly; return its frames as one sequential PyAV decode gives them."
    with av.open(str(path), "w", format=fmt, options={"movflags": "+faststart"} if faststart else {}) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt, s.options = 128, 96, pix_fmt, options or {}
        for t, img in enumerate(pattern(n)):
            f = av.VideoFrame.from_ndarray(img[..., 0] if gray else img, format="gray" if gray else "rgb24")
            f.pts = t
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    with av.open(str(path)) as c:
        return np.stack([to_rgb(f) for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    "{name: (path, reference frames)}: H.264 with keyframes every 12 frames and B-frames, open GOPs, AVI, MOV, MKV."
    d = tmp_path_factory.mktemp("clips")
    specs = {"gop12.mp4": dict(options={"g": "12", "bf": "3", "threads": "1"}),
             "opengop.mp4": dict(options={"bf": "3", "x264-params": "open-gop=1:keyint=10:min-keyint=10"}),
             "b.avi": dict(codec="mpeg4", fmt="avi", options={"g": "8", "bf": "2"}),
             "x.mov": dict(fmt="mov", options={"g": "7"}),
             "gray.mkv": dict(codec="ffv1", fmt="matroska", pix_fmt="gray", gray=True, options={"g": "5"}),
             "fast.mp4": dict(options={"g": "12", "bf": "3", "threads": "1"}, faststart=True)}
    return {name: (d / name, make_clip(d / name, **kw)) for name, kw in specs.items()}


# --- reading videos -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gop12.mp4", "opengop.mp4", "b.avi", "x.mov", "gray.mkv"])
def test_every_frame_read_alone_equals_sequential_decode(clips, name):
    path, ref = clips[name]
    r = open_reader(path)
    assert isinstance(r, VideoReader) and isinstance(r, FrameReader)
    assert (r.count(), len(r), r.frame_size, r.fps) == (60, 60, (96, 128), 25.0)
    for t in range(60):                        # each r[t] seeks on its own
        np.testing.assert_array_equal(r[t], ref[t], err_msg=f"{name} frame {t}")


@pytest.mark.parametrize("key", [slice(None, 5), slice(10, 20), slice(-5, None), slice(None, None, 7),
                                 slice(40, 10, -3), slice(55, None, 2), slice(70, 80), slice(5, 5)])
def test_slices_follow_python_semantics(clips, key):
    path, ref = clips["gop12.mp4"]
    got = VideoReader(path)[key]
    assert got.dtype == np.uint8 and got.shape == ref[key].shape
    np.testing.assert_array_equal(got, ref[key])


def test_negative_index_iteration_and_chunks(clips):
    path, ref = clips["gop12.mp4"]
    r = VideoReader(path)
    np.testing.assert_array_equal(r[-1], ref[59])
    np.testing.assert_array_equal(r[np.int32(-60)], ref[0])
    np.testing.assert_array_equal(np.stack(list(r)), ref)
    chunks = list(r.iter_chunks(16, 5, 47))
    assert [(first, len(c)) for first, c in chunks] == [(5, 16), (21, 16), (37, 10)]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), ref[5:47])
    assert [first for first, _ in r.iter_chunks(25)] == [0, 25, 50]
    assert list(r.iter_chunks(8, 30, 30)) == []
    with pytest.raises(IndexError, match="frame 60 is out of range: gop12.mp4 has 60 frames"):
        r[60]
    with pytest.raises(IndexError):
        r[-61]
    with pytest.raises(TypeError):
        r[1.5]
    with pytest.raises(InputError, match="chunk_frames must be a positive integer"):
        next(r.iter_chunks(0))


def test_slices_decode_from_the_nearest_keyframe_only(clips):
    r = VideoReader(clips["gop12.mp4"][0])           # keyframes at 0, 12, 24, 36, 48
    r.count()
    r.n_decoded = 0
    r[50]
    assert r.n_decoded <= 12, r.n_decoded          # from the keyframe at 48, not from frame 0
    r.n_decoded = 0
    r[40:44]
    assert r.n_decoded <= 16, r.n_decoded


def test_grayscale_source_gives_three_equal_channels_exactly(clips):
    r = VideoReader(clips["gray.mkv"][0])
    assert r.declared_frames is None                 # MKV has no frame count; ours comes from demuxing
    frames = r[:]
    np.testing.assert_array_equal(frames, np.repeat(pattern(60)[..., :1], 3, -1))   # FFV1 is lossless


def test_count_comes_from_demuxing_not_the_container(clips):
    r = VideoReader(clips["gray.mkv"][0])
    assert r.declared_frames is None and r.count() == 60      # MKV declares no count at all
    r = VideoReader(clips["opengop.mp4"][0])
    assert r.declared_frames == 60 and r.count() == 60 and len(list(r)) == 60


# --- bad and damaged files --------------------------------------------------------------------------------

def test_missing_unreadable_and_non_video_paths(tmp_path):
    with pytest.raises(InputError, match=r"nope\.mp4 does not exist"):
        open_reader(tmp_path / "nope.mp4")
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(InputError, match=r"cannot open .*text\.mp4 as a video"):
        open_reader(tmp_path / "text.mp4")
    (tmp_path / "empty.avi").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.avi"):
        open_reader(tmp_path / "empty.avi").count()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt is neither a video"):
        open_reader(tmp_path / "notes.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match=r"nothing holds no images"):
        open_reader(tmp_path / "nothing")
    with pytest.raises(InputError, match="is a folder, not a video"):
        VideoReader(tmp_path / "nothing")


def test_truncated_files(tmp_path, clips):
    plain, fast = clips["gop12.mp4"][0].read_bytes(), clips["fast.mp4"][0].read_bytes()
    (tmp_path / "cut_plain.mp4").write_bytes(plain[: len(plain) * 6 // 10])       # the index (moov) is lost
    with pytest.raises(InputError, match=r"cannot open .*cut_plain\.mp4 as a video"):
        VideoReader(tmp_path / "cut_plain.mp4")
    for frac in (0.3, 0.6, 0.95):                                                    # the index survives
        (tmp_path / "cut_fast.mp4").write_bytes(fast[: int(len(fast) * frac)])
        r = VideoReader(tmp_path / "cut_fast.mp4")
        with pytest.raises(InputError, match=r"cut_fast\.mp4: the container's index lists 60 frames but only \d+ could be read"):
            r.count()
        with pytest.raises(InputError, match=r"cut_fast\.mp4"):
            list(r)


def test_truncated_mkv_is_reported(tmp_path, clips):
    make_clip(tmp_path / "full.mkv", fmt="matroska", options={"g": "12"})
    data = (tmp_path / "full.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    r = VideoReader(tmp_path / "cut.mkv")
    with pytest.warns(UserWarning, match=r"cut\.mkv: the container says the video lasts 2\.400 s but its \d+ frames end at"):
        n = r.count()
    assert n < 60 and len(list(r)) == n               # count and iteration agree


def test_mid_file_decode_error_names_the_file_and_frame(tmp_path, clips):
    data = clips["gop12.mp4"][0].read_bytes()
    with av.open(str(clips["gop12.mp4"][0])) as c:
        packets = [(p.pos, p.size, p.pts) for p in c.demux(video=0) if p.size]
    order = {pts: t for t, pts in enumerate(sorted(p[2] for p in packets))}
    pos, size, pts = max(packets[20:40], key=lambda p: p[1])        # a large frame in the middle
    bad = data[:pos] + bytes(size) + data[pos + size:]               # its bytes zeroed
    (tmp_path / "zeroed.mp4").write_bytes(bad)
    r = VideoReader(tmp_path / "zeroed.mp4")
    assert r.count() == 60                                           # the container is intact
    with pytest.raises(InputError, match=r"zeroed\.mp4: .*frame (\d+) of 60") as e:
        list(r)
    t = int(re.search(r"frame (\d+) of 60", str(e.value)).group(1))
    assert t <= order[pts]                                           # no later than the damaged frame
    np.testing.assert_array_equal(r[: min(t, 12)], clips["gop12.mp4"][1][: min(t, 12)])   # frames before it still read


def test_damage_is_never_a_silent_short_read(tmp_path, clips):
    "Flip 4 bytes in the middle of each frame's data in turn: always either an InputError or all 60 frames."
    path, ref = clips["gop12.mp4"]
    data = path.read_bytes()
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    errors = 0
    for pos, size in packets[::3]:
        bad = bytearray(data)
        for q in range(pos + size // 2, pos + size // 2 + 4): bad[q] ^= 0xFF
        (tmp_path / "flipped.mp4").write_bytes(bytes(bad))
        try:
            frames = list(VideoReader(tmp_path / "flipped.mp4"))
        except InputError as e:
            assert "flipped.mp4" in str(e) and "frame" in str(e)
            errors += 1
            continue
        assert len(frames) == 60
    assert errors > len(packets[::3]) / 2                           # most damage is caught (H.264 has no checksums)


# --- image folders ----------------------------------------------------------------------------------------

@pytest.fixture
def png_folder(tmp_path):
    clip = pattern(12, 48, 64)
    for t in range(12):
        cv2.imwrite(str(tmp_path / f"camera_0_img_{t:03d}.png"), clip[t, ..., ::-1])   # zero-padded, lossless
    return tmp_path, clip


def test_image_sequence_reads_exactly_in_numeric_order(png_folder):
    folder, clip = png_folder
    r = open_reader(folder / "camera_0_img_*.png")
    assert isinstance(r, ImageSequenceReader)
    assert (r.count(), r.frame_size, r.fps, r.name, r.path) == (12, (48, 64), None, "camera_0_img_*.png", folder)
    np.testing.assert_array_equal(r[:], clip)
    np.testing.assert_array_equal(r[-2], clip[10])
    np.testing.assert_array_equal(np.concatenate([c for _, c in r.iter_chunks(5)]), clip)
    np.testing.assert_array_equal(open_reader(folder)[:], clip)            # a folder of one sequence
    # unpadded numbers sort numerically: 2 before 10
    for t in (0, 1, 2, 10, 11, 3, 4, 5, 6, 7, 8, 9):
        cv2.imwrite(str(folder / f"cam_img_{t}.png"), clip[t, ..., ::-1])
    np.testing.assert_array_equal(ImageSequenceReader(folder / "cam_img_*.png")[:], clip)


def test_image_sequence_gaps_duplicates_and_sizes(png_folder):
    folder, clip = png_folder
    (folder / "camera_0_img_004.png").unlink(); (folder / "camera_0_img_007.png").unlink()
    with pytest.raises(InputError, match=r"camera_0_img_\*\.png: frame\(s\) 4, 7 are missing \(expected every frame number from 0 to 11\)"):
        open_reader(folder / "camera_0_img_*.png")
    for t in (4, 7): cv2.imwrite(str(folder / f"camera_0_img_{t:03d}.png"), clip[t, ..., ::-1])
    cv2.imwrite(str(folder / "camera_0_img_5.png"), clip[5])
    with pytest.raises(InputError, match="are both frame 5"):
        open_reader(folder / "camera_0_img_*.png")
    (folder / "camera_0_img_5.png").unlink()
    cv2.imwrite(str(folder / "camera_0_img_012.png"), clip[0, :40, :50])
    r = open_reader(folder / "camera_0_img_*.png")
    with pytest.raises(InputError, match=r"camera_0_img_012\.png is 40x50 but camera_0_img_000\.png is 48x64"):
        r[:]
    (folder / "camera_0_img_012.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"cannot read image .*camera_0_img_012\.png"):
        open_reader(folder / "camera_0_img_*.png")[12]


def test_image_sequence_numbered_from_one(tmp_path):
    clip = pattern(3, 16, 16)
    for t in range(3): cv2.imwrite(str(tmp_path / f"img_{t + 1}.png"), clip[t, ..., ::-1])
    with pytest.raises(InputError, match=r"frame\(s\) 0 are missing"):
        ImageSequenceReader(tmp_path / "img_*.png")
    np.testing.assert_array_equal(ImageSequenceReader(tmp_path / "img_*.png", first_index=1)[:], clip)
    np.testing.assert_array_equal(ImageSequenceReader(tmp_path / "img_*.png", first_index=None)[0], clip[0])


# --- finding sources, synchronization ----------------------------------------------------------------------

def test_find_source_takes_the_first_alternative_that_matches(png_folder, clips):
    folder, _ = png_folder
    assert find_source(folder, ["camera_0.mp4", "camera_0_img_*.png"]).name == "camera_0_img_*.png"
    (folder / "camera_0.mp4").write_bytes(clips["gop12.mp4"][0].read_bytes())
    r = find_source(folder, ["camera_0.mp4", "camera_0_img_*.png"])
    assert isinstance(r, VideoReader) and r.count() == 60
    assert isinstance(find_source(folder, "camera_0_img_*.png"), ImageSequenceReader)
    with pytest.raises(InputError) as e:
        find_source(folder, ["camera_5.mp4", "camera_5_img_*.jpg"])
    assert str(folder) in str(e.value) and "['camera_5.mp4', 'camera_5_img_*.jpg']" in str(e.value)
    (folder / "camera_0b.mp4").write_bytes(b"")
    with pytest.raises(InputError, match=r"matches 2 videos, expected one: \['camera_0.mp4', 'camera_0b.mp4'\]"):
        find_source(folder, "camera_0*.mp4")
    with pytest.raises(InputError, match="does not exist or is not a folder"):
        find_source(folder / "missing", "camera_0.mp4")


def test_synchronized_length_logs_each_count_once(png_folder, clips, caplog):
    folder, _ = png_folder
    readers = {"rh": VideoReader(clips["gop12.mp4"][0]), "rm": open_reader(folder / "camera_0_img_*.png"),
               "rf": VideoReader(clips["b.avi"][0])}
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.WARNING, logger="deeperfly"):
        warnings.simplefilter("always")
        assert synchronized_length(readers) == 12
    msg = ("synchronized sources have different frame counts: rh (gop12.mp4): 60, rm (camera_0_img_*.png): 12, "
           "rf (b.avi): 60; truncating all sources to the shortest, 12 frames")
    assert [str(w.message) for w in rec] == []                     # logged once, not printed again as a Python warning
    assert [r.getMessage() for r in caplog.records if r.name == "deeperfly"] == [msg]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # equal counts: no warning
        assert synchronized_length({"a": readers["rh"], "b": readers["rf"]}) == 60
    with pytest.raises(InputError):
        synchronized_length({})


# --- writing videos ---------------------------------------------------------------------------------------

def test_write_read_round_trip(tmp_path):
    for gray, bound in ((True, 1.5), (False, 3.0)):
        clip = pattern(40, 120, 160, gray=gray)
        path = write_video(tmp_path / "rt.mp4", clip, fps=100)
        r = VideoReader(path)
        assert (r.count(), r.fps, r.frame_size) == (40, 100.0, (120, 160))
        back = r[:]
        mae = np.abs(back.astype(int) - clip).mean()
        assert mae < bound, (gray, mae)                             # crf 18 on smooth content
        if gray: assert (back[..., 0] == back[..., 2]).all()
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt, s.average_rate) == ("h264", "yuv420p", 100)
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")                  # +faststart


@pytest.mark.parametrize("fps", [30000 / 1001, 29.97, 0.2, 12.5, Fraction(24000, 1001)])
def test_frame_rate_is_exact(tmp_path, fps):
    path = write_video(tmp_path / "r.mp4", pattern(4, 32, 32), fps=fps)
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == Fraction(fps).limit_denominator(1001)
    assert VideoReader(path).fps == pytest.approx(float(fps), rel=1e-12)


def test_odd_sizes_are_padded_to_even(tmp_path):
    clip = pattern(3, 41, 63)
    r = VideoReader(write_video(tmp_path / "odd.mp4", clip, fps=10))
    assert r.frame_size == (42, 64)
    assert np.abs(r[:][:, :41, :63].astype(int) - clip).mean() < 3


def test_streaming_frames_and_grayscale_input(tmp_path):
    gen = (np.full((32, 48), 10 * t, np.uint8) for t in range(5))     # 2-D grayscale frames from a generator
    r = VideoReader(write_video(tmp_path / "g.mp4", gen, fps=5))
    means = r[:].reshape(5, -1).mean(axis=1)
    np.testing.assert_allclose(means, [0, 10, 20, 30, 40], atol=1.0)


def test_writer_leaves_nothing_on_failure(tmp_path):
    def leftovers(): return sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "out.mp4", fps=25) as w:
            w.write(pattern(3, 32, 32))
            raise RuntimeError("boom")
    assert leftovers() == []
    with pytest.raises(InputError, match=r"frame 3 is \(16, 32\) \(H, W\) but the video's frames are \(32, 32\)"):
        with VideoWriter(tmp_path / "out.mp4", fps=25) as w:
            w.write(pattern(3, 32, 32)); w.write(pattern(1, 16, 32))
    assert leftovers() == []
    with pytest.raises(InputError, match="frames must be uint8"):
        write_video(tmp_path / "out.mp4", np.zeros((2, 8, 8, 3)), fps=25)
    with pytest.raises(InputError, match="no frames were written"):
        write_video(tmp_path / "out.mp4", [], fps=25)
    w = VideoWriter(tmp_path / "out.mp4", fps=25); w.write(pattern(2, 32, 32)); del w       # never closed
    assert leftovers() == []
    for bad in (dict(fps=0), dict(fps=float("nan")), dict(fps=25, crf=60)):
        with pytest.raises(InputError):
            VideoWriter(tmp_path / "out.mp4", **bad)
    with pytest.raises(InputError, match="must end in one of"):
        VideoWriter(tmp_path / "out.gif", fps=25)
    assert leftovers() == []
    # an existing file is replaced only when the new one is complete
    write_video(tmp_path / "out.mp4", pattern(2, 32, 32), fps=25)
    before = (tmp_path / "out.mp4").read_bytes()
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "out.mp4", fps=25) as w:
            w.write(pattern(5, 32, 32)); raise RuntimeError("boom")
    assert (tmp_path / "out.mp4").read_bytes() == before and leftovers() == ["out.mp4"]


# --- the real recordings ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
    if not (SAMPLE / "camera_0.mp4").exists():
        pytest.skip(f"real DeepFly3D sample not found at {SAMPLE} (it lives in ../shared/data beside the repository)")
    return SAMPLE


def test_real_sample_mp4_and_jpeg_agree_frame_by_frame(sample):
    for c in range(7):
        m = find_source(sample, [f"camera_{c}.mp4", f"camera_{c}_img_*.jpg"])
        j = open_reader(sample / f"camera_{c}_img_*.jpg")
        assert isinstance(m, VideoReader) and isinstance(j, ImageSequenceReader)
        assert (m.count(), j.count(), m.frame_size, j.frame_size, m.fps) == (15, 15, (480, 960), (480, 960), 0.2)
        mf, jf = m[:], j[:]
        assert mf.shape == jf.shape == (15, 480, 960, 3)
        d = lambda a, b: np.array([cv2.absdiff(x, y).mean() for x, y in zip(a, b)])
        same = d(mf, jf)
        assert same.max() < 2.5, (c, same)                          # both lossy: close, not equal (measured <= 1.33)
        assert (same[1:] * 2 < d(mf[:-1], jf[1:])).all()            # JPEG t is far closer to MP4 t than to t-1 ...
        assert (same[:-1] * 2 < d(mf[1:], jf[:-1])).all()           # ... and to t+1: the frames are aligned


def test_real_sample_views_are_synchronized(sample):
    readers = {v: find_source(sample, [f"camera_{c}.mp4", f"camera_{c}_img_*.jpg"]) for c, v in enumerate(VIEWS)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert synchronized_length(readers) == 15


def test_real_example_counts_and_rate():
    if not (EXAMPLE / "camera_0.mp4").exists():
        pytest.skip(f"deeperfly example recording not found at {EXAMPLE} (it lives in ../shared/data beside the repository)")
    for c in range(7):
        r = VideoReader(EXAMPLE / f"camera_{c}.mp4")
        assert (r.count(), r.fps, r.frame_size) == (64, 100.0, (480, 960))
    r = VideoReader(EXAMPLE / "camera_3.mp4")
    frames = list(r)
    assert len(frames) == 64
    np.testing.assert_array_equal(r[40:45], np.stack(frames[40:45]))
