"""
data.py and demo_data.py: the clip reader on real OpenCV-encoded files, the dataset layouts, bad
videos, temporally consistent augmentation, the loader and its seeding, the demo sets and the tools.
"""

import itertools
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import demo_data
import methods
import pretrain
from testlib import (HERE, free_port, avi_frame_chunks, frame_index, read_clip, write_index_video,
                     write_video)


# -----------------------------------------------------------------------------
# data.py: the clip reader


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_reader_returns_exactly_the_written_frames(tmp_path, stride, where):
    n, t = 120, 8
    path = write_index_video(str(tmp_path / "v.avi"), n)
    span = (t - 1) * stride + 1
    start = {"start": 0, "middle": 57, "end": n - span}[where]
    clip = read_clip(path, start, t, stride)
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
    clip = read_clip(path, 0, 8, 2)  # span 15 > 10 frames
    assert [frame_index(f) for f in clip] == [(2 * i) % 10 for i in range(8)]


def test_clip_past_the_real_end_of_a_lying_container(tmp_path):
    # a download cut short keeps its header: the container claims 200 frames, 100 decode. The cut
    # falls on a frame boundary, so no frame is damaged and nothing depends on how a decoder
    # conceals one (cutting inside frame 69 let OpenCV 5.1 show a copy of frame 68 as 69). XVID as
    # OpenCV writes it has no B-frames, so file order is display order; if that changed, the exact
    # indices below would fail, not pass
    path = write_index_video(str(tmp_path / "trunc.avi"), 200)
    chunks = avi_frame_chunks(path)
    assert len(chunks) == 200  # one chunk per frame
    with open(path, "r+b") as f:
        f.truncate(chunks[99][1])  # just after frame 99's chunk; the index (idx1) goes too
    with data.VideoReader(path) as reader:
        claimed = reader.claimed_frames
        clip = reader.clips([190], 8, 1)[0]
        real = reader.real_frames
    assert claimed == 200 and real == 100
    idx = [frame_index(f) for f in clip]
    assert idx == list(range(92, 100))  # moved back to end at the last frame that decodes
    whole = read_clip(path, 0, 100)  # and every frame before the cut decodes as itself
    assert [frame_index(f) for f in whole] == list(range(100))


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
    class_ind = "".join(f"{i + 1} {c}\r\n" for i, c in enumerate(classes))
    (lists / "classInd.txt").write_bytes(class_ind.encode())
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
    names = {"brush_hair": ["April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
                            "Blonde_(!)_&_#1_brush_hair_f.avi",
                            "unused_brush_hair_0.avi"],
             "cartwheel": ["(Rad)Schlag_die_Bank!_cartwheel_f_cm_np1_le_med_0.avi",
                           "cart_#2_test.avi",
                           "cart_unused.avi"]}
    for c, videos in names.items():
        for v in videos:
            write_index_video(str(root / "hmdb51_org" / c / v), 5)
        (lists / f"{c}_test_split1.txt").write_bytes(
            f"{videos[0]} 1 \r\n{videos[1]} 2 \r\n{videos[2]} 0 \r\n".encode())
    train, classes, _ = data.list_videos("hmdb51", str(root), 1, train=True)
    test, _, _ = data.list_videos("hmdb51", str(root), 1, train=False)
    assert classes == ["brush_hair", "cartwheel"]
    assert [(os.path.basename(p), y) for p, y in train] == [(names["brush_hair"][0], 0),
                                                            (names["cartwheel"][0], 1)]
    assert [(os.path.basename(p), y) for p, y in test] == [(names["brush_hair"][1], 0),
                                                           (names["cartwheel"][1], 1)]
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
    r = subprocess.run([sys.executable, os.path.join(HERE, "demo_data.py"), "check",
                        "--dataset", "ucf101",
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
    first_frame = avi_frame_chunks(full)[0][0]
    with open(full, "r+b") as f:
        f.truncate(first_frame)  # the header survives, no frame does
    with open(os.path.join(bad, "text.avi"), "w") as f:
        f.write("this is not a video\n" * 50)
    write_index_video(os.path.join(bad, "three.avi"), 3)
    return sorted(os.path.join(bad, f) for f in os.listdir(bad))


def test_bad_videos_are_skipped_logged_once_and_batches_stay_full(tmp_path, capsys):
    bad_paths = make_tree_with_bad_videos(str(tmp_path))
    samples, _, missing = data.list_videos("folder", str(tmp_path), 1)
    missing = [str(tmp_path / "good" / "listed_but_gone.avi")]  # as a split file would name it
    dataset = data.VideoClips(samples, frames=8, stride=1,
                              transform=data.TrainTransform(32), pair=data.SameClip(views=2))
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
    assert "no decodable frames" in bad.paths[os.path.join(str(tmp_path), "bad", "truncated.avi")]


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
    items = [dataset[i] for i in range(len(samples))]
    assert all(len(item) == 1 for item in items)  # one sample per video in test mode
    out = [item[0] for item in items]
    good = [os.path.basename(os.path.dirname(p)) == "good" for p, _ in samples]
    assert [o["valid"] for o in out] == good
    assert all(o["video"].shape == (12, 3, 8, 32, 32) for o in out)


def _bad_videos_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    samples = [(f"/v{i}.avi", 0) for i in range(20)]
    bad = data.BadVideos(samples, max_fraction=0.25, log=False)
    bad.update([(rank, "broken")])  # each rank meets a different bad video
    counts = [len(bad)]
    bad.flush()
    counts.append(len(bad))
    # 6 of 20 bad in all: over 25 %, but 3 per rank
    bad.update([(10 + rank, "x"), (12 + rank, "y")])
    try:
        bad.flush()
        counts.append("no stop")
    except data.DataError:
        counts.append("stopped")
    torch.save(counts, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_bad_videos_are_counted_over_all_ranks(tmp_path):
    port = free_port()
    mp.spawn(_bad_videos_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"{rank}.pt") == [0, 2, "stopped"]


# -----------------------------------------------------------------------------
# data.py: temporally consistent augmentation, in the workers or on the device


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
                # mean grey level of the clip as it is now
                level = sum(luma(p) for p in px) / len(px)
                c = rng.uniform(0.6, 1.4)
                px = [[(v - level) * c + level for v in p] for p in px]
            elif op == 2:
                s = rng.uniform(0.6, 1.4)
                px = [[(v - luma(p)) * s + luma(p) for v in p] for p in px]
            else:
                a = 2 * np.pi * rng.uniform(-0.1, 0.1)
                out = []
                for r, g, b in px:  # RGB -> YIQ, rotate I/Q by a, back
                    y = 0.299 * r + 0.587 * g + 0.114 * b
                    i = 0.596 * r - 0.274 * g - 0.322 * b
                    q = 0.211 * r - 0.523 * g + 0.312 * b
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
    m = data.color_matrix(np.random.default_rng(seed), pixels.mean(0), jitter_p=0.9,
                          grayscale_p=0.5)
    expected = naive_color(pixels, np.random.default_rng(seed), jitter_p=0.9, grayscale_p=0.5)
    assert np.allclose(pixels @ m[:, :3].T + m[:, 3], expected, atol=1e-6)
    frames = pixels.astype(np.uint8).reshape(1, 5, 10, 3)
    saturated = data.apply_color(frames, m).reshape(-1, 3).astype(float)
    exact = np.clip(frames.reshape(-1, 3) @ m[:, :3].T + m[:, 3], 0, 255)
    assert np.abs(saturated - exact).max() <= 1.0  # cv2 rounds and saturates


def test_eval_transform_three_crops_cover_the_long_side():
    frames = np.zeros((2, 60, 120, 3), np.uint8)
    frames[:, :, :40] = 255  # left third white
    out = data.EvalTransform(crop=32, resize=32, crops=3)(frames)
    assert out.shape == (3, 3, 2, 32, 32)
    means = out.mean(dim=(1, 2, 3, 4))
    assert means[0] > means[1] > means[2]  # left crop sees the white, right crop none


def naive_augment(clip, params):
    """TrainTransform's device half, one pixel at a time: uint8 (T, H, W, 3) and (13,) parameters
    (flip, 3x4 colour map) -> float64 (3, T, H, W)."""
    t, h, w, _ = clip.shape
    m = np.asarray(params[1:], np.float64).reshape(3, 4)
    out = np.zeros((3, t, h, w))
    for f in range(t):
        for y in range(h):
            for x in range(w):
                rgb = clip[f, y, w - 1 - x if params[0] > 0.5 else x].astype(np.float64)
                for c in range(3):
                    v = min(max(sum(m[c, j] * rgb[j] for j in range(3)) + m[c, 3], 0.0), 255.0)
                    out[c, f, y, x] = (v / 255 - data.MEAN[c]) / data.STD[c]
    return out


def test_augment_on_the_device_matches_a_per_pixel_loop():
    rng = np.random.default_rng(0)
    video = torch.from_numpy(rng.integers(0, 256, (2, 3, 2, 3, 4, 5, 3), dtype=np.uint8))
    params = torch.from_numpy(np.concatenate([  # (2 samples, 3 views, 13); S = 2 clips share them
        rng.integers(0, 2, (2, 3, 1)), rng.normal(0, 0.8, (2, 3, 12)) + [
            1, 0, 0, 10, 0, 1, 0, -10, 0, 0, 1, 0]], -1).astype(np.float32))
    out = data.augment(video, params)  # (2, 3, 2, 3, T, H, W)
    assert out.shape == (2, 3, 2, 3, 3, 4, 5) and out.dtype == torch.float32
    for n, v, s in itertools.product(range(2), range(3), range(2)):
        expected = naive_augment(video[n, v, s].numpy(), params[n, v].tolist())
        assert np.allclose(out[n, v, s].numpy(), expected, atol=1e-4)


def colour_tree(root, n=4, frames=20):
    """Videos of smooth moving colour fields: a crop, a flip and a colour map all show."""
    rng = np.random.default_rng(3)
    samples = []
    for i in range(n):
        field = cv2.resize(rng.uniform(0, 255, (4, 6, 3)).astype(np.float32), (96, 48))
        clip = [np.roll(field, 2 * t, axis=1).astype(np.uint8) for t in range(frames)]
        samples.append((write_video(os.path.join(root, f"v{i}.avi"), clip), i))
    return samples


@pytest.mark.parametrize("pair,frames", [(data.SameClip(views=2), 8), (methods.CVRLPair(), 8),
                                         (methods.VCLRTuples(3), 4)])
def test_device_augmentation_gives_the_worker_clip_for_the_same_draws(tmp_path, pair, frames):
    # The two paths draw the same parameters from the same per-sample seed, so the same draws must
    # give the same clip: to within one grey level, cv2's 8-bit colour arithmetic in the workers
    samples = colour_tree(str(tmp_path))
    batches = {}
    for on_device in (False, True):
        dataset = data.VideoClips(samples, frames, 1, data.TrainTransform(32, on_device=on_device),
                                  pair)
        batches[on_device] = data.collate([dataset[(i, 10 + i)] for i in range(4)])
    uint8, float32 = batches[True]["video"], batches[False]["video"]
    assert uint8.dtype == torch.uint8 and float32.dtype == torch.float32
    assert uint8.nbytes * 4 == float32.nbytes  # a quarter of the bytes through the loader
    device = data.to_device(batches[True], "cpu")
    assert device.shape == float32.shape
    level = torch.tensor([1 / (255 * s) for s in data.STD]).view(3, 1, 1, 1)
    diff = (device - float32).abs() / level  # in grey levels
    assert diff.max() <= 1.0 and diff.mean() < 0.35, (diff.max(), diff.mean())
    flipped = dict(batches[True], aug=batches[True]["aug"].clone())
    flipped["aug"][..., 0] = 1 - flipped["aug"][..., 0]  # a wrong flip is far outside it
    assert ((data.to_device(flipped, "cpu") - float32).abs() / level).max() > 20


# -----------------------------------------------------------------------------
# data.py: loading, seeding, repeated sampling


def _first_batches(dataset, seed, workers):
    loader = data.build_loader(dataset, batch_size=2, workers=workers, train=True, seed=seed)
    return [b["video"] for _, b in zip(range(3), loader)]


def test_workers_draw_different_augmentations_and_seeded_runs_repeat(tmp_path):
    path = write_video(str(tmp_path / "same.avi"),
                       [np.random.default_rng(1).integers(0, 255, (48, 64, 3),
                                                          dtype=np.uint8)] * 12)
    dataset = data.VideoClips([(path, 0)] * 12, 8, 1, data.TrainTransform(32),
                              data.SameClip(views=1))
    a = _first_batches(dataset, seed=3, workers=2)
    b = _first_batches(dataset, seed=3, workers=2)
    c = _first_batches(dataset, seed=4, workers=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    clips = torch.cat(a).flatten(1)  # 6 clips of one video, from two workers: all distinct
    assert len({tuple(c[:64].tolist()) for c in clips}) == 6


def test_epoch_sampler_shards_cover_the_data_once_and_repeat_per_epoch():
    shards = []
    for rank in range(3):
        s = data.EpochSampler(20, train=True, seed=5)
        s.rank, s.world = rank, 3
        s.set_epoch(2)
        shards.append(list(s))
    flat = [i for shard in shards for i, _ in shard]
    assert all(len(x) == 6 for x in shards) and len(set(flat)) == 18  # disjoint, tail of 2 dropped
    seeds = [seed for shard in shards for _, seed in shard]
    assert len(set(seeds)) == 18  # one seed per sample
    s = data.EpochSampler(20, train=True, seed=5)
    s.rank, s.world = 0, 3
    s.set_epoch(2, skip=4)
    assert list(s) == shards[0][4:] and len(s) == 2
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in shards[0]]
    t = data.EpochSampler(7, train=False)
    t.rank, t.world = 1, 2
    assert [i for i, _ in t] == [1, 3, 5]


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    rng = np.random.default_rng(2)
    samples = [(write_video(str(tmp_path / f"v{i}.avi"),
                            [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)] * 20), 0)
               for i in range(6)]
    dataset = data.VideoClips(samples, 8, 1, data.TrainTransform(32), data.SameClip(views=2))
    a = _first_batches(dataset, seed=7, workers=0)
    b = _first_batches(dataset, seed=7, workers=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_repeat_sample_draws_its_clips_in_one_window_and_fills_the_batch(tmp_path, monkeypatch):
    samples = colour_tree(str(tmp_path), frames=60)
    starts = []
    clips = data.VideoReader.clips

    def spy(self, s, *a, **k):
        starts.append(list(s))
        return clips(self, s, *a, **k)

    monkeypatch.setattr(data.VideoReader, "clips", spy)
    dataset = data.VideoClips(samples, 8, 1, data.TrainTransform(32, on_device=True),
                              data.SameClip(views=2, repeat=3))
    span, window = 8, 8 + int((data.REPEAT_WINDOW - 1) * 8)
    for i in range(40):
        item = dataset[(i % 4, i)]
        assert len(item) == 3 and all(s["video"].shape == (2, 8, 32, 32, 3) for s in item)
        assert all(s["aug"].shape == (2, 13) for s in item)
        assert not torch.equal(item[0]["aug"], item[1]["aug"])  # each sample its own views
        assert max(starts[-1]) - min(starts[-1]) <= window - span
    assert all(len(s) == 3 for s in starts)  # one decode per video
    assert sum(len(set(s)) > 1 for s in starts) > 20  # the positions differ
    loader = data.build_loader(dataset, batch_size=6, workers=0, train=True)
    batch = next(iter(loader))
    assert batch["video"].shape[0] == 6 and len(set(batch["index"].tolist())) == 2
    os.makedirs(tmp_path / "c0", exist_ok=True)
    shutil.copy(samples[0][0], tmp_path / "c0")
    args, _ = pretrain.parse_args(["--dataset", "folder", "--data-root", str(tmp_path), "--frames",
                                   "8", "--crop", "32", "--repeat-sample", "2", "--method", "cvrl"])
    with pytest.raises(data.DataError, match="repeat-sample"):
        pretrain.build_data(args, 2, 0)
    with pytest.raises(data.DataError, match="does not divide"):
        data.build_loader(dataset, batch_size=4, workers=0, train=True)


# -----------------------------------------------------------------------------
# data.py: the demo sets


def test_demo_set_layout_and_split_by_group(demo_root):
    train, classes, _ = data.list_videos("ucf101", demo_root, 1, train=True)
    test, _, _ = data.list_videos("ucf101", demo_root, 1, train=False)
    groups, test_groups, clips = demo_data.DEMO_GROUPS["demo"]
    assert len(classes) == 6
    assert len(train) == 6 * (groups - test_groups) * clips
    assert len(test) == 6 * test_groups * clips
    # v_<Class>_gGG: one scene of one class
    scene = lambda p: os.path.basename(p).rsplit("_c", 1)[0]
    assert not {scene(p) for p, _ in train} & {scene(p) for p, _ in test}  # test scenes are unseen
    assert {y for _, y in test} == set(range(len(classes)))
    with open(os.path.join(demo_root, "ucfTrainTestlist", "trainlist01.txt"), "rb") as f:
        assert f.readline().endswith(b"\r\n")  # CRLF, like the official lists
    # the clips of a group are consecutive pieces of one take: clip 2 starts where clip 1 ended
    first = sorted(p for p, _ in train if scene(p) == scene(train[0][0]))
    assert len(first) == clips
    with data.VideoReader(first[0]) as reader:
        n = reader.count_frames()
        last_frame = reader.clips([n - 1], 1)[0, 0].astype(np.float32)
    assert 32 <= n <= 48
    next_start = read_clip(first[1], 0, 1)[0].astype(np.float32)
    other_scene = read_clip(train[-1][0], 0, 1)[0].astype(np.float32)
    assert np.abs(last_frame - next_start).mean() < 0.3 * np.abs(last_frame - other_scene).mean()


def _frame_features(path, index):
    frame = read_clip(path, index, 1)[0].astype(np.float32)
    return cv2.resize(frame, (16, 12), interpolation=cv2.INTER_AREA).ravel()


# the sign of the vertical and horizontal brightness flow, summed: a crude motion cue
def _motion_features(path):
    clip = read_clip(path, 0, 24, 1).astype(np.float32).mean(-1)
    d = np.diff(clip, axis=0)
    gy, gx = np.gradient(clip[:-1], axis=(1, 2))
    return np.array([(d * gy).sum(), (d * gx).sum(), np.abs(d).sum()]) / 1e5


def _nearest_mean_accuracy(train, test, feature, classes):
    """Nearest class-mean classifier on `feature(path)`, trained on `train`, accuracy on `test`,
    both restricted to `classes`."""
    train = [(p, y) for p, y in train if y in classes]
    test = [(p, y) for p, y in test if y in classes]
    x, y = np.stack([feature(p) for p, _ in train]), np.array([y for _, y in train])
    means = np.stack([x[y == c].mean(0) for c in classes])
    xt, yt = np.stack([feature(p) for p, _ in test]), np.array([y for _, y in test])
    return (np.array(classes)[((xt[:, None] - means[None]) ** 2).sum(-1).argmin(1)] == yt).mean()


def test_demo_frame_tells_the_scene_type_and_only_motion_tells_the_action(demo_root):
    # "demo": a class is a scene type (the texture's orientation) and an action. One frame must give
    # the scene type, and must *not* tell apart the two actions of a scene type, which a motion cue
    # does: appearance alone is worth at most half the classes. A set that leaks the action into a
    # frame, or hides the scene type, fails here.
    train, classes, _ = data.list_videos("ucf101", demo_root, 1, train=True)
    test, _, _ = data.list_videos("ucf101", demo_root, 1, train=False)

    def orientation(p):  # horizontal vs vertical edge energy of frame 0
        gray = read_clip(p, 0, 1)[0].astype(np.float32).mean(-1)
        gy, gx = np.abs(np.gradient(gray, axis=(0, 1)))
        return np.array([gx.mean(), gy.mean()]) / (gx.mean() + gy.mean())

    # classes 2j, 2j+1 share scene type j
    to_type = lambda samples: [(p, y // 2) for p, y in samples]
    assert _nearest_mean_accuracy(to_type(train), to_type(test), orientation, [0, 1, 2]) > 0.8
    single = np.mean([_nearest_mean_accuracy(train, test, lambda p: _frame_features(p, 0),
                                             [2 * j, 2 * j + 1])
                      for j in range(3)])
    motion = np.mean([_nearest_mean_accuracy(train, test, _motion_features,
                                             [2 * j, 2 * j + 1]) for j in range(3)])
    assert single < 0.5 + 0.15 and motion > single + 0.1, (single, motion)


def test_demo_motion_classes_cannot_be_told_apart_from_a_single_frame(demo_motion_root):
    # "demo-motion": nearest class-mean on a single frame (downsampled colour image, where and how
    # big objects are) must stay at chance, while the same classifier on a crude motion cue is far
    # above it: the class lives in the motion only. A set that
    # leaks the class into the appearance fails.
    train, classes, _ = data.list_videos("ucf101", demo_motion_root, 1, train=True)
    test, _, _ = data.list_videos("ucf101", demo_motion_root, 1, train=False)
    everything = list(range(len(classes)))
    single = _nearest_mean_accuracy(train, test, lambda p: _frame_features(p, 0), everything)
    assert single < 1 / len(classes) + 0.15, single
    assert _nearest_mean_accuracy(train, test, _motion_features, everything) > single + 0.1


# -----------------------------------------------------------------------------
# data.py: the tools, and data.py alone


def test_check_and_resize_tools(tmp_path):
    make_tree_with_bad_videos(str(tmp_path / "src"), n_good=2)
    (tmp_path / "src" / "notes.txt").write_text("split file stand-in\n")
    r = subprocess.run([sys.executable, os.path.join(HERE, "demo_data.py"), "check",
                        "--dataset", "folder",
                        "--data-root", str(tmp_path / "src"), "--frames", "8", "--workers", "2",
                        "--bad-list", str(tmp_path / "bad.txt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 ok" in r.stdout and "3 unreadable" in r.stdout and "1 too short" in r.stdout
    assert len((tmp_path / "bad.txt").read_text().splitlines()) == 4
    r = subprocess.run([sys.executable, os.path.join(HERE, "demo_data.py"), "resize",
                        str(tmp_path / "src"),
                        str(tmp_path / "dst"), "--short-side", "24", "--workers", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dst" / "notes.txt").read_text() == "split file stand-in\n"
    clip = read_clip(str(tmp_path / "dst" / "good" / "g0.avi"), 0, 20)
    assert clip.shape == (20, 24, 32, 3)


DATA_ALONE = """
import numpy as np
import cv2
import data  # the copy, alone in this folder
frames = [np.roll(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8), 2 * t, 1)
          for t in range(20)]
writer = cv2.VideoWriter("v.avi", cv2.VideoWriter_fourcc(*"XVID"), 25, (64, 48))
for f in frames:
    writer.write(f)
writer.release()
with data.VideoReader("v.avi") as reader:
    clip = reader.clips([3], 8, 2)[0]
assert clip.shape == (8, 48, 64, 3) and clip.dtype == np.uint8
dataset = data.VideoClips([("v.avi", 0)], 8, 2, data.TrainTransform(32), data.SameClip(views=2))
sample, = dataset[(0, 1)]
assert sample["video"].shape == (2, 3, 8, 32, 32) and sample["valid"]
assert not (sample["video"][0] == sample["video"][1]).all()  # two augmentations of the clip
print("alone", data.__file__)
"""


def test_data_py_alone_reads_a_clip_and_makes_two_views(tmp_path):
    # data.py imports nothing of the project: alone in an empty folder it reads a clip of a video
    # it writes and makes two augmented views of it
    shutil.copy(os.path.join(HERE, "data.py"), tmp_path / "data.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", DATA_ALONE], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"alone {tmp_path / 'data.py'}"


def test_bench_decode_only_items_collate_as_the_dataset_s(tmp_path):
    # bench.py's decode-only limit and naive baseline go through data.collate like VideoClips'
    # items (a list of samples each): a dict instead crashed `python bench.py`
    import bench
    path = str(tmp_path / "v.avi")
    write_index_video(path, 12)
    for whole in (False, True):
        dataset = bench.DecodeOnly([(path, 0.5, 4)] * 2, whole=whole)
        batch = data.collate([dataset[0], dataset[1]])
        assert batch["video"].shape == (2, 1) and batch["bad"] == []

