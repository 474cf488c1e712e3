"""
Tests for VideoMoCo. Small shapes, CPU, seconds each; every video is a real file encoded by OpenCV in a
temporary folder, so the decoding path is always exercised. Run: python -m pytest -q
"""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import data

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# fixtures: small encoded videos

def index_frame(i, h=48, w=64):
    """A frame whose index is written as 8 black/white bars, robust to lossy codecs (BGR)."""
    f = np.zeros((h, w, 3), np.uint8)
    for b in range(8):
        if (i >> b) & 1:
            f[:, b * w // 8:(b + 1) * w // 8] = 255
    return f


def frame_index(f):
    w = f.shape[1]
    return sum(1 << b for b in range(8) if f[:, b * w // 8 + 2:(b + 1) * w // 8 - 2].mean() > 127)


def write_video(path, frames, fourcc="XVID", fps=25):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def write_index_video(path, n, **kw):
    return write_video(path, [index_frame(i) for i in range(n)], **kw)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    return data.make_demo(str(tmp_path_factory.mktemp("demo")))


# -----------------------------------------------------------------------------
# data.py: the clip reader

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_reader_returns_exactly_the_written_frames(tmp_path, stride, where):
    n, t = 120, 8
    path = write_index_video(str(tmp_path / "v.avi"), n)
    span = (t - 1) * stride + 1
    start = {"start": 0, "middle": 57, "end": n - span}[where]
    clip = data.read_clip(path, start, t, stride)
    assert clip.shape == (t, 48, 64, 3) and clip.dtype == np.uint8
    assert [frame_index(f) for f in clip] == [start + stride * i for i in range(t)]


def test_reader_several_clips_in_one_pass_match_single_reads(tmp_path):
    path = write_index_video(str(tmp_path / "v.avi"), 200)
    starts = data.uniform_starts(200, 16, 5)
    with data.VideoReader(path) as reader:
        clips = reader.clips(starts, 8, 2)
    for s, clip in zip(starts, clips):
        assert [frame_index(f) for f in clip] == list(range(s, s + 16, 2))
    # and going backwards (a seek back, then a short rewind from the start)
    with data.VideoReader(path) as reader:
        for s in (150, 40, 3):
            assert [frame_index(f) for f in reader.clips([s], 4, 1)[0]] == list(range(s, s + 4))


def test_short_video_is_looped(tmp_path):
    path = write_index_video(str(tmp_path / "short.avi"), 10)
    clip = data.read_clip(path, 0, 8, 2)  # span 15 > 10 frames
    assert [frame_index(f) for f in clip] == [(2 * i) % 10 for i in range(8)]


def test_clip_past_the_real_end_of_a_lying_container(tmp_path):
    # a truncated AVI keeps its header: the container claims 200 frames, fewer decode
    path = write_index_video(str(tmp_path / "trunc.avi"), 200)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with data.VideoReader(path) as reader:
        claimed = reader.claimed_frames
        clip = reader.clips([190], 8, 1)[0]
        real = reader.real_frames
    assert claimed == 200 and 0 < real < 150
    idx = [frame_index(f) for f in clip]
    assert idx == list(range(real - 8, real))  # moved back to end at the last real frame


def test_uniform_starts_are_uniform_and_cover_the_video():
    starts = data.uniform_starts(300, 32, 10)
    assert starts[0] == 0 and starts[-1] + 32 == 300
    gaps = np.diff(starts)
    assert len(starts) == 10 and gaps.max() - gaps.min() <= 1
    assert data.uniform_starts(20, 32, 10) == [0] * 10  # shorter than a clip: all loop from 0


# -----------------------------------------------------------------------------
# data.py: dataset layouts

def test_ucf101_split_parsing_official_format(tmp_path):
    root = tmp_path / "ucf"
    classes = ["YoYo", "ApplyEyeMakeup", "Basketball"]  # classInd order, deliberately not sorted
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_bytes("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(classes)).encode())
    train, test = [], []
    for i, c in enumerate(classes):
        for g in (1, 2):
            rel = f"{c}/v_{c}_g{g:02d}_c01.avi"
            write_index_video(str(root / "UCF-101" / rel), 5)
            (test if g == 1 else train).append((rel, i + 1))
    (lists / "trainlist01.txt").write_bytes("".join(f"{r} {y}\r\n" for r, y in train).encode())
    (lists / "testlist01.txt").write_bytes("".join(f"{r}\r\n" for r, _ in test).encode())
    samples, names, missing = data.list_videos("ucf101", str(root), 1, train=True)
    assert names == classes and missing == []
    assert [(os.path.relpath(p, root / "UCF-101"), y + 1) for p, y in samples] == train
    samples, _, _ = data.list_videos("ucf101", str(root), 1, train=False)
    assert [y for _, y in samples] == [0, 1, 2]  # labels from the folder, matching classInd
    with pytest.raises(data.DataError, match="split file"):
        data.list_videos("ucf101", str(root), 2, train=True)


def test_hmdb51_split_parsing_official_format(tmp_path):
    root = tmp_path / "hmdb"
    lists = root / "testTrainMulti_7030_splits"
    lists.mkdir(parents=True)
    names = {"brush_hair": ["April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "Blonde_(!)_&_#1_brush_hair_f.avi",
                            "unused_brush_hair_0.avi"],
             "cartwheel": ["(Rad)Schlag_die_Bank!_cartwheel_f_cm_np1_le_med_0.avi", "cart_#2_test.avi",
                           "cart_unused.avi"]}
    for c, videos in names.items():
        for v in videos:
            write_index_video(str(root / "hmdb51_org" / c / v), 5)
        (lists / f"{c}_test_split1.txt").write_bytes(
            f"{videos[0]} 1 \r\n{videos[1]} 2 \r\n{videos[2]} 0 \r\n".encode())
    train, classes, _ = data.list_videos("hmdb51", str(root), 1, train=True)
    test, _, _ = data.list_videos("hmdb51", str(root), 1, train=False)
    assert classes == ["brush_hair", "cartwheel"]
    assert [(os.path.basename(p), y) for p, y in train] == [(names["brush_hair"][0], 0), (names["cartwheel"][0], 1)]
    assert [(os.path.basename(p), y) for p, y in test] == [(names["brush_hair"][1], 0), (names["cartwheel"][1], 1)]
    assert all(os.path.isfile(p) for p, _ in train + test)


def test_kinetics_and_folder_layouts(tmp_path):
    root = tmp_path / "k400"
    for split in ("train", "val"):
        for c in ("abseiling", "playing bagpipes (instrument)"):
            write_index_video(str(root / split / c / f"{split}_x.mp4"), 5, fourcc="mp4v")
    train, classes, _ = data.list_videos("kinetics", str(root), 1, train=True)
    val, _, _ = data.list_videos("kinetics", str(root), 1, train=False)
    assert classes == ["abseiling", "playing bagpipes (instrument)"]
    assert [y for _, y in train] == [0, 1] and [y for _, y in val] == [0, 1]
    assert all("/val/" in p for p, _ in val)
    folder, classes, _ = data.list_videos("folder", str(root / "train"), 1, train=True)
    assert len(folder) == 2 and classes[1] == "playing bagpipes (instrument)"


def test_bad_dataset_arguments_give_one_clear_line(tmp_path):
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.list_videos("ucf102", str(tmp_path), 1)
    with pytest.raises(data.DataError, match="not a folder"):
        data.list_videos("ucf101", str(tmp_path / "nope"), 1)
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (tmp_path / "UCF-101").mkdir()
    (lists / "classInd.txt").write_text("1 A\n")
    (lists / "trainlist01.txt").write_text("A/v_A_g01_c01.avi 1\n")
    with pytest.raises(data.DataError, match="names no existing video"):
        data.list_videos("ucf101", str(tmp_path), 1)
    r = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "check", "--dataset", "ucf101",
                        "--data-root", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "error:" in r.stderr
    assert "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# data.py: bad videos never crash a run

def make_tree_with_bad_videos(root, n_good=12):
    """A `folder` dataset: n_good good videos and one of each bad kind. Returns the bad paths."""
    rng = np.random.default_rng(0)
    for i in range(n_good):
        frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(20)]
        write_video(os.path.join(root, "good", f"g{i}.avi"), frames)
    bad = os.path.join(root, "bad")
    os.makedirs(bad)
    open(os.path.join(bad, "empty.avi"), "wb").close()
    full = write_index_video(os.path.join(bad, "truncated.avi"), 60)
    with open(full, "r+b") as f:
        f.truncate(3000)  # the header survives, no frame does
    with open(os.path.join(bad, "text.avi"), "w") as f:
        f.write("this is not a video\n" * 50)
    write_index_video(os.path.join(bad, "three.avi"), 3)
    return sorted(os.path.join(bad, f) for f in os.listdir(bad))


def test_bad_videos_are_skipped_logged_once_and_batches_stay_full(tmp_path, capsys):
    bad_paths = make_tree_with_bad_videos(str(tmp_path))
    samples, _, missing = data.list_videos("folder", str(tmp_path), 1)
    missing = [str(tmp_path / "good" / "listed_but_gone.avi")]  # as a split file would name it
    dataset = data.VideoClips(samples, frames=8, stride=1, transform=data.TrainTransform(32), views=2)
    bad = data.BadVideos(samples, missing, max_fraction=0.5)
    loader = data.build_loader(dataset, batch_size=4, workers=2, train=True, seed=0)
    batches = 0
    for epoch in range(3):
        for batch in loader:
            assert batch["video"].shape == (4, 2, 3, 8, 32, 32)
            assert torch.isfinite(batch["video"]).all()
            bad.update(batch["bad"])
            batches += 1
    assert batches == 3 * (len(samples) // 4)
    assert sorted(p for p in bad.paths if p not in missing) == bad_paths
    assert len(bad) == 5
    log = capsys.readouterr().err
    for p in bad_paths + missing:
        assert log.count(p) == 1, p  # each logged once, though several workers and epochs met it
    assert "too short" in bad.paths[os.path.join(str(tmp_path), "bad", "three.avi")]


def test_too_many_bad_videos_stop_the_run(tmp_path):
    make_tree_with_bad_videos(str(tmp_path), n_good=4)
    samples, _, _ = data.list_videos("folder", str(tmp_path), 1)
    bad = data.BadVideos(samples, max_fraction=0.1, log=False)
    with pytest.raises(data.DataError, match="unreadable or missing"):
        bad.update([(i, "x") for i, (p, _) in enumerate(samples) if "/bad/" in p])


def test_test_mode_marks_bad_videos_invalid_instead_of_swapping(tmp_path):
    make_tree_with_bad_videos(str(tmp_path), n_good=2)
    samples, _, _ = data.list_videos("folder", str(tmp_path), 1)
    dataset = data.VideoClips(samples, 8, 1, data.EvalTransform(32, crops=3), mode="test", clips=4)
    out = [dataset[i] for i in range(len(samples))]
    assert [o["valid"] for o in out] == [os.path.basename(os.path.dirname(p)) == "good" for p, _ in samples]
    assert all(o["video"].shape == (12, 3, 8, 32, 32) for o in out)


# -----------------------------------------------------------------------------
# data.py: augmentation and seeding

def test_augmentation_is_identical_across_the_frames_of_a_clip():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    frames = np.stack([frame] * 6)
    transform = data.TrainTransform(crop=32)
    outs = []
    for _ in range(30):
        clip = transform(frames, rng)
        assert clip.shape == (3, 6, 32, 32)
        assert torch.equal(clip, clip[:, :1].expand_as(clip))  # every frame got the same transform
        outs.append(clip)
    assert not torch.equal(outs[0], outs[1])  # and it is random across clips


def naive_color(pixels, rng, jitter_p=0.8, grayscale_p=0.2):
    """Colour jitter then grayscale, one op at a time, pixel by pixel (no clamping), drawing from
    `rng` in the same order as data.color_matrix."""
    px = [list(map(float, p)) for p in pixels]
    luma = lambda p: 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
    if rng.random() < jitter_p:
        for op in rng.permutation(4):
            if op == 0:
                b = rng.uniform(0.6, 1.4)
                px = [[b * v for v in p] for p in px]
            elif op == 1:
                level = sum(luma(p) for p in px) / len(px)  # mean grey level of the clip as it is now
                c = rng.uniform(0.6, 1.4)
                px = [[(v - level) * c + level for v in p] for p in px]
            elif op == 2:
                s = rng.uniform(0.6, 1.4)
                px = [[(v - luma(p)) * s + luma(p) for v in p] for p in px]
            else:
                a = 2 * np.pi * rng.uniform(-0.1, 0.1)
                out = []
                for r, g, b in px:  # RGB -> YIQ, rotate I/Q by a, back
                    y, i, q = 0.299 * r + 0.587 * g + 0.114 * b, 0.596 * r - 0.274 * g - 0.322 * b, \
                        0.211 * r - 0.523 * g + 0.312 * b
                    i, q = i * np.cos(a) - q * np.sin(a), i * np.sin(a) + q * np.cos(a)
                    inv = np.linalg.inv(np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                                                  [0.211, -0.523, 0.312]]))
                    out.append(list(inv @ np.array([y, i, q])))
                px = out
    if rng.random() < grayscale_p:
        px = [[luma(p)] * 3 for p in px]
    return np.array(px)


@pytest.mark.parametrize("seed", range(8))
def test_composed_color_matrix_equals_the_ops_applied_one_by_one(seed):
    pixels = np.random.default_rng(100 + seed).uniform(0, 255, (50, 3))
    m = data.color_matrix(np.random.default_rng(seed), pixels.mean(0), jitter_p=0.9, grayscale_p=0.5)
    expected = naive_color(pixels, np.random.default_rng(seed), jitter_p=0.9, grayscale_p=0.5)
    assert np.allclose(pixels @ m[:, :3].T + m[:, 3], expected, atol=1e-6)
    frames = pixels.astype(np.uint8).reshape(1, 5, 10, 3)
    saturated = data.apply_color(frames, m).reshape(-1, 3).astype(float)
    exact = np.clip(frames.reshape(-1, 3) @ m[:, :3].T + m[:, 3], 0, 255)
    assert np.abs(saturated - exact).max() <= 1.0  # cv2 rounds and saturates


def _first_batches(dataset, seed, workers):
    loader = data.build_loader(dataset, batch_size=2, workers=workers, train=True, seed=seed)
    return [b["video"] for _, b in zip(range(3), loader)]


def test_workers_draw_different_augmentations_and_seeded_runs_repeat(tmp_path):
    path = write_video(str(tmp_path / "same.avi"),
                       [np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)] * 12)
    dataset = data.VideoClips([(path, 0)] * 12, 8, 1, data.TrainTransform(32), views=1)
    a = _first_batches(dataset, seed=3, workers=2)
    b = _first_batches(dataset, seed=3, workers=2)
    c = _first_batches(dataset, seed=4, workers=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    clips = torch.cat(a).flatten(1)  # 6 clips of one video, from two workers: all distinct
    assert len({tuple(c[:64].tolist()) for c in clips}) == 6


def test_eval_transform_three_crops_cover_the_long_side():
    frames = np.zeros((2, 60, 120, 3), np.uint8)
    frames[:, :, :40] = 255  # left third white
    out = data.EvalTransform(crop=32, resize=32, crops=3)(frames)
    assert out.shape == (3, 3, 2, 32, 32)
    means = out.mean(dim=(1, 2, 3, 4))
    assert means[0] > means[1] > means[2]  # left crop sees the white, right crop none


# -----------------------------------------------------------------------------
# data.py: the demo set

def test_demo_set_layout_and_split_by_group(demo_root):
    train, classes, _ = data.list_videos("ucf101", demo_root, 1, train=True)
    test, _, _ = data.list_videos("ucf101", demo_root, 1, train=False)
    assert len(classes) >= 6
    group = lambda p: p.rsplit("_g", 1)[1][:2]
    assert not {group(p) for p, _ in train} & {group(p) for p, _ in test}
    assert {y for _, y in test} == set(range(len(classes)))
    with open(os.path.join(demo_root, "ucfTrainTestlist", "trainlist01.txt"), "rb") as f:
        assert f.readline().endswith(b"\r\n")  # CRLF, like the official lists
    with data.VideoReader(train[0][0]) as reader:
        assert 24 <= reader.count_frames() <= 48


def _frame_features(path, index):
    frame = data.read_clip(path, index, 1)[0].astype(np.float32)
    return cv2.resize(frame, (16, 12), interpolation=cv2.INTER_AREA).ravel()


def test_demo_classes_cannot_be_told_apart_from_a_single_frame(demo_root):
    # Nearest class-mean on a single frame (downsampled colour image, where and how big objects are)
    # must stay at chance, while the same classifier on a frame *difference* is far above it: the
    # class lives in the motion only. A set that leaks the class into the appearance fails here.
    train, classes, _ = data.list_videos("ucf101", demo_root, 1, train=True)
    test, _, _ = data.list_videos("ucf101", demo_root, 1, train=False)

    def accuracy(feature):
        x = np.stack([feature(p) for p, _ in train])
        y = np.array([y for _, y in train])
        means = np.stack([x[y == c].mean(0) for c in range(len(classes))])
        xt = np.stack([feature(p) for p, _ in test])
        yt = np.array([y for _, y in test])
        pred = ((xt[:, None] - means[None]) ** 2).sum(-1).argmin(1)
        return (pred == yt).mean()

    chance = 1 / len(classes)
    single = accuracy(lambda p: _frame_features(p, 0))
    assert single < chance + 0.15, single

    def motion(p):  # sign of the vertical optical-flow-ish change, summed: a crude motion cue
        clip = data.read_clip(p, 0, 24, 1).astype(np.float32).mean(-1)
        d = np.diff(clip, axis=0)
        gy, gx = np.gradient(clip[:-1], axis=(1, 2))
        return np.array([(d * gy).sum(), (d * gx).sum(), np.abs(d).sum()]) / 1e5

    assert accuracy(motion) > single + 0.1


# -----------------------------------------------------------------------------
# data.py: tools

def test_check_and_resize_tools(tmp_path):
    make_tree_with_bad_videos(str(tmp_path / "src"), n_good=2)
    (tmp_path / "src" / "notes.txt").write_text("split file stand-in\n")
    r = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "check", "--dataset", "folder",
                        "--data-root", str(tmp_path / "src"), "--frames", "8", "--workers", "2",
                        "--bad-list", str(tmp_path / "bad.txt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 ok" in r.stdout and "3 unreadable" in r.stdout and "1 too short" in r.stdout
    assert len((tmp_path / "bad.txt").read_text().splitlines()) == 4
    r = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "resize", str(tmp_path / "src"),
                        str(tmp_path / "dst"), "--short-side", "24", "--workers", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dst" / "notes.txt").read_text() == "split file stand-in\n"
    clip = data.read_clip(str(tmp_path / "dst" / "good" / "g0.avi"), 0, 20)
    assert clip.shape == (20, 24, 32, 3)
