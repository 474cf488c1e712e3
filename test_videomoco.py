"""
Tests for VideoMoCo. Small shapes, CPU, seconds each; every video is a real file encoded by OpenCV
in a temporary folder, so the decoding path is always exercised. Every equation is compared with a
naive loop. Run: python -m pytest -q test_videomoco.py
"""

import argparse
import ast
import contextlib
import copy
import decimal
import importlib.metadata
import inspect
import itertools
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import types

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.video.resnet import (BasicBlock, BasicStem, Conv2Plus1D, Conv3DSimple,
                                             R2Plus1dStem, VideoResNet)

import data
import demo_data
import evaluate
import finetune
import methods
import models
import pretrain
import utils


HERE = os.path.dirname(os.path.abspath(__file__))
TINY = models.encoder_builder("tiny")  # base_encoder of the small models in these tests


def read_clip(path, start, num_frames, stride=1):
    """`num_frames` uint8 RGB frames (T, H, W, 3) at `stride` from frame `start` (VideoReader)."""
    with data.VideoReader(path) as reader:
        return reader.clips([start], num_frames, stride)[0]


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


def avi_frame_chunks(path):
    """(start, end) byte offsets of each video frame's chunk in an AVI's `movi` list, in file order
    (a walk of the RIFF tree: chunk id, little-endian size, data, a pad byte to an even size)."""
    with open(path, "rb") as f:
        b = f.read()
    chunks = []

    def walk(off, end, in_movi):
        while off + 8 <= end:
            cid, size = struct.unpack_from("<4sI", b, off)
            if cid in (b"RIFF", b"LIST"):
                walk(off + 12, off + 8 + size, in_movi or b[off + 8:off + 12] == b"movi")
            elif in_movi and cid[:2].isdigit() and cid[2:] in (b"dc", b"db"):  # '00dc': a frame
                chunks.append((off, off + 8 + size + (size & 1)))
            off += 8 + size + (size & 1)

    walk(0, len(b), False)
    return chunks


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    return demo_data.make_demo(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="session")
def demo_motion_root(tmp_path_factory):
    return demo_data.make_demo_motion(str(tmp_path_factory.mktemp("demo-motion")))


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory):
    """A `folder` dataset of 8 short random-texture videos in 2 classes."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    for i in range(8):
        base = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        frames = [np.roll(base, 2 * t * (1 if i % 2 else -1), axis=1) for t in range(12)]
        write_video(str(root / f"c{i % 2}" / f"v{i}.avi"), frames)
    return str(root)


def small_args(root, out, *extra):
    return ["--dataset", "folder", "--data-root", root, "--out", str(out), "--arch", "tiny",
            "--frames", "4",
            "--crop", "32", "--batch-size", "4", "--epochs", "2", "--adv-start", "1",
            "--moco-k", "12",
            "--decay", "0.99", "--workers", "0", "--drop-frames", "1",
            "--print-freq", "1", "--lr", "0.05", *extra]


def read_log(out, kind="step"):
    """The per-step records of OUT/log.jsonl, or with kind="epoch" the per-epoch ones."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if bool(r.get("curve")) == (kind == "epoch")]


@pytest.fixture(scope="session")
def distinct_tree(tmp_path_factory):
    """48 videos (4 class folders) that two augmented views of a clip still match: each a random
    binary texture in two colours of its own, drifting a pixel or two per frame; 24 frames,
    48x48."""
    root = tmp_path_factory.mktemp("distinct")
    rng = np.random.default_rng(0)
    for i in range(48):
        colors = rng.integers(0, 256, (2, 3))
        base = np.where(rng.random((96, 96, 1)) < 0.5, colors[0], colors[1]).astype(np.uint8)
        dy, dx = rng.integers(-2, 3, 2)
        frames = [np.roll(base, (t * dy, t * dx), axis=(0, 1))[:48, :48].copy() for t in range(24)]
        write_video(str(root / f"c{i % 4}" / f"v{i:02d}.avi"), frames)
    return str(root)


# -----------------------------------------------------------------------------
# naive references (each equation as an independent Python loop) and shared helpers

def naive_decayed_infonce(q, k, queue, age, tau, decay):
    """Eq 6 written out, one sample and one negative at a time, in float64."""
    losses = []
    for n in range(q.shape[0]):
        qn = [float(v) for v in q[n]]
        pos = math.exp(sum(a * b for a, b in zip(qn, k[n].tolist())) / tau)
        neg = 0.0
        for i in range(queue.shape[1]):
            dot = sum(a * b for a, b in zip(qn, queue[:, i].tolist()))
            neg += decay ** int(age[i]) * math.exp(dot / tau)
        losses.append(-math.log(pos / (pos + neg)))
    return sum(losses) / len(losses)


def random_unit(*shape, dim):
    return F.normalize(torch.randn(*shape), dim=dim)


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def naive_nt_xent(z1, z2, tau, clips=None):
    """SimCLR's loss written out, one view and one other view at a time, in float64. Views 0..B-1
    are z1's rows, B..2B-1 z2's; the loss and accuracy are averaged over both views of `clips`
    (default: all B clips)."""
    b = len(z1)
    views = [unit(v) for v in z1.double().tolist()] + [unit(v) for v in z2.double().tolist()]
    clips = range(b) if clips is None else clips
    losses, hits = [], []
    for i in [c for c in clips] + [c + b for c in clips]:
        positive = i + b if i < b else i - b
        sims = {j: dot(views[i], views[j]) / tau for j in range(2 * b) if j != i}
        denominator = sum(math.exp(s) for s in sims.values())
        losses.append(-math.log(math.exp(sims[positive]) / denominator))
        hits.append(max(sims, key=sims.get) == positive)
    return sum(losses) / len(losses), sum(hits) / len(hits)


def naive_cross_entropy(logits, labels):
    losses = []
    for row, label in zip(logits.double().tolist(), labels.tolist()):
        losses.append(-(row[label] - math.log(sum(math.exp(v) for v in row))))
    return sum(losses) / len(losses)


def clip_embedding(encoder, clip):
    """L2-normalised embedding of one clip (3, T, H, W), forwarded alone."""
    return F.normalize(encoder(clip[None]), dim=1)[0]


def fit_batchnorm(net, x):
    """Set BN running statistics to those of x (a D that has seen data), then eval mode."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()


def centre_clip(path, frames, stride, crop):
    """The evaluation clip of a video by hand: decode-count its frames, take the centre clip,
    resize and centre-crop -> (1, 3, T, crop, crop)."""
    with data.VideoReader(path) as reader:
        n = reader.count_frames()
    start = data.uniform_starts(n, (frames - 1) * stride + 1, 1)[0]
    return data.EvalTransform(crop)(read_clip(path, start, frames, stride))


def naive_bn_estimate(encoder, clips):
    """Precise BN for a set of clips that fits one batch: a copy of the encoder whose BN layers take
    that batch's statistics as their running statistics (momentum 1), in eval mode."""
    encoder = copy.deepcopy(encoder)
    for m in encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        encoder.train()(clips)
    return encoder.eval()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    out = [dataset[i][0] for i in range(len(samples))]
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
    port = _free_port()
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


# -----------------------------------------------------------------------------
# models.py: Eq 1, 5, 6

@pytest.mark.parametrize("decay", [0.9, 0.99, 0.99999, 1.0])
def test_decayed_infonce_matches_loop(decay):
    torch.manual_seed(0)
    q, k = random_unit(5, 8, dim=1), random_unit(5, 8, dim=1)
    queue = random_unit(8, 11, dim=0)
    age = torch.tensor([1, 2, 3, 5, 8, 13, 100, 1000, 20000, 65535, 65536])
    loss = models.decayed_infonce(q, k, queue, age, 0.07, decay)
    expected = naive_decayed_infonce(q.double(), k.double(), queue.double(), age, 0.07, decay)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_decay_changes_loss_only_through_negatives():
    torch.manual_seed(1)
    q, k, queue = random_unit(4, 8, dim=1), random_unit(4, 8, dim=1), random_unit(8, 6, dim=0)
    age = torch.arange(1, 7)
    plain = models.decayed_infonce(q, k, queue, age, 0.1, 1.0)
    decayed = models.decayed_infonce(q, k, queue, age, 0.1, 0.5)
    assert decayed < plain  # t^i < 1 shrinks the denominator, never the positive
    # the positive is not decayed: all-zero ages make Eq 6 equal Eq 1
    assert models.decayed_infonce(q, k, queue, torch.zeros(6, dtype=torch.long), 0.1, 0.5) == plain


def test_decay_one_is_moco_infonce_exactly():
    torch.manual_seed(2)
    q, k, queue = random_unit(6, 16, dim=1), random_unit(6, 16, dim=1), random_unit(16, 32, dim=0)
    age = torch.randint(1, 1000, (32,))
    loss = models.decayed_infonce(q, k, queue, age, 0.07, 1.0)
    # MoCo v1 builder + main_moco: logits = cat(l_pos, l_neg) / T, cross-entropy with label 0
    l_pos = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([l_pos, q @ queue], dim=1) / 0.07
    moco = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    assert torch.equal(loss, moco)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)
    moco_einsum = F.cross_entropy(torch.cat([l_pos, l_neg], 1) / 0.07,
                                  torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(loss, moco_einsum, atol=1e-7, rtol=0)


def test_chance_level_is_the_loss_of_equal_logits():
    age = torch.tensor([3, 1, 4, 2])
    for decay in (1.0, 0.9):
        q = F.normalize(torch.ones(2, 8), dim=1)
        # every logit 1 / tau
        loss = models.decayed_infonce(q, q, q[:1].T.expand(8, 4), age, 0.07, decay)
        assert models.infonce_chance(age, decay) == pytest.approx(loss.item(), rel=1e-5)
    assert models.infonce_chance(age, 1.0) == pytest.approx(math.log(5))


def test_decay_weights_and_oldest_key_of_full_queue():
    # t^i computed independently: the float t's exact value raised in 40-digit decimal arithmetic
    with decimal.localcontext() as exact:
        exact.prec = 40
        for t in ("0.99999", "0.999", "0.5"):
            age = torch.tensor([0, 1, 2, 7, 8000, 65535, 65536])
            weights = models.decay_weights(age, float(t))
            for a, w in zip(age.tolist(), weights.tolist()):
                exact_w = decimal.Decimal(float(t)) ** a
                assert w == pytest.approx(float(exact_w), rel=1e-13, abs=1e-300)
    assert models.decay_weights(torch.tensor([65536]), 0.99999).item() == pytest.approx(
        0.5193, abs=5e-5)  # Sec 4.3.2: t^65536 of the oldest key, about 0.52
    model = models.VideoMoCo(TINY, dim=4, K=65536)
    model.dequeue_and_enqueue(random_unit(256, 4, dim=1))
    assert int(model.queue_age.max()) == 65536
    assert sorted(model.queue_age.tolist()) == list(range(1, 65537))


# -----------------------------------------------------------------------------
# models.py: Eq 2

def test_momentum_update_matches_loop():
    torch.manual_seed(3)
    model = models.VideoMoCo(TINY, dim=8, K=16, m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
        for b in model.encoder_q.buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b))
    theta_k = [p.clone() for p in model.encoder_k.parameters()]
    theta_q = [p.clone() for p in model.encoder_q.parameters()]
    buffers_k = [b.clone() for b in model.encoder_k.buffers()]
    model.momentum_update()
    for p_k, old_k, p_q in zip(model.encoder_k.parameters(), theta_k, theta_q):
        torch.testing.assert_close(p_k, 0.9 * old_k + 0.1 * p_q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p_k, old_k)
        assert not p_k.requires_grad
    for b_k, old_b in zip(model.encoder_k.buffers(), buffers_k):  # as MoCo: parameters only
        assert torch.equal(b_k, old_b)


# -----------------------------------------------------------------------------
# models.py: queue and ages

def queue_fifo(model):
    """The keys' ids in FIFO order, oldest first (the slot at queue_ptr holds the oldest)."""
    ptr, K = int(model.queue_ptr), model.K
    slots = [(ptr + i) % K for i in range(K)]
    keys = [round(model.queue[0, j].item()) for j in slots]
    return keys, [int(model.queue_age[j]) for j in slots]


def test_queue_wraparound_and_ages():
    K, dim = 10, 3
    model = models.VideoMoCo(TINY, dim=dim, K=K)
    # initial keys: ids -K..-1 in slot order, enqueued one per step (slot 0 oldest)
    model.queue[:] = torch.arange(-K, 0, dtype=torch.float)
    fifo = [(i, -(K - 1) + j) for j, i in enumerate(range(-K, 0))]  # (id, step it was enqueued)
    assert queue_fifo(model)[1] == [K - j for j in range(K)]
    next_id, step = 0, 0
    for batch in (4, 4, 4, 4, 4, 13, 3, 7, 10):
        step += 1
        ids = list(range(next_id, next_id + batch))
        next_id += batch
        model.dequeue_and_enqueue(torch.tensor(ids, dtype=torch.float)[:, None].repeat(1, dim))
        fifo = (fifo + [(i, step) for i in ids])[-K:]
        got_ids, got_ages = queue_fifo(model)
        assert got_ids == [i for i, _ in fifo]
        assert int(model.queue_ptr) == (next_id + K) % K  # initial fill counts as K keys
        assert got_ages == list(range(K, 0, -1))  # rank, newest = 1
    # a batch of non-finite keys leaves the queue as it was (a diverged key encoder)
    before = copy.deepcopy(model.state_dict())
    model.dequeue_and_enqueue(torch.full((3, dim), float("nan")))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_queue_batch_larger_than_queue_keeps_newest():
    model = models.VideoMoCo(TINY, dim=2, K=5)
    model.dequeue_and_enqueue(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    keys = torch.arange(100, 112, dtype=torch.float)[:, None].repeat(1, 2)
    model.dequeue_and_enqueue(keys)
    ids, ages = queue_fifo(model)
    assert ids == list(range(107, 112))
    assert ages == [5, 4, 3, 2, 1]
    assert int(model.queue_ptr) == (2 + 12) % 5


def test_queue_state_is_in_state_dict():
    model = models.VideoMoCo(TINY, dim=4, K=8)
    model.dequeue_and_enqueue(random_unit(3, 4, dim=1))
    state = copy.deepcopy(model.state_dict())
    assert {"queue", "queue_ptr", "queue_age"} <= set(state)
    fresh = models.VideoMoCo(TINY, dim=4, K=8)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue, model.queue)
    assert int(fresh.queue_ptr) == 3
    assert torch.equal(fresh.queue_age, model.queue_age)


def test_eval_forward_leaves_queue_and_key_encoder():
    torch.manual_seed(4)
    model = models.VideoMoCo(TINY, dim=8, K=16).eval()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 4, 32, 32)
    model(x, x)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    model.train()
    model(x, x)
    assert int(model.queue_ptr) == 2
    assert not torch.equal(model.encoder_k.fc[0].weight, before["encoder_k.fc.0.weight"])


# -----------------------------------------------------------------------------
# models.py: Eq 3, generator

def test_drop_frames_hard_top_k():
    torch.manual_seed(5)
    n, t, k = 3, 8, 3
    x = torch.randn(n, 3, t, 6, 5)
    importance = torch.randn(n, t, requires_grad=True)
    x_query, mask = models.drop_frames(x, importance, k)
    assert x_query.shape == x.shape
    assert mask.shape == (n, t)
    for i in range(n):
        dropped = sorted(range(t), key=lambda j: -importance[i, j].item())[:k]
        for j in range(t):
            if j in dropped:
                assert mask[i, j].item() == 1.0
                assert torch.count_nonzero(x_query[i, :, j]) == 0
            else:
                assert mask[i, j].item() == 0.0
                assert torch.equal(x_query[i, :, j], x[i, :, j])
    assert torch.equal(mask.sum(1), torch.full((n,), float(k)))


def test_drop_frames_straight_through_gradient():
    torch.manual_seed(6)
    n, t, k, temperature = 2, 6, 2, 0.5
    x = torch.randn(n, 3, t, 4, 4)
    importance = torch.randn(n, t, requires_grad=True)
    weight = torch.randn_like(x)
    x_query, _ = models.drop_frames(x, importance, k, temperature)
    (x_query * weight).sum().backward()
    grad = importance.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # d/d importance_j = sum(-x_j * weight_j) * sigmoid'(z_j) / temperature,
    # z_j = (importance_j - thr) / temperature
    for i in range(n):
        values = sorted(importance[i].tolist(), reverse=True)
        thr = (values[k - 1] + values[k]) / 2
        for j in range(t):
            s = 1 / (1 + math.exp(-(importance[i, j].item() - thr) / temperature))
            expected = -(x[i, :, j] * weight[i, :, j]).sum().item() * s * (1 - s) / temperature
            assert grad[i, j].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_drop_frames_k_bounds():
    # k in 0..T-1: none dropped (the mask still (N, T)), up to all frames but one
    x = torch.randn(2, 3, 4, 8, 8)
    importance = torch.randn(2, 4)
    for drop, args in ((models.drop_frames, (x, importance)), (models.random_drop, (x,))):
        x_query, mask = drop(*args, 0)
        assert torch.equal(x_query, x) and torch.equal(mask, torch.zeros(2, 4))
        x_query, mask = drop(*args, 3)
        assert torch.equal(mask.sum(1), torch.full((2,), 3.0))
        assert (x_query.flatten(3).abs().sum((1, 3)) > 0).sum(1).tolist() == [1, 1]
        for k in (-1, 4):
            with pytest.raises(ValueError, match=f"needs 0 <= k < T, got k={k}, tau=4"):
                drop(*args, k)


def test_drop_frames_keep_the_clip_dtype():
    # under autocast the clip is bfloat16 and stays so (the mask is float32)
    x = torch.randn(2, 3, 4, 8, 8).bfloat16()
    assert models.drop_frames(x, torch.randn(2, 4), 1)[0].dtype == torch.bfloat16
    assert models.random_drop(x, 1)[0].dtype == torch.bfloat16


def test_random_drop():
    x = torch.randn(64, 3, 8, 4, 4)
    x_query, mask = models.random_drop(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(mask.sum(1), torch.full((64,), 2.0))
    dropped = mask.bool()
    assert torch.count_nonzero(x_query.transpose(1, 2)[dropped]) == 0
    assert torch.equal(x_query.transpose(1, 2)[~dropped], x.transpose(1, 2)[~dropped])
    assert mask.sum(0).min() > 0  # every position gets dropped somewhere: not a fixed choice
    again, mask_again = models.random_drop(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(mask, mask_again)


def test_videomoco_defaults_are_the_papers_and_its_queue_starts_as_moco_s():
    # Eq 1/2/6's constants: dim 128, K = 65536, m = 0.999, tau = 0.07, t = 0.99999 (Sec 4.2);
    # 2 shuffle-BN groups in a world of one. The queue starts as MoCo's: random unit columns,
    # every key older than the last (ages K..1); t outside (0, 1] is refused
    defaults = {name: p.default for name, p in
                inspect.signature(models.VideoMoCo).parameters.items() if name != "base_encoder"}
    assert defaults == dict(dim=128, K=65536, m=0.999, tau=0.07, decay=0.99999, shuffle_splits=2,
                            mlp=True)
    model = models.VideoMoCo(TINY, dim=8, K=16)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(16))
    assert model.queue_age.dtype == torch.long and model.queue_age.tolist() == list(range(16, 0, -1))
    for decay in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=re.escape("decay t of Eq 6 must be in (0, 1]")):
            models.VideoMoCo(TINY, dim=8, K=16, decay=decay)
    assert models.VideoMoCo(TINY, dim=8, K=16, decay=1.0).decay == 1.0


def test_generator_defaults_are_the_papers_convlstm():
    # Sec 3.2, 4.2: conv layers, an LSTM of 256 units, one importance score per frame of an RGB clip
    generator = models.ConvLSTMGenerator()
    assert generator.frame_features[0].in_channels == 3
    convs = [m for m in generator.frame_features if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [16, 32, 64, 64]
    assert all(m.stride == (2, 2) and m.padding == (1, 1) for m in convs)
    assert (generator.lstm.input_size, generator.lstm.hidden_size) == (64, 256)
    assert (generator.score.in_features, generator.score.out_features) == (256, 1)


@pytest.mark.parametrize("frames,crop", list(itertools.product([8, 16], [32, 48])))
def test_generator_any_length_and_crop(frames, crop):
    generator = models.ConvLSTMGenerator(hidden=32, width=8)
    importance = generator(torch.randn(2, 3, frames, crop, crop + 16))
    assert importance.shape == (2, frames)
    assert importance.dtype == torch.float32 and torch.isfinite(importance).all()


# -----------------------------------------------------------------------------
# models.py: gradient routing, and models.py alone

def adversarial_forward(model, generator, x, x_key, k):
    x_query, _ = models.drop_frames(x, generator(x), k)
    x_query_in = x_query.detach().requires_grad_()
    return model(x_query_in, x_key, x_full=x), x_query, x_query_in


def docstring_step():
    """The step of models.py's module docstring (its indented code block), as a script."""
    doc = models.__doc__
    block = doc[doc.index("The step, as MoCo's paper gives"):].split("\n\n", 1)[1]
    return textwrap.dedent(block)


LIFTED_CHECKS = """
assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_g"])
assert int(model.queue_ptr) == 8  # two steps of 4 keys
torch.manual_seed(0)  # the initial weights again: the block's first two constructions
model0 = models.VideoMoCo(torchvision.models.video.r2plus1d_18, dim=16, K=32, m=0.99)
generator0 = models.ConvLSTMGenerator(3, 16, 8)
assert any(not torch.equal(a, b) for a, b in zip(generator0.parameters(), generator.parameters()))
assert any(not torch.equal(a, b) for a, b in zip(model0.encoder_q.parameters(),
                                                 model.encoder_q.parameters()))
print("lifted", models.__file__)
"""


def test_models_py_alone_trains_videomoco_with_a_torchvision_encoder(tmp_path):
    # models.py is the file people copy: alone in an empty folder, the step of its docstring (with
    # torchvision's r2plus1d_18 as MoCo's base_encoder, a MoCo step and an adversarial step,
    # pretrain.train_step's written out) runs and trains both players
    shutil.copy(os.path.join(HERE, "models.py"), tmp_path / "models.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = docstring_step() + LIFTED_CHECKS
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"lifted {tmp_path / 'models.py'}"


def test_adversarial_backward_routes_losses():
    torch.manual_seed(7)
    model = models.VideoMoCo(TINY, dim=8, K=16)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    x, x_key = torch.randn(4, 3, 8, 32, 32), torch.randn(4, 3, 8, 32, 32)
    start = copy.deepcopy((model.state_dict(), generator.state_dict()))

    def run(backward):
        model.load_state_dict(start[0])
        generator.load_state_dict(start[1])
        model.zero_grad(set_to_none=True)
        generator.zero_grad(set_to_none=True)
        torch.manual_seed(8)  # the same key shuffle every time
        out, x_query, x_query_in = adversarial_forward(model, generator, x, x_key, 2)
        backward(out, x_query, x_query_in)
        return ([p.grad.clone() for p in model.encoder_q.parameters()],
                [None if p.grad is None else p.grad.clone() for p in generator.parameters()])

    def routed(out, x_query, x_query_in):
        models.adversarial_backward(out["loss_d"], out["loss_g"], x_query, x_query_in,
                                    model.encoder_q.parameters())
        assert x_query_in.grad is None  # loss_d's backward stops at D: no gradient of the clip

    routed_d, routed_g = run(routed)
    only_d, no_g = run(lambda o, xq, xin: o["loss_d"].backward())
    leaked_d, _ = run(lambda o, xq, xin: (o["loss_d"] + o["loss_g"]).backward())

    for routed, reference in zip(routed_d, only_d):
        torch.testing.assert_close(routed, reference, rtol=1e-6, atol=1e-9)
    # the test would see a leak
    assert any(not torch.allclose(a, b) for a, b in zip(leaked_d, only_d))
    assert all(g is None for g in no_g)  # loss_d alone never reaches G
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(torch.isfinite(g).all() for g in routed_g)
    assert sum(g.abs().sum() for g in routed_g) > 0

    # G's gradient is that of Eq 4 through D with G attached (no detach), D's grads discarded
    model.load_state_dict(start[0])
    generator.load_state_dict(start[1])
    torch.manual_seed(8)
    x_query, _ = models.drop_frames(x, generator(x), 2)
    out = model(x_query, x_key, x_full=x)
    reference_g = torch.autograd.grad(out["loss_g"], list(generator.parameters()))
    for routed, reference in zip(routed_g, reference_g):
        torch.testing.assert_close(routed, reference, rtol=1e-5, atol=1e-8)


def test_adversarial_backward_scales_both_losses():
    torch.manual_seed(9)
    model = models.VideoMoCo(TINY, dim=8, K=16).eval()
    generator = models.ConvLSTMGenerator(hidden=16, width=8).eval()
    x = torch.randn(2, 3, 8, 32, 32)
    grads = []
    for scale in (None, lambda loss: loss * 8.0):
        model.zero_grad(set_to_none=True)
        generator.zero_grad(set_to_none=True)
        out, x_query, x_query_in = adversarial_forward(model, generator, x, x, 2)
        models.adversarial_backward(out["loss_d"], out["loss_g"], x_query, x_query_in,
                                    model.encoder_q.parameters(), scale=scale)
        grads.append([p.grad.clone() for p in itertools.chain(model.encoder_q.parameters(),
                                                              generator.parameters())])
    for plain, scaled in zip(*grads):
        torch.testing.assert_close(scaled, 8.0 * plain, rtol=1e-5, atol=1e-9)


def flash_clips(gen, n, frames=16, k=4):
    """Clips that are one still image plus noise but for k random frames per clip, which are strong
    noise "flashes": removing the flashes moves D's feature most, so G has something to find."""
    still = torch.randn(n, 3, 1, 32, 32, generator=gen).expand(n, 3, frames, 32, 32) * 0.3
    x = still + 0.05 * torch.randn(n, 3, frames, 32, 32, generator=gen)
    flashes = torch.rand(n, frames, generator=gen).argsort(dim=1)[:, :k]
    mask = torch.zeros(n, frames).scatter_(1, flashes, 1.0)[:, None, :, None, None]
    return x * (1 - mask) + 2 * torch.randn(n, 3, frames, 32, 32, generator=gen) * mask


def eq4_distance(model, x, x_query):
    """E |D(x_query) - D(x)|_1 over the batch, Eq 4's distance, without gradient."""
    with torch.no_grad():
        q, q_full = (F.normalize(model.encoder_q(c), dim=1) for c in (x_query, x))
    return (q - q_full).abs().sum(dim=1).mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generator_trained_against_a_fixed_d_drops_frames_that_move_d_more_than_random(seed):
    # Table 1's claim, at the scale of a test: 15 steps of G on Eq 4 through
    # models.adversarial_backward (the straight-through drop), D fixed. On fresh clips, G's k drops
    # must move D at least 1.5x as far as k random drops (measured
    # 2.0-2.3 on seeds 0-3; 0.35-1.9 before training).
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = models.VideoMoCo(TINY, dim=16, K=32)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    fit_batchnorm(model.encoder_q, flash_clips(gen, 32))
    model.eval()
    optimizer = torch.optim.SGD(generator.parameters(), lr=0.1, momentum=0.9)
    for _ in range(15):
        x = flash_clips(gen, 8)
        optimizer.zero_grad()
        out, x_query, x_query_in = adversarial_forward(model, generator, x, x, 4)
        models.adversarial_backward(out["loss_d"], out["loss_g"], x_query, x_query_in,
                                    model.encoder_q.parameters())
        optimizer.step()
    x = flash_clips(torch.Generator().manual_seed(1000 + seed), 32)
    with torch.no_grad():
        by_g = eq4_distance(model, x, models.drop_frames(x, generator.eval()(x), 4)[0])
    at_random = eq4_distance(model, x,
                             models.random_drop(x, 4, torch.Generator().manual_seed(seed))[0])
    assert by_g > 1.5 * at_random, (by_g, at_random)


def test_generator_loss_is_eq4_negated_against_a_loop():
    gen = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(5, 7, generator=gen), dim=1)
    q_full = F.normalize(torch.randn(5, 7, generator=gen), dim=1)
    expected = sum(sum(abs(a - b) for a, b in zip(row, row_full))
                   for row, row_full in zip(q.tolist(), q_full.tolist())) / 5
    # G maximises Eq 4
    assert models.generator_loss(q, q_full).item() == pytest.approx(-expected, rel=1e-6)
    assert models.generator_loss(q, q).item() == 0


# -----------------------------------------------------------------------------
# models.py: shuffle-BN

def test_encode_key_restores_order_in_eval_mode():
    torch.manual_seed(10)
    model = models.VideoMoCo(TINY, dim=8, K=16, shuffle_splits=2).eval()
    fit_batchnorm(model.encoder_k, torch.randn(4, 3, 4, 32, 32))
    x = torch.randn(6, 3, 4, 32, 32)
    keys = F.normalize(model.encode_key(x), dim=1)
    for i in range(6):
        expected = F.normalize(model.encoder_k(x[i:i + 1]), dim=1)[0]
        torch.testing.assert_close(keys[i], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(6))


@pytest.mark.parametrize("splits", [2, 4])
def test_shuffle_bn_emulation_normalises_like_separate_processes_in_train_mode(splits):
    # With --shuffle-splits S in a world of one, the queries are normalised in S contiguous
    # sub-batches, as S processes would normalise their own shards, and the keys in S sub-batches of
    # a shuffled batch (MoCo's single-GPU demo, SplitBatchNorm).
    # Train mode: BN uses batch statistics.
    torch.manual_seed(12)
    model = models.VideoMoCo(TINY, dim=8, K=16, shuffle_splits=splits, m=0.5).train()
    x = torch.randn(8, 3, 4, 32, 32)
    with torch.no_grad():
        q = model.encode_query(x)
        size = 8 // splits
        per_process = torch.cat([model.encoder_q(x[i:i + size]) for i in range(0, 8, size)])
        whole_batch = model.encoder_q(x)
    torch.testing.assert_close(q, per_process, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(q, whole_batch, atol=1e-3)
    # the training step's queries are the per-process ones
    out = model(x, torch.randn(8, 3, 4, 32, 32))
    torch.testing.assert_close(out["q"], F.normalize(per_process, dim=1), rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():  # eval mode: running statistics, no split needed
        torch.testing.assert_close(model.encode_query(x), model.encoder_q(x), rtol=1e-5, atol=1e-6)


def test_encode_key_uses_sub_batch_statistics_in_train_mode():
    model = models.VideoMoCo(TINY, dim=8, K=16, shuffle_splits=2).train()
    x = torch.randn(6, 3, 4, 32, 32)
    torch.manual_seed(11)
    keys = F.normalize(model.encode_key(x), dim=1)
    with torch.no_grad():
        one_batch = F.normalize(model.encoder_k(x), dim=1)
        torch.manual_seed(11)
        perm = torch.randperm(6)
        halves = [model.encoder_k(x[perm[:3]]), model.encoder_k(x[perm[3:]])]
    by_halves = F.normalize(torch.cat(halves)[perm.argsort()], dim=1)
    assert not torch.allclose(keys, one_batch, atol=1e-3)
    torch.testing.assert_close(keys, by_halves, rtol=1e-5, atol=1e-6)


def test_a_process_group_of_one_is_a_world_of_one(tmp_path):
    # DDP on one GPU initialises a group of one: the shuffle-BN emulation must stay (no peer to
    # shuffle with), the same keys and queries as with no group at all
    torch.manual_seed(14)
    model = models.VideoMoCo(TINY, dim=8, K=16, shuffle_splits=2).train()
    x = torch.randn(6, 3, 4, 32, 32)
    outputs = []
    for group in (False, True):
        if group:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                    world_size=1)
        try:
            torch.manual_seed(15)  # the key shuffle's permutation
            with torch.no_grad():
                outputs.append((model.encode_key(x), model.encode_query(x)))
        finally:
            if group:
                dist.destroy_process_group()
    for alone, in_group in zip(*outputs):
        torch.testing.assert_close(in_group, alone, rtol=0, atol=0)


def _distributed_worker(rank, world_size, port, x, keys, state, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = models.VideoMoCo(TINY, dim=4, K=7).eval()
    model.load_state_dict(state)
    n = x.shape[0] // world_size
    local = slice(rank * n, (rank + 1) * n)
    torch.manual_seed(rank)  # the shuffle must come from rank 0's permutation, not the local seed
    encoded = F.normalize(model.encode_key(x[local]), dim=1)
    model.dequeue_and_enqueue(keys[local])
    torch.save({"keys": encoded, "queue": model.queue, "age": model.queue_age,
                "ptr": model.queue_ptr}, os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_shuffle_and_enqueue(tmp_path):
    torch.manual_seed(12)
    model = models.VideoMoCo(TINY, dim=4, K=7).eval()
    x, keys = torch.randn(6, 3, 4, 32, 32), torch.arange(6.0)[:, None].repeat(1, 4)
    mp.spawn(_distributed_worker,
             args=(2, _free_port(), x, keys, model.state_dict(), str(tmp_path)),
             nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    with torch.no_grad():
        expected = torch.cat([F.normalize(model.encoder_k(x[i:i + 1]), dim=1) for i in range(6)])
    torch.testing.assert_close(torch.cat([r["keys"] for r in results]), expected,
                               rtol=1e-5, atol=1e-6)
    model.dequeue_and_enqueue(keys)  # one process, the global batch in rank order
    for r in results:
        assert torch.equal(r["queue"], model.queue)
        assert torch.equal(r["age"], model.queue_age)
        assert torch.equal(r["ptr"], model.queue_ptr)


def _shuffle_bn_worker(rank, world_size, port, x, state, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = models.VideoMoCo(TINY, dim=4, K=7).train()
    model.load_state_dict(state)
    n = x.shape[0] // world_size
    local = x[rank * n:(rank + 1) * n]
    torch.manual_seed(100 + rank)  # rank 0's permutation is the one drawn after manual_seed(100)
    with torch.no_grad():
        keys = model.encode_key(local)
        queries = model.encode_query(local)
    torch.save({"keys": keys, "queries": queries}, os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_shuffle_bn_matches_per_process_batches(tmp_path):
    # MoCo's shuffle-BN in train mode, 2 gloo processes of 4 clips: each process normalises a shard
    # of the globally shuffled batch (rank 0's permutation) with that shard's batch statistics, and
    # gets its own clips' keys back in order; the queries use each process's own batch
    torch.manual_seed(13)
    model = models.VideoMoCo(TINY, dim=4, K=7)
    x = torch.randn(8, 3, 4, 32, 32)
    mp.spawn(_shuffle_bn_worker, args=(2, _free_port(), x, model.state_dict(), str(tmp_path)),
             nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    torch.manual_seed(100)
    perm = torch.randperm(8)
    encoder_k, encoder_q = model.encoder_k.train(), model.encoder_q.train()
    with torch.no_grad():
        shuffled = torch.cat([encoder_k(x[perm[:4]]), encoder_k(x[perm[4:]])])
        expected = shuffled[perm.argsort()]
        unshuffled = torch.cat([encoder_k(x[:4]), encoder_k(x[4:])])
        queries = torch.cat([encoder_q(x[:4]), encoder_q(x[4:])])
    assert not torch.equal(perm, torch.arange(8))
    assert not torch.allclose(expected, unshuffled, atol=1e-3)  # the shuffle changes the keys
    torch.testing.assert_close(torch.cat([r["keys"] for r in results]), expected,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["queries"] for r in results]), queries,
                               rtol=1e-5, atol=1e-6)

# -----------------------------------------------------------------------------
# models.py: encoders, residual input, the projection head

TORCHVISION_ARCHS = ("r3d_18", "r2plus1d_18", "mc3_18")


@pytest.mark.parametrize("arch", models.ARCHS)
def test_encoder_shapes(arch):
    torch.manual_seed(13)
    encoder = models.build_encoder(arch, 16).eval()
    with torch.no_grad():
        for shape in [(2, 3, 4, 32, 32), (1, 3, 5, 32, 48)]:
            assert encoder(torch.randn(shape)).shape == (shape[0], 16)
        assert isinstance(encoder.fc, nn.Linear) and encoder.fc.out_features == 16
        width = encoder.fc.in_features
        encoder.fc = nn.Identity()
        assert encoder(torch.randn(2, 3, 4, 32, 32)).shape == (2, width)
    print(arch, "parameters without fc:", models.count_parameters(encoder))


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS + ("r3d_10", "r2plus1d_10"))
def test_encoder_state_dict_loads_into_torchvision(arch):
    encoder = models.build_encoder(arch, 16)
    if arch in TORCHVISION_ARCHS:
        reference = getattr(torchvision.models.video, arch)(num_classes=16)
    elif arch == "r3d_10":
        reference = VideoResNet(BasicBlock, [Conv3DSimple] * 4, [1, 1, 1, 1], BasicStem,
                                num_classes=16)
    else:
        reference = VideoResNet(BasicBlock, [Conv2Plus1D] * 4, [1, 1, 1, 1], R2Plus1dStem,
                                num_classes=16)
    reference.load_state_dict(encoder.state_dict(), strict=True)
    assert models.count_parameters(reference) == models.count_parameters(encoder)


def test_parameter_counts():
    counts = {}
    for arch in ("r3d_10", "r2plus1d_10"):
        encoder = models.build_encoder(arch, 128)
        counts[arch] = models.count_parameters(encoder) - models.count_parameters(encoder.fc)
    print("parameters without fc:", counts)
    assert counts == {"r3d_10": 14_361_792, "r2plus1d_10": 12_487_005}


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="r2plus1d_10") as error:
        models.build_encoder("resnet50", 8)
    assert "\n" not in str(error.value)


def test_residual_frames_are_differences_of_the_augmented_frames():
    x = torch.randn(2, 3, 5, 4, 4)
    d = models.residual_frames(x)
    assert d.shape == x.shape
    for n in range(2):
        for t in range(5):
            # last: repeated
            expected = x[n, :, t + 1] - x[n, :, t] if t < 4 else x[n, :, 4] - x[n, :, 3]
            assert torch.equal(d[n, :, t], expected)
    torch.manual_seed(0)
    rgb = models.build_encoder("tiny", 8).eval()
    residual = models.encoder_builder("tiny", input="residual")(num_classes=8).eval()
    assert residual.input_mode == "residual"
    residual.load_state_dict(rgb.state_dict())  # same parameters, same keys: the mode is no weight
    clip = torch.randn(2, 3, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(residual(clip), rgb(models.residual_frames(clip)))
        # static appearance is invisible to it: two motionless clips of different content look alike
        still_a = torch.randn(2, 3, 1, 32, 32).expand(-1, -1, 6, -1, -1)
        still_b = torch.randn(2, 3, 1, 32, 32).expand(-1, -1, 6, -1, -1)
        assert torch.equal(residual(still_a), residual(still_b))
        assert not torch.allclose(rgb(still_a), rgb(still_b))


def test_linear_head_learns_noise_patterns_where_the_classifier_init_collapses():
    # The cause of the pretraining that did not learn, isolated (issue 10's 30-line MoCo loop): 64
    # noise patterns, two noisy views each, K 128. The same linear head memorises them with
    # nn.Linear's init and collapses to ln(K+1) with the normal(0, 0.01) init of 385ac2d.
    def loss_over_chance(classifier_init):
        torch.manual_seed(0)
        model = models.VideoMoCo(TINY, dim=128, K=128, m=0.99, tau=0.07, decay=1.0, mlp=False)
        if classifier_init:
            for enc in (model.encoder_q, model.encoder_k):
                nn.init.normal_(enc.fc.weight, 0, 0.01)
                nn.init.zeros_(enc.fc.bias)
        patterns = torch.randn(64, 3, 8, 32, 32)
        opt = torch.optim.SGD(model.encoder_q.parameters(), 0.05, momentum=0.9, weight_decay=1e-4)
        losses = []
        for _ in range(48):
            x = patterns[torch.randperm(64)[:16]]
            out = model(x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x))
            opt.zero_grad()
            out["loss_d"].backward()
            opt.step()
            losses.append(out["loss_d"].item())
        return sum(losses[-12:]) / 12 / math.log(129)

    assert loss_over_chance(classifier_init=False) < 0.5  # measured 0.16
    assert loss_over_chance(classifier_init=True) > 0.95  # measured 1.00: collapsed


def test_projection_head_has_nn_linear_default_init_not_the_classifier_init():
    # A head with torchvision's video classifier init, normal(0, 0.01), has 6-25x the effective
    # learning rate of nn.Linear's default on an L2-normalised
    # output, and collapses (projection_head)
    torch.manual_seed(0)
    for mlp in (False, True):
        model = models.VideoMoCo(TINY, dim=128, K=16, mlp=mlp)
        linears = [m for m in model.encoder_q.fc.modules() if isinstance(m, nn.Linear)]
        assert len(linears) == (2 if mlp else 1)
        for layer in linears:
            # std of U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            expected = 1 / math.sqrt(3 * layer.in_features)
            assert layer.weight.std().item() == pytest.approx(expected, rel=0.1)
    cvrl_fc = methods.CVRL(TINY, dim=8, hidden=32).encoder_q.fc
    default_std = 1 / math.sqrt(3 * cvrl_fc.in_features)
    assert cvrl_fc.weight.std().item() == pytest.approx(default_std, rel=0.1)


def test_mlp_head_is_linear_relu_linear():
    # MoCo v2's head: without its ReLU the two layers are one linear map (mutmut: the ReLU removed)
    torch.manual_seed(0)
    head = models.projection_head(12, 5, mlp=True)
    x = torch.randn(7, 12)
    first, last = head[0], head[-1]
    expected = F.linear(F.linear(x, first.weight, first.bias).clamp(min=0), last.weight, last.bias)
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_encoders_are_built_as_torchvision_builds_and_initialises_them():
    # the 18-layer archs are torchvision's own, with the given classes; the tiny encoder has no
    # conv bias and VideoResNet's init: kaiming normal (fan_out, relu) convs, normal(0, 0.01) fc
    for arch in ("r3d_18", "r2plus1d_18", "mc3_18"):
        encoder = models.build_encoder(arch, 7)
        reference = getattr(torchvision.models.video, arch)(weights=None, num_classes=7)
        assert type(encoder) is type(reference) and encoder.fc.out_features == 7
        assert [n for n, _ in encoder.named_parameters()] == [
            n for n, _ in reference.named_parameters()]
    torch.manual_seed(0)
    encoder = models.build_encoder("tiny", 9)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(m.bias is None for m in convs)
    # its docstring's four stages, the stem keeping the time axis at full length
    assert [(m.out_channels, m.kernel_size, m.stride, m.padding) for m in convs] == [
        (16, (3, 3, 3), (1, 2, 2), (1, 1, 1))] + [
        (c, (3, 3, 3), (2, 2, 2), (1, 1, 1)) for c in (32, 64, 128)]
    for m in convs[1:]:  # enough weights for a std within 10 %
        fan_out = m.out_channels * math.prod(m.kernel_size)
        assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
        assert abs(m.weight.mean().item()) < 0.1 * math.sqrt(2 / fan_out)
    assert encoder.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert abs(encoder.fc.weight.mean().item()) < 0.002
    assert torch.equal(encoder.fc.bias, torch.zeros(9))


# -----------------------------------------------------------------------------
# models.py: mixed precision

def test_autocast_bfloat16_forward():
    torch.manual_seed(14)
    model = models.VideoMoCo(TINY, dim=8, K=16)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    x = torch.randn(4, 3, 8, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, x_query, x_query_in = adversarial_forward(model, generator, x, x, 2)
    assert out["loss_d"].dtype == torch.float32 and torch.isfinite(out["loss_d"])
    assert out["loss_g"].dtype == torch.float32 and torch.isfinite(out["loss_g"])
    assert model.queue.dtype == torch.float32 and int(model.queue_ptr) == 4
    models.adversarial_backward(out["loss_d"], out["loss_g"], x_query, x_query_in,
                                model.encoder_q.parameters())
    assert all(torch.isfinite(p.grad).all() for p in generator.parameters())


# -----------------------------------------------------------------------------
# methods.py: the positive pairs of CVRL and VCLR

@pytest.mark.parametrize("shape", methods.INTERVALS)
def test_cvrl_interval_distribution_matches_its_definition(shape):
    rng = np.random.default_rng(0)
    n, span, draws = 60, 11, 20000
    last = n - span
    d = []
    for _ in range(draws):
        a, b = methods.cvrl_starts(rng, n, span, shape)
        assert 0 <= a <= last and 0 <= b <= last
        d.append(abs(b - a))
    counts = np.bincount(d, minlength=last + 1)
    # the definition, written out: weight of distance d
    weight = np.array([{"linear": last + 1 - k, "quadratic": (last + 1 - k) ** 2,
                        "uniform": 1}[shape]
                       for k in range(last + 1)], dtype=float)
    expected = draws * weight / weight.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 100  # df = 49: p ~ 3e-5 under the null; a wrong shape gives thousands
    if shape != "uniform":
        wrong = draws * np.ones(last + 1) / (last + 1)
    else:
        wrong = draws * weight[::-1] / weight.sum()
    assert shape == "uniform" or ((counts - wrong) ** 2 / wrong).sum() > 1000
    if shape != "uniform":
        assert np.all(np.diff(methods.interval_probs(last, shape)) < 0)  # monotonically decreasing


def naive_tuple_candidates(n, span, segments):
    """The start frames a clip of segment j of VCLR's tuple may take, by a loop over the frames: a
    frame f is in segment j when j n / S <= f < (j + 1) n / S; the starts whose clip ends inside
    the segment where two or more do, else the segment's starts whose clip ends in the video (or
    its first frame if none)."""
    out = []
    for j in range(segments):
        frames = [f for f in range(n) if j * n / segments <= f < (j + 1) * n / segments]
        inside = [f for f in frames if f + span - 1 <= frames[-1]]
        out.append(inside if len(inside) >= 2 else
                   [f for f in frames if f + span <= n] or frames[:1])
    return out


@pytest.mark.parametrize("n,span,segments", [(90, 8, 3), (100, 16, 4), (31, 4, 3), (48, 16, 3),
                                             (7, 4, 3)])
def test_tuple_starts_are_distinct_uniform_draws_of_each_segment(n, span, segments):
    # (48, 16, 3): no segment holds two clips, so they run on; (7, 4, 3): the last segment offers
    # one start only, which anchor and positive then share
    rng = np.random.default_rng(1)
    candidates = naive_tuple_candidates(n, span, segments)
    counts = [dict.fromkeys(c, 0) for c in candidates]
    for _ in range(3000):
        anchor, positive, distinct = methods.tuple_starts(rng, n, span, segments)
        assert distinct == all(len(c) >= 2 for c in candidates)
        for j, (a, p) in enumerate(zip(anchor, positive)):
            assert a in candidates[j] and p in candidates[j]
            assert a != p or len(candidates[j]) == 1  # two distinct positions where there are two
            counts[j][a] += 1
            counts[j][p] += 1
    for c in counts:  # each start as likely as the others: chi-square against uniform
        observed = np.array(list(c.values()), float)
        expected = observed.sum() / len(observed)
        assert ((observed - expected) ** 2 / expected).sum() < 3 * len(observed) + 30


def test_order_shuffle_is_never_the_order_or_its_reverse():
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(400):
        perm, shuffled = methods.order_shuffle(rng, 3)
        assert shuffled == (perm != [0, 1, 2]) and perm != [2, 1, 0]
        seen.add(tuple(perm))
    assert seen == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1)}
    with pytest.raises(ValueError, match="at least 3 segments"):
        methods.order_shuffle(rng, 2)


class _NoAugment:
    """Frames to a normalised tensor untouched, so the test can read the frame indices back."""
    crop = 48

    def __call__(self, frames, rng):
        return data.to_tensor(frames)


def test_vclr_tuples_have_one_clip_per_segment_and_order_labels_match_the_shuffle(tmp_path):
    path = write_index_video(str(tmp_path / "v.avi"), 120)
    dataset = data.VideoClips([(path, 0)], frames=4, stride=1, transform=_NoAugment(),
                              pair=methods.VCLRTuples(3))
    labels = set()
    for seed in range(40):
        sample, = dataset[(0, seed)]
        video = sample["video"]  # (2, S, 3, T, H, W)
        assert video.shape[:4] == (2, 3, 3, 4)
        shuffled, by_segment = [], []
        for tuple_, segments in zip(video, sample["segments"].tolist()):
            starts = []
            for clip in tuple_:
                frames = (data.denormalize(clip).clamp(0, 1) * 255).round().byte()
                frames = frames.permute(1, 2, 3, 0).numpy()
                idx = [frame_index(f) for f in frames]
                assert idx == list(range(idx[0], idx[0] + 4))  # a clip of consecutive frames
                starts.append(idx[0])
            assert sorted(s // 40 for s in starts) == [0, 1, 2]  # one clip in each segment
            assert [s // 40 for s in starts] == segments  # and "segments" says which
            shuffled.append(starts != sorted(starts))
            by_segment.append(sorted(starts))
        # the anchor's and the positive's clip of a segment start at distinct frames
        assert all(a != p for a, p in zip(*by_segment))
        assert sample["order"] == int(shuffled[0]) + 2 * int(shuffled[1])
        labels.add(sample["order"])
    assert labels == {0, 1, 2, 3}


def test_cvrl_pair_clips_come_from_two_positions(tmp_path):
    path = write_index_video(str(tmp_path / "v.avi"), 100)
    dataset = data.VideoClips([(path, 0)], frames=4, stride=1, transform=_NoAugment(),
                              pair=methods.CVRLPair())
    distances = []
    for seed in range(30):
        video = dataset[(0, seed)][0]["video"]  # (2, 3, T, H, W)
        firsts = [(data.denormalize(v[:, 0]).clamp(0, 1) * 255).round().byte() for v in video]
        first = [frame_index(f.permute(1, 2, 0).numpy()) for f in firsts]
        distances.append(abs(first[0] - first[1]))
    # decreasing: short distances dominate
    assert max(distances) > 0 and np.mean(distances) < (100 - 4) / 2


# -----------------------------------------------------------------------------
# methods.py: nt_xent (CVRL / SimCLR)

@pytest.mark.parametrize("n", [1, 3, 6])
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop(n, tau):
    torch.manual_seed(20 + n)
    z1, z2 = torch.randn(n, 8) * 3, torch.randn(n, 8)  # not normalised: nt_xent normalises
    loss, acc = methods.nt_xent(z1, z2, tau)
    expected_loss, expected_acc = naive_nt_xent(z1, z2, tau)
    assert loss.dtype == torch.float32 and not acc.requires_grad
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    assert acc.item() == pytest.approx(expected_acc)
    if n == 1:
        assert loss.item() == pytest.approx(0.0, abs=1e-6)  # the positive is the only other view


def test_nt_xent_accuracy_matches_loop():
    torch.manual_seed(21)
    z1 = torch.randn(8, 4)
    # half of the second views are near their first view, half
    # random: accuracy strictly inside (0, 1)
    z2 = torch.cat([z1[:4] + 0.05 * torch.randn(4, 4), torch.randn(4, 4)])
    loss, acc = methods.nt_xent(z1, z2, 0.2)
    expected_loss, expected_acc = naive_nt_xent(z1, z2, 0.2)
    assert 0 < expected_acc < 1
    assert acc.item() == pytest.approx(expected_acc)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)


def test_nt_xent_swapping_views_or_clips_keeps_the_loss():
    torch.manual_seed(22)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    loss, _ = methods.nt_xent(z1, z2, 0.1)
    perm = torch.randperm(5)
    torch.testing.assert_close(methods.nt_xent(z2, z1, 0.1)[0], loss)
    torch.testing.assert_close(methods.nt_xent(z1[perm], z2[perm], 0.1)[0], loss)
    # pairing matters: shifting the second views pairs every clip with another clip's view
    assert not torch.allclose(methods.nt_xent(z1, z2.roll(1, 0), 0.1)[0], loss)


def reference_rows_loss(z1, z2, tau, clips):
    """The loss of nt_xent averaged over the views of `clips` only, against the whole batch, in
    torch ops (differentiable), float64."""
    b = z1.shape[0]
    views = F.normalize(torch.cat([z1, z2]).double(), dim=1)  # (2B, dim)
    anchors = torch.tensor(list(clips) + [c + b for c in clips])
    logits = views[anchors] @ views.T / tau
    logits[torch.arange(len(anchors)), anchors] = float("-inf")
    return F.cross_entropy(logits, (anchors + b) % (2 * b))


def _nt_xent_worker(rank, world_size, port, z1, z2, tau, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    n = z1.shape[0] // world_size
    local = slice(rank * n, (rank + 1) * n)
    z1_local = z1[local].clone().requires_grad_()
    z2_local = z2[local].clone().requires_grad_()
    loss, acc = methods.nt_xent(z1_local, z2_local, tau)
    loss.backward()
    torch.save({"loss": loss.detach(), "acc": acc, "grad1": z1_local.grad, "grad2": z2_local.grad},
               os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_nt_xent_distributed_matches_global_batch(tmp_path):
    torch.manual_seed(23)
    world, n, tau = 2, 3, 0.2
    z1 = torch.randn(world * n, 8)
    # some easy, some hard pairs
    z2 = torch.cat([z1[:2] + 0.1 * torch.randn(2, 8), torch.randn(4, 8)])
    mp.spawn(_nt_xent_worker, args=(world, _free_port(), z1, z2, tau, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]

    # each rank's loss: its own views against all 2B - 1 other views of the global batch
    for rank, r in enumerate(results):
        clips = range(rank * n, (rank + 1) * n)
        expected_loss, expected_acc = naive_nt_xent(z1, z2, tau, clips)
        assert r["loss"].item() == pytest.approx(expected_loss, rel=1e-5)
        assert r["acc"].item() == pytest.approx(expected_acc)
    global_loss = methods.nt_xent(z1, z2, tau)[0]
    mean_loss = (sum(r["loss"] for r in results) / world).item()
    assert mean_loss == pytest.approx(global_loss.item(), rel=1e-5)

    # Gradient: each rank backpropagates its own loss L_r, and gather_with_grad sums the gradients
    # of all ranks' losses into the owner's rows, so grad_r = d(sum_r L_r)/dz_r = world * dL/dz_r
    # with L the global mean. DDP then averages the parameter
    # gradients over ranks: the result is dL/dtheta.
    g1, g2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    methods.nt_xent(g1, g2, tau)[0].backward()
    for rank, r in enumerate(results):
        local = slice(rank * n, (rank + 1) * n)
        torch.testing.assert_close(r["grad1"], world * g1.grad[local], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["grad2"], world * g2.grad[local], rtol=1e-4, atol=1e-6)
        # a gather whose backward keeps only the local loss's gradient (the frequent SimCLR bug)
        # would give this instead, which differs: the other rank's negatives push on our rows too
        l1, l2 = z1.clone().double().requires_grad_(), z2.clone().double().requires_grad_()
        keep = torch.zeros(world * n, 1, dtype=torch.double)
        keep[local] = 1
        only_local = reference_rows_loss(l1 * keep + (l1 * (1 - keep)).detach(),
                                         l2 * keep + (l2 * (1 - keep)).detach(), tau,
                                         range(rank * n, (rank + 1) * n))
        only_local.backward()
        assert not torch.allclose(r["grad1"].double(), l1.grad[local], rtol=1e-3, atol=1e-5)


# -----------------------------------------------------------------------------
# methods.py: CVRL

def test_cvrl_structure_and_gradients():
    torch.manual_seed(24)
    model = methods.CVRL(TINY, dim=8, hidden=32)
    assert isinstance(model.encoder_q.fc, nn.Linear) and model.encoder_q.fc.out_features == 32
    assert [type(m) for m in model.head] == [nn.BatchNorm1d, nn.ReLU, nn.Linear,
                                             nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert model.head[-1].out_features == 8 and model.tau == 0.1
    assert not hasattr(model, "queue") and not hasattr(model, "encoder_k")
    out = model(torch.randn(4, 3, 4, 16, 16), torch.randn(4, 3, 4, 16, 16))
    assert torch.isfinite(out["loss_d"]) and not out["acc"].requires_grad
    out["loss_d"].backward()
    for name, param in [("conv", model.encoder_q.features[0].weight),
                        ("fc", model.encoder_q.fc.weight),
                        ("hidden", model.head[2].weight), ("last", model.head[5].weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert_exports_a_plain_backbone(model.encoder_q)  # as VideoMoCo's


def test_cvrl_forward_is_nt_xent_of_the_two_clips():
    torch.manual_seed(25)
    model = methods.CVRL(TINY, dim=8, hidden=32, tau=0.2)
    projector = nn.Sequential(model.encoder_q, model.head)
    fit_batchnorm(projector, torch.randn(8, 3, 4, 16, 16))
    x1, x2 = torch.randn(4, 3, 4, 16, 16), torch.randn(4, 3, 4, 16, 16)
    out = model(x1, x2)
    with torch.no_grad():
        z1 = torch.cat([projector(x1[i:i + 1]) for i in range(4)])
        z2 = torch.cat([projector(x2[i:i + 1]) for i in range(4)])
    expected_loss, expected_acc = naive_nt_xent(z1, z2, 0.2)
    assert out["loss_d"].item() == pytest.approx(expected_loss, rel=1e-4)
    assert out["acc"].item() == pytest.approx(expected_acc)


def test_cvrl_identical_clips_give_a_lower_loss():
    torch.manual_seed(26)
    model = methods.CVRL(TINY, dim=8, hidden=32)
    fit_batchnorm(nn.Sequential(model.encoder_q, model.head), torch.randn(8, 3, 4, 16, 16))
    x = torch.randn(6, 3, 4, 16, 16)
    with torch.no_grad():
        same = model(x, x.clone())
        independent = model(x, torch.randn(6, 3, 4, 16, 16))
    assert same["loss_d"] < independent["loss_d"]
    assert same["acc"].item() == 1.0


def test_cvrl_normalises_over_the_global_batch_under_ddp_on_cuda_only():
    lines = []
    bn = lambda m: [type(x) for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
    cvrl = methods.global_batchnorm(methods.CVRL(TINY, dim=8, hidden=16), "cvrl",
                                    torch.device("cuda"), 2, lines.append)
    assert set(bn(cvrl)) == {nn.SyncBatchNorm}
    for method, device, world in (("cvrl", "cpu", 2), ("cvrl", "cuda", 1),
                                  ("videomoco", "cuda", 2)):
        if method == "cvrl":
            model = methods.CVRL(TINY, dim=8, hidden=16)
        else:
            model = models.VideoMoCo(TINY, dim=8, K=16)
        device = torch.device(device)
        converted = methods.global_batchnorm(model, method, device, world, lines.append)
        assert nn.SyncBatchNorm not in bn(converted)
    assert lines == ["cvrl on 2 CPU processes: BN statistics per process "
                     "(SyncBatchNorm needs CUDA)"]


# -----------------------------------------------------------------------------
# methods.py: VCLR

def assert_exports_a_plain_backbone(encoder_q):
    """Without its projection head, a method's encoder_q loads into a plain encoder of its arch."""
    backbone = {k: v for k, v in encoder_q.state_dict().items() if not k.startswith("fc.")}
    result = models.build_encoder("tiny", 8).load_state_dict(backbone, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and not result.unexpected_keys


def test_tuple_embedding_matches_loop():
    torch.manual_seed(27)
    pooled, head = torch.randn(4, 3, 6), nn.Linear(6, 5)
    embedding = methods.tuple_embedding(pooled, head)
    for n in range(4):
        mean = [sum(pooled[n, s, d].item() for s in range(3)) / 3 for d in range(6)]
        projected = [sum(w * m for w, m in zip(row, mean)) + b
                     for row, b in zip(head.weight.tolist(), head.bias.tolist())]
        torch.testing.assert_close(embedding[n], torch.tensor(unit(projected)), rtol=1e-5,
                                   atol=1e-6)


def make_vclr(seed, **kw):
    """A VCLR on the tiny encoder with fitted BN and an encoder_k that differs from encoder_q."""
    torch.manual_seed(seed)
    model = methods.VCLR(TINY, dim=8, K=16, segments=3, **kw)
    fit_batchnorm(model.encoder_q, torch.randn(8, 3, 4, 16, 16))
    model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_vclr_eval_forward_matches_loops():
    model = make_vclr(28, order_weight=0.5, clip_weight=0.7)
    n, s = 2, 3
    anchor, positive = torch.randn(n, s, 3, 4, 16, 16), torch.randn(n, s, 3, 4, 16, 16)
    order = torch.tensor([1, 3])
    segments = torch.tensor([[[2, 0, 1], [0, 1, 2]], [[1, 2, 0], [2, 1, 0]]])  # as order says
    before = copy.deepcopy(model.state_dict())
    out = model(anchor, positive, order, segments)
    for name, value in model.state_dict().items():  # eval: no momentum update, no enqueue
        assert torch.equal(value, before[name]), name

    def tuple_embedding(encoder, clips):  # the official tsn_mode: mean of pooled features, head
        with models.pooled_features(encoder):
            pooled = [encoder(clip[None])[0] for clip in clips]
        return F.normalize(encoder.fc(sum(pooled) / len(pooled)), dim=0)

    with torch.no_grad():
        q, k, order_logits = [], [], []
        for i in range(n):
            emb_a = [clip_embedding(model.encoder_q, anchor[i, j]) for j in range(s)]
            key_p = [clip_embedding(model.encoder_k, positive[i, j]) for j in range(s)]
            q.append(tuple_embedding(model.encoder_q, anchor[i]))
            k.append(tuple_embedding(model.encoder_k, positive[i]))
            # the anchor's clips (encoder_q), then the positive's (the momentum encoder)
            order_logits.append(model.order_head(torch.cat(emb_a + key_p)))
    q, k, order_logits = torch.stack(q), torch.stack(k), torch.stack(order_logits)
    torch.testing.assert_close(out["q"], q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["k"], k, rtol=1e-4, atol=1e-5)
    assert out["order_logits"].shape == (n, 4)
    torch.testing.assert_close(out["order_logits"], order_logits, rtol=1e-4, atol=1e-5)

    expected = naive_decayed_infonce(q, k, model.queue, model.queue_age, model.tau, 1.0)
    assert out["loss_nce"].item() == pytest.approx(expected, rel=1e-4)
    expected = naive_cross_entropy(order_logits, order)
    assert out["loss_order"].item() == pytest.approx(expected, rel=1e-4)
    # L_clip: the anchor's first clip (segment 2, then 1) against
    # the positive's clip of that segment
    with torch.no_grad():
        q_clip = torch.stack([clip_embedding(model.encoder_q, anchor[0, 0]),
                              clip_embedding(model.encoder_q, anchor[1, 0])])
        k_clip = torch.stack([clip_embedding(model.encoder_k, positive[0, 2]),
                              clip_embedding(model.encoder_k, positive[1, 1])])
    expected = naive_decayed_infonce(q_clip, k_clip, model.clip_queue, model.clip_queue_age,
                                     model.tau, 1.0)
    assert out["loss_clip"].item() == pytest.approx(expected, rel=1e-4)
    expected = (0.7 * out["loss_clip"].item() + out["loss_nce"].item()
                + 0.5 * out["loss_order"].item())
    assert out["loss_d"].item() == pytest.approx(expected, rel=1e-6)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue], dim=1)
    assert out["acc"].item() == pytest.approx((logits.argmax(1) == 0).float().mean().item())
    expected = (order_logits.argmax(1) == order).float().mean().item()
    assert out["order_acc"].item() == pytest.approx(expected)
    assert not out["acc"].requires_grad and not out["order_acc"].requires_grad


def test_vclr_order_head_sees_clip_order_the_contrastive_loss_does_not():
    model = make_vclr(29, clip_weight=0)
    anchor, positive = torch.randn(2, 3, 3, 4, 16, 16), torch.randn(2, 3, 3, 4, 16, 16)
    order = torch.tensor([0, 2])
    with torch.no_grad():
        out = model(anchor, positive, order)
        shuffled_anchor = model(anchor[:, [2, 0, 1]], positive, order)
        shuffled_positive = model(anchor, positive[:, [1, 2, 0]], order)
    torch.testing.assert_close(shuffled_anchor["q"], out["q"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled_positive["k"], out["k"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled_anchor["loss_nce"], out["loss_nce"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(shuffled_anchor["order_logits"], out["order_logits"], atol=1e-4)
    assert not torch.allclose(shuffled_positive["order_logits"], out["order_logits"], atol=1e-4)


def test_vclr_positive_tuple_never_reaches_encoder_q():
    # as the official code: the positive tuple is encoded by the momentum encoder only, also for
    # the order head, so no loss has a gradient w.r.t. it; the anchor reaches every loss
    model = make_vclr(30)
    anchor = torch.randn(2, 3, 3, 4, 16, 16, requires_grad=True)
    positive = torch.randn(2, 3, 3, 4, 16, 16, requires_grad=True)
    for train in (False, True):  # train mode: BN batch statistics, where a shared batch would leak
        model.train(train)
        segments = torch.tensor([[[0, 1, 2], [0, 1, 2]], [[0, 1, 2], [1, 0, 2]]])
        out = model(anchor, positive, torch.tensor([0, 2]), segments)
        for loss in ("loss_nce", "loss_clip", "loss_order"):
            grad_a, grad_p = torch.autograd.grad(out[loss], [anchor, positive], allow_unused=True,
                                                 materialize_grads=True, retain_graph=True)
            assert grad_a.abs().sum() > 0 and grad_p.abs().sum() == 0, (loss, train)


def test_vclr_training_step_enqueues_and_routes_gradients():
    torch.manual_seed(31)
    model = methods.VCLR(TINY, dim=8, K=16, segments=3, m=0.9).train()
    assert model.decay == 1.0 and model.order_head.in_features == 2 * 3 * 8
    key_before = model.encoder_k.fc[0].weight.clone()
    with torch.no_grad():
        model.encoder_q.fc[0].weight.add_(0.1)  # so that the momentum update moves encoder_k
    n = 3
    segments = torch.tensor([[0, 1, 2], [0, 1, 2]]).repeat(n, 1, 1)
    out = model(torch.randn(n, 3, 3, 4, 16, 16), torch.randn(n, 3, 3, 4, 16, 16),
                torch.tensor([0, 0, 0]), segments)
    assert int(model.queue_ptr) == n and int(model.clip_queue_ptr) == n
    torch.testing.assert_close(model.queue[:, :n], out["k"].T)
    # clip-level keys, not video-level
    assert not torch.allclose(model.clip_queue[:, :n], out["k"].T)
    assert not torch.equal(model.encoder_k.fc[0].weight, key_before)
    out["loss_d"].backward()
    for name, param in [("order_head", model.order_head.weight),
                        ("conv", model.encoder_q.features[0].weight),
                        ("fc", model.encoder_q.fc[0].weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.encoder_k.parameters())
    model(torch.randn(n, 3, 3, 4, 16, 16), torch.randn(n, 3, 3, 4, 16, 16),
          torch.tensor([0, 0, 0]), segments)
    assert int(model.queue_ptr) == 2 * n
    with pytest.raises(ValueError, match="segments"):
        model(torch.randn(n, 3, 3, 4, 16, 16), torch.randn(n, 3, 3, 4, 16, 16),
              torch.tensor([0, 0, 0]))
    assert_exports_a_plain_backbone(model.encoder_q)


def test_vclr_rejects_a_wrong_number_of_segments():
    model = methods.VCLR(TINY, dim=4, K=8, segments=3)
    with pytest.raises(ValueError, match="3"):
        model(torch.randn(2, 2, 3, 4, 16, 16), torch.randn(2, 2, 3, 4, 16, 16),
              torch.tensor([0, 1]))


# -----------------------------------------------------------------------------
# methods.py: mixed precision, background erasing

def test_nt_xent_computes_in_float32_under_autocast():
    torch.manual_seed(33)
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    loss, acc = methods.nt_xent(z1, z2, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_autocast, acc_autocast = methods.nt_xent(z1, z2, 0.1)
    assert loss_autocast.dtype == torch.float32
    # bfloat16 similarities would be off by ~1e-2 relative
    assert loss_autocast.item() == pytest.approx(loss.item(), rel=1e-6)
    assert acc_autocast.item() == acc.item()


def test_cvrl_and_vclr_autocast_bfloat16():
    torch.manual_seed(32)
    cvrl = methods.CVRL(TINY, dim=8, hidden=32)
    vclr = methods.VCLR(TINY, dim=8, K=16, segments=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_cvrl = cvrl(torch.randn(4, 3, 4, 16, 16), torch.randn(4, 3, 4, 16, 16))
        out_vclr = vclr(torch.randn(2, 2, 3, 4, 16, 16), torch.randn(2, 2, 3, 4, 16, 16),
                        torch.tensor([0, 3]),
                        torch.tensor([[[0, 1], [0, 1]], [[1, 0], [1, 0]]]))
    assert out_cvrl["loss_d"].dtype == torch.float32 and torch.isfinite(out_cvrl["loss_d"])
    for key in ("loss_d", "loss_nce", "loss_order", "loss_clip"):
        assert out_vclr[key].dtype == torch.float32 and torch.isfinite(out_vclr[key]), key
    assert vclr.queue.dtype == torch.float32 and int(vclr.queue_ptr) == 2
    out_cvrl["loss_d"].backward()
    out_vclr["loss_d"].backward()
    assert torch.isfinite(vclr.encoder_q.fc[0].weight.grad).all()
    assert torch.isfinite(cvrl.head[5].weight.grad).all()


def test_background_erasing_adds_a_static_frame_with_the_drawn_weight():
    x = torch.randn(64, 3, 6, 8, 8)
    out, lam, r = methods.background_erasing(x, 0.5, (0.1, 0.3), torch.Generator().manual_seed(0))
    applied = lam > 0
    assert 10 < int(applied.sum()) < 54  # about half of the clips
    assert ((lam[applied] >= 0.1) & (lam[applied] <= 0.3)).all()
    for n in range(64):
        added = out[n] - (1 - lam[n]) * x[n]  # (C, T, H, W): what erasing added
        for t in range(6):
            # constant in t
            torch.testing.assert_close(added[:, t], lam[n] * x[n, :, r[n]], rtol=1e-5, atol=1e-6)
        if not applied[n]:
            assert torch.equal(out[n], x[n])


# -----------------------------------------------------------------------------
# utils.py: checkpoints and RNG, BN statistics, weight transfer

def test_rng_state_round_trip_is_complete(tmp_path):
    random.random(), np.random.standard_normal(), torch.rand(1)  # numpy caches a gaussian: keep it
    state = utils.rng_state()
    a = (random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(2).tolist())
    torch.save(state, tmp_path / "rng.pt")
    utils.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(2).tolist()) == a


def test_resume_restores_parts_and_rng_and_reads_the_older_single_rng_state(tmp_path):
    path, lines = str(tmp_path / "ckpt.pt"), []
    args = argparse.Namespace(arch="tiny", lr=0.1)
    for older in (False, True):
        model = nn.Linear(3, 2)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        utils.save_checkpoint(path, "finetune", {"model": model}, scaler, 0, epoch=2, step=9,
                              args={"arch": "tiny", "lr": 0.2})
        if older:  # finetune checkpoints written before utils.save_checkpoint kept one dict
            ckpt = torch.load(path, weights_only=True)
            utils.save_atomic(dict(ckpt, rng=ckpt["rng"][0]), path)
        expected = torch.rand(4)
        restored = nn.Linear(3, 2)
        ckpt = utils.resume(path, "finetune", {"model": restored}, scaler, 0, lines.append, args,
                            must_match=(("arch", None),), may_change=("lr",))
        assert torch.equal(torch.rand(4), expected)  # the RNG continues from the save
        assert torch.equal(restored.weight, model.weight) and ckpt["step"] == 9
    assert lines[0] == "warning: resuming with changed flags --lr 0.2 -> 0.1"
    with pytest.raises(SystemExit, match="is a --arch tiny run"):
        utils.resume(path, "finetune", {}, scaler, 0, lines.append,
                     argparse.Namespace(arch="r3d_10"), must_match=(("arch", None),))


def test_bn_statistics_are_the_mean_of_batch_statistics_over_training_clips(small_tree):
    # estimate_bn_statistics against a loop: the first BN layer's running mean and variance are the
    # averages over the batches of its input's per-channel mean and unbiased variance, whatever
    # statistics the encoder had before (a pretrained encoder and a random init alike)
    torch.manual_seed(1)
    encoder = models.build_encoder("tiny", 8)
    bn = encoder.features[1]
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
    samples, _, _ = data.list_videos("folder", small_tree)
    clips = torch.cat([centre_clip(p, 4, 1, 32) for p, _ in samples])  # (8, 3, 4, 32, 32)
    loader = [{"video": clips[i:i + 3, None], "valid": torch.ones(len(clips[i:i + 3]), dtype=bool)}
              for i in range(0, 8, 3)]  # batches of 3, 3 and 2 clips
    all_bad = {"video": clips[:2, None], "valid": torch.zeros(2, dtype=bool)}  # counts for nothing
    utils.estimate_bn_statistics(encoder, [all_bad] + loader, torch.device("cpu"),
                                 contextlib.nullcontext())
    assert not encoder.training and bn.momentum == 0.1  # the momentum is given back
    with torch.no_grad():
        inputs = [encoder.features[0](b["video"][:, 0]) for b in loader]
    for c in range(bn.num_features):
        means = [x[:, c].mean().item() for x in inputs]
        variances = [x[:, c].var(unbiased=True).item() for x in inputs]
        assert bn.running_mean[c].item() == pytest.approx(sum(means) / 3, rel=1e-4, abs=1e-6)
        assert bn.running_var[c].item() == pytest.approx(sum(variances) / 3, rel=1e-4)
    # with one batch, the same as the independent one-batch estimate used by the kNN reference
    one = naive_bn_estimate(encoder, clips)
    utils.estimate_bn_statistics(encoder, [{"video": clips[:, None],
                                            "valid": torch.ones(8, dtype=bool)}],
                                 torch.device("cpu"), contextlib.nullcontext())
    torch.testing.assert_close(encoder.features[1].running_var, one.features[1].running_var)


def test_weight_transfer_changes_backbone_and_leaves_head_fresh(small_tree, tmp_path):
    pre = tmp_path / "pre"
    pretrain.main(small_args(small_tree, pre, "--epochs", "1"))
    arch, state, source = utils.backbone_from_checkpoint(str(pre / "ckpt.pt"))
    assert arch == "tiny"
    assert source["kind"] == "pretrain"
    assert not any(k.startswith("fc.") for k in state)
    torch.manual_seed(0)
    fresh = models.build_encoder("tiny", 2)
    torch.manual_seed(0)
    model = models.build_encoder("tiny", 2)
    n = utils.transfer_weights(model, state, "x")
    assert n == len(state)
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            assert torch.equal(value, fresh.state_dict()[key])  # head: new
        elif key in state:
            assert torch.equal(value, state[key])  # backbone: pretrained
    with pytest.raises(SystemExit, match="does not fit|does not match"):
        utils.transfer_weights(models.build_encoder("r3d_10", 2), state, "tiny.pt")


# -----------------------------------------------------------------------------
# pretrain.py: the whole step against MoCo's Algorithm 1 plus Eq 3-6, written out here

class NaiveVideoMoCo:
    """The step from the papers alone, one key and one term at a time: its own copies of
    theta_q, theta_k and G; Eq 3's hard top-k with the straight-through mask; Eq 2 before the key
    forward (MoCo's Algorithm 1); Eq 6 against the queue as it was, float64; Eq 4; each loss
    differentiated for its own player only (D by Eq 6, G by Eq 4); SGD written out; the keys
    enqueued one at a time, every age + 1, the new key's 1."""

    def __init__(self, model, generator, m, tau, K, lr, k_drop):
        self.enc_q = copy.deepcopy(model.encoder_q)
        self.enc_k = copy.deepcopy(model.encoder_k)
        self.gen = copy.deepcopy(generator)
        self.m = m
        self.tau = tau
        self.K = K
        self.lr = lr
        self.k_drop = k_drop
        self.queue = model.queue.clone()  # (dim, K) in slot order
        self.age = [int(a) for a in model.queue_age]
        self.ptr = int(model.queue_ptr)
        self.buf_d = [None] * len(list(self.enc_q.parameters()))
        self.buf_g = [None] * len(list(self.gen.parameters()))

    def drop(self, x, importance):
        n, t = importance.shape
        rows = []
        for i in range(n):
            order = sorted(range(t), key=lambda j: -importance[i, j].item())
            thr = (importance[i, order[self.k_drop - 1]].item()
                   + importance[i, order[self.k_drop]].item()) / 2
            row = []
            for j in range(t):
                hard = 1.0 if j in order[:self.k_drop] else 0.0
                soft = torch.sigmoid(importance[i, j] - thr)
                row.append(hard + soft - soft.detach())
            rows.append(torch.stack(row))
        mask = torch.stack(rows)  # (N, T)
        return x * (1 - mask)[:, None, :, None, None]

    def loss_d(self, q, k, decay):
        q, k, queue = q.double(), k.double(), self.queue.double()
        losses, hits = [], 0
        for n in range(q.shape[0]):
            pos = torch.exp(torch.dot(q[n], k[n]) / self.tau)
            negs = [decay ** self.age[j] * torch.exp(torch.dot(q[n], queue[:, j]) / self.tau)
                    for j in range(self.K)]
            losses.append(-torch.log(pos / (pos + sum(negs))))
            hits += int(all(pos > neg for neg in negs))  # the positive is the largest term
        return sum(losses) / len(losses), hits / len(losses)

    def sgd(self, params, grads, buffers, weight_decay):
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                d = g + weight_decay * p
                buffers[i] = d.clone() if buffers[i] is None else 0.9 * buffers[i] + d
                p -= self.lr * buffers[i]

    def step(self, x, x_key, adversarial, decay):
        x_query = self.drop(x, self.gen(x)) if adversarial else x
        q = F.normalize(self.enc_q(x_query), dim=1)
        with torch.no_grad():
            for p_k, p_q in zip(self.enc_k.parameters(), self.enc_q.parameters()):  # Eq 2
                p_k.copy_(self.m * p_k + (1 - self.m) * p_q)
            k = F.normalize(self.enc_k(x_key), dim=1)
        loss_d, acc = self.loss_d(q, k, decay)
        result = {"loss_d": loss_d.item(), "acc": acc, "loss_g": None, "grad_g": None}
        if adversarial:
            with torch.no_grad():
                q_full = F.normalize(self.enc_q(x), dim=1)
            loss_g = -sum((q[n] - q_full[n]).abs().sum() for n in range(len(q))) / len(q)
            grad_g = torch.autograd.grad(loss_g, list(self.gen.parameters()), retain_graph=True)
            result.update(loss_g=loss_g.item(), grad_g=grad_g)
        grad_d = torch.autograd.grad(loss_d, list(self.enc_q.parameters()))
        self.sgd(list(self.enc_q.parameters()), grad_d, self.buf_d, 1e-4)
        if adversarial:
            self.sgd(list(self.gen.parameters()), grad_g, self.buf_g, 0.0)
        for key in k:  # enqueue after the loss, one key at a time
            self.queue[:, self.ptr] = key
            self.age = [a + 1 for a in self.age]
            self.age[self.ptr] = 1
            self.ptr = (self.ptr + 1) % self.K
        return result


def test_whole_step_matches_moco_algorithm_1_and_eq3_to_6_written_out():
    # pretrain.train_step through VideoMoCo.forward and adversarial_backward, two MoCo steps
    # (Eq 1) then three adversarial ones (Eq 3-6), against NaiveVideoMoCo: the losses, G's
    # gradient, both encoders' weights and BN statistics, G's, the queue, its ages and pointer.
    # K = 12 against 4 keys a step: the queue wraps. t = 0.8 passed by the step; the model's own
    # default (0.5) would be a different loss. One process (shuffle_splits=1: shuffle-BN is its
    # own test)
    torch.manual_seed(0)
    model = models.VideoMoCo(TINY, dim=8, K=12, m=0.9, tau=0.2, decay=0.5, shuffle_splits=1)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    lr = 0.5
    k_drop = 3
    naive = NaiveVideoMoCo(model, generator, m=0.9, tau=0.2, K=12, lr=lr, k_drop=k_drop)
    opt_d = torch.optim.SGD(model.encoder_q.parameters(), lr, momentum=0.9, weight_decay=1e-4)
    opt_g = torch.optim.SGD(generator.parameters(), lr, momentum=0.9)
    args = argparse.Namespace(method="videomoco", background_erasing=0, drop_frames=k_drop)
    guard = types.SimpleNamespace(agree=lambda finite: bool(finite))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(1)
    accs = []  # (the step's, the naive one's)
    for step, (adversarial, decay) in enumerate([(False, 1.0)] * 2 + [(True, 0.8)] * 3):
        x = torch.randn(4, 3, 8, 32, 32, generator=gen)
        x_key = x + 0.3 * torch.randn(x.shape, generator=gen)
        run = pretrain.Run(args, model, generator, opt_d, opt_g, contextlib.nullcontext(), scaler,
                           guard)
        phase = "adversarial" if adversarial else "moco"
        out = pretrain.train_step(run, torch.stack([x, x_key], dim=1), [], phase, decay,
                                  measure_random=adversarial)
        expected = naive.step(x, x_key, adversarial, decay)
        if adversarial:  # Table 1's yardstick, on a copy: the comparisons below see no trace of it
            assert 0 < out["l1_random"].item() < 2 * math.sqrt(8)  # unit vectors, 8 dimensions
        assert out["updated"]
        assert out["loss_d"].item() == pytest.approx(expected["loss_d"], rel=1e-5), step
        accs.append((out["acc"].item(), expected["acc"]))
        if adversarial:
            # -Eq 4 is a small difference of unit vectors (~6e-3 here): float32 order across CPUs
            # moves it by ~1e-7, so the tolerance is absolute as well as relative
            expected_g = pytest.approx(expected["loss_g"], rel=1e-5, abs=1e-6)
            assert out["loss_g"].item() == expected_g, step
            for p, g in zip(generator.parameters(), expected["grad_g"]):
                torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
        else:
            assert out["loss_g"] is None
        for mine, ref in ((model.encoder_q, naive.enc_q), (model.encoder_k, naive.enc_k),
                          (generator, naive.gen)):
            for (name, a), b in zip(mine.state_dict().items(), ref.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")
        torch.testing.assert_close(model.queue, naive.queue, rtol=1e-5, atol=1e-6)
        assert model.queue_age.tolist() == naive.age, step
        assert int(model.queue_ptr) == naive.ptr, step
    assert naive.ptr == 20 % 12  # 20 keys through a queue of 12: it wrapped
    mine, theirs = zip(*accs)
    assert mine == pytest.approx(theirs)  # (all 1 here: test_forward_acc_counts_... has misses)


def test_forward_acc_counts_the_queries_whose_positive_beats_every_weighted_negative():
    # the logged top-1 of Eq 6's logits: a query scores when exp(q.k+ / tau) exceeds every
    # t^age exp(q.k_j / tau) of the queue as it was; unrelated keys, so that some queries miss
    torch.manual_seed(3)
    model = models.VideoMoCo(TINY, dim=8, K=12, tau=0.2, decay=0.9, shuffle_splits=1)
    queue, age = model.queue.clone(), model.queue_age.clone()
    out = model(torch.randn(16, 3, 4, 16, 16), torch.randn(16, 3, 4, 16, 16))
    hits = 0
    for n in range(16):
        q = out["q"][n].detach()
        pos = math.exp(float(q @ out["k"][n]) / 0.2)
        hits += all(pos > 0.9 ** int(age[j]) * math.exp(float(q @ queue[:, j]) / 0.2)
                    for j in range(12))
    assert 0 < hits < 16
    assert out["acc"].item() == pytest.approx(hits / 16)


@pytest.mark.parametrize("method", ["cvrl", "vclr", "random-drop"])
def test_train_step_erases_the_query_view_and_feeds_each_method_its_inputs(method):
    # pretrain.train_step with --background-erasing 0.5 for CVRL, VCLR (the erasing reaches every
    # clip of the anchor tuple) and Table 1's random-drop row, against the same step written out:
    # the query view erased (and k random frames dropped), the key view as it was, one SGD step
    # of the method's loss. The same seed before both: the erasing and the drop draw from it
    torch.manual_seed(40)
    n, s, k_drop, p = 6, 3, 2, 0.5
    extra = []
    if method == "cvrl":
        model = methods.CVRL(TINY, dim=8, hidden=16)
        video = torch.randn(n, 2, 3, 6, 16, 16)
    elif method == "vclr":
        model = methods.VCLR(TINY, dim=8, K=16, segments=s, m=0.9)
        video = torch.randn(n, 2, s, 3, 6, 16, 16)
        extra = [torch.zeros(n, dtype=torch.long), torch.arange(s).repeat(n, 2, 1)]
    else:
        model = models.VideoMoCo(TINY, dim=8, K=16, m=0.9, tau=0.2, decay=1.0, shuffle_splits=1)
        video = torch.randn(n, 2, 3, 6, 16, 16)
    model.train()
    reference = copy.deepcopy(model)
    lr = 0.5
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr)
    args = argparse.Namespace(method="videomoco" if method == "random-drop" else method,
                              background_erasing=p, drop_frames=k_drop)
    guard = types.SimpleNamespace(agree=lambda finite: bool(finite))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs, kwargs: seen.append((inputs, kwargs)),
                                    with_kwargs=True)
    torch.manual_seed(41)
    run = pretrain.Run(args, model, None, opt, None, contextlib.nullcontext(), scaler, guard)
    out = pretrain.train_step(run, video, extra, method, 1.0)  # the phase: the method's own
    torch.manual_seed(41)
    x = video[:, 0].clone()
    clips = x.view(-1, *x.shape[-4:])  # (N*S, 3, T, H, W) for VCLR: every clip of the tuple
    erased, lam, _ = methods.background_erasing(clips, p)
    for c in range(clips.shape[0]):
        clips[c] = erased[c]
    if method == "random-drop":
        x, mask = models.random_drop(x, k_drop)
        assert (mask.sum(dim=1) == k_drop).all()
    (query, key, *rest), kwargs = seen[0]
    assert 0 < int((lam > 0).sum()) < clips.shape[0]  # some clips erased, some not
    if method == "vclr":
        assert (lam.view(n, s)[:, 1:] > 0).any()  # beyond the first clip of a tuple
    torch.testing.assert_close(query, x, rtol=0, atol=0)
    assert torch.equal(key, video[:, 1])  # the key view is never erased
    assert len(seen) == 1 and len(rest) == len(extra)
    assert all(torch.equal(a, b) for a, b in zip(rest, extra))
    if method == "random-drop":
        assert kwargs["adversarial"] is False and kwargs["decay"] == 1.0  # D alone, Eq 1
    assert "l1_random" not in out  # measured in the adversarial phase only
    if method == "random-drop":
        expected = reference(x, video[:, 1], decay=1.0)
    else:
        expected = reference(x, video[:, 1], *extra)
    loss = expected["loss_d"]
    loss.backward()
    assert out["updated"] and out["loss_g"] is None
    assert out["loss_d"].item() == pytest.approx(loss.item(), rel=1e-6)
    moved = 0
    for (name, mine), ref in zip(model.named_parameters(), reference.parameters()):
        if ref.grad is not None:
            moved += int(ref.grad.abs().sum() > 0)
            with torch.no_grad():
                ref -= lr * ref.grad
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6, msg=name)
    assert moved > 0


# -----------------------------------------------------------------------------
# pretrain.py: the step, the schedule, the flags

def moco_step(model, opt, video):
    """pretrain.train_step in its MoCo phase (D alone), in a world of one; video (N, 2, ...)."""
    args = argparse.Namespace(method="videomoco", background_erasing=0, drop_frames=1)
    guard = types.SimpleNamespace(agree=lambda finite: bool(finite))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = pretrain.Run(args, model, None, opt, None, contextlib.nullcontext(), scaler, guard)
    return pretrain.train_step(run, video, [], "moco", model.decay)


def test_channels_last_step_matches_the_default_layout_and_compile_keeps_the_keys():
    # inputs of their own seed: two SGD steps at lr 0.1 amplify the two layouts' rounding
    # differences to 3e-5 here, but to 2e-4 for some other inputs
    torch.manual_seed(0)
    video = torch.randn(4, 2, 3, 4, 16, 16)  # x and x_key
    outs = []
    for memory_format in (torch.contiguous_format, torch.channels_last_3d):
        torch.manual_seed(0)
        model = models.VideoMoCo(models.encoder_builder("r3d_10"), 16, 32, 0.99, 0.07, 0.99,
                                 shuffle_splits=1).to(memory_format=memory_format)
        opt = torch.optim.SGD(model.encoder_q.parameters(), 0.1, momentum=0.9)
        losses = [moco_step(model, opt, video)["loss_d"].item() for _ in range(2)]
        outs.append((losses, next(model.encoder_q.parameters()).detach().clone()))
    assert outs[0][0] == pytest.approx(outs[1][0], abs=1e-4)  # the second loss is after a step
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-4)
    # as pretrain.py --compile: in place, so the keys stay; the compiled encoder then runs and
    # agrees with itself uncompiled (dynamo with its eager backend: the wrapping, not inductor's
    # minute of code generation on CPU)
    keys, encoder = list(model.state_dict()), model.encoder_q.eval()
    with torch.no_grad():
        eager = encoder(video[:, 0])
        encoder.compile(backend="eager")
        compiled = encoder(video[:, 0])
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(compiled, eager)


def test_method_moco_is_videomoco_without_generator_and_decay(small_tree, tmp_path):
    no_decay = [a for a in small_args(small_tree, tmp_path / "a") if a not in ("--decay", "0.99")]
    pretrain.main(no_decay + ["--method", "moco"])
    pretrain.main(small_args(small_tree, tmp_path / "b", "--generator", "none", "--decay", "1"))
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["loss_d"] for r in a] == [r["loss_d"] for r in b]
    assert {r["phase"] for r in a} == {"moco"}
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ckpt["method"] == "moco" and ckpt["generator"] is None
    with pytest.raises(SystemExit, match="means --generator none --decay 1"):
        pretrain.main(small_args(small_tree, tmp_path / "c", "--method", "moco", "--decay", "0.9"))


def test_bad_drop_frames_fails_at_start_not_mid_run():
    for k in ("0", "4"):
        with pytest.raises(SystemExit, match="--drop-frames must be in 1..3"):
            pretrain.main(["--frames", "4", "--drop-frames", k, "--out",
                           "/nonexistent/never-written"])


def test_drop_frames_defaults_to_a_quarter_of_the_clip(small_tree, tmp_path):
    # the paper drops 8 of 32 frames; given only --frames, k scales with it
    argv = small_args(small_tree, tmp_path, "--frames", "8", "--epochs", "1")
    i = argv.index("--drop-frames")
    pretrain.main(argv[:i] + argv[i + 2:])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["args"]["drop_frames"] == 2


def test_epoch_schedule_matches_the_cosines_and_phases_written_out():
    # D: lr * (1 + cos(pi e / E)) / 2 over the run (MoCo v2); G: 0 before the adversarial phase,
    # then the same half-cosine over its own epochs; the phase and t of Eq 6 per epoch
    d_params = [nn.Parameter(torch.zeros(1))]
    g_params = [nn.Parameter(torch.zeros(1))]
    for method, generator, phases in (
            ("videomoco", "convlstm", ["moco"] * 4 + ["adversarial"] * 6),
            ("videomoco", "random", ["moco"] * 4 + ["random-drop"] * 6),
            ("moco", "none", ["moco"] * 10), ("cvrl", "none", ["cvrl"] * 10),
            ("vclr", "none", ["vclr"] * 10)):
        args = argparse.Namespace(method=method, generator=generator, lr=0.3, epochs=10,
                                  adv_start=4, decay_start=6, decay=0.9)
        opt_d = torch.optim.SGD(d_params, 1.0)
        opt_g = torch.optim.SGD(g_params, 1.0) if generator == "convlstm" else None
        for epoch in range(10):
            phase, decay = pretrain.epoch_schedule(args, epoch, opt_d, opt_g)
            assert phase == phases[epoch], (method, generator, epoch)
            assert decay == (0.9 if epoch >= 6 else 1.0)
            d_lr = 0.3 * (1 + math.cos(math.pi * epoch / 10)) / 2
            assert opt_d.param_groups[0]["lr"] == pytest.approx(d_lr, abs=1e-12)
            if opt_g is not None:
                g_lr = 0.0 if epoch < 4 else 0.3 * (1 + math.cos(math.pi * (epoch - 4) / 6)) / 2
                assert opt_g.param_groups[0]["lr"] == pytest.approx(g_lr, abs=1e-12)


def test_two_phase_schedule_g_idle_then_trained_from_its_full_lr(small_tree, tmp_path, monkeypatch):
    # D alone before --adv-start (G takes no step), then G from D's initial lr (the paper: 0.02
    # for both), cosine over its own phase
    saved, real_save = {}, utils.save_atomic

    def keep(obj, path):
        real_save(obj, path)
        if isinstance(obj, dict) and obj.get("kind") == "pretrain":
            saved[obj["epoch"]] = copy.deepcopy(obj)

    monkeypatch.setattr(utils, "save_atomic", keep)
    pretrain.main(small_args(small_tree, tmp_path, "--epochs", "3", "--adv-start", "1",
                             "--lr", "0.02"))
    assert saved[1]["opt_g"]["state"] == {} and saved[1]["opt_g"]["param_groups"][0]["lr"] == 0
    assert saved[2]["opt_g"]["state"]
    assert saved[2]["opt_g"]["param_groups"][0]["lr"] == pytest.approx(0.02)
    # half-way through its phase
    assert saved[3]["opt_g"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert any(not torch.equal(a, b) for a, b in zip(saved[1]["generator"].values(),
                                                     saved[2]["generator"].values()))
    epochs = [r for r in read_log(tmp_path, "epoch") if "loss" in r]
    assert epochs[0]["g_vs_random"] is None and all(r["g_vs_random"] > 0 for r in epochs[1:])
    assert utils.cosine(5, 5, 10) == 1 and utils.cosine(4, 5, 10) == 0
    assert utils.cosine(7, 5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5)))


def test_decay_start_uses_eq1_before_and_eq6_after(small_tree, tmp_path):
    eq1, eq6 = math.log(13), math.log(1 + sum(0.99 ** i for i in range(1, 13)))
    pretrain.main(small_args(small_tree, tmp_path / "a", "--decay-start", "1", "--adv-start", "2"))
    chance = [r["chance"] for r in read_log(tmp_path / "a", "epoch") if "loss" in r]
    assert chance == pytest.approx([eq1, eq6])
    # by default Eq 6 starts with the adversarial phase (Sec 3.2: D alone with Eq 1 first), also
    # without G (Table 2's "decay without adversarial" row)
    for generator in ("convlstm", "none"):
        out = tmp_path / generator
        pretrain.main(small_args(small_tree, out, "--epochs", "3", "--adv-start", "2",
                                 "--generator", generator))
        chance = [r["chance"] for r in read_log(out, "epoch") if "loss" in r]
        assert chance == pytest.approx([eq1, eq1, eq6])


def test_demo_preset_fills_only_flags_not_given(tmp_path, capsys):
    args, preset = pretrain.parse_args(["--epochs", "3", "--moco-k=4096", "--out", str(tmp_path)])
    assert data.is_demo(args)
    assert args.epochs == 3
    assert args.moco_k == 4096
    assert args.arch == "tiny"
    utils.start_run(args, 0, torch.device("cpu"), preset)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("preset: arch=tiny") and "epochs" not in line and "moco_k" not in line
    args, _ = pretrain.parse_args(["--data-root", "/x", "--dataset", "folder"])
    assert not data.is_demo(args) and args.arch == "r2plus1d_10" and args.moco_k == 65536
    # a method's own defaults (VCLR's official tau and K), under the demo preset's K
    args, _ = pretrain.parse_args(["--method", "vclr", "--data-root", "/x", "--dataset", "folder"])
    assert (args.moco_t, args.moco_k) == (0.1, 131072)
    args, _ = pretrain.parse_args(["--method", "vclr"])
    assert (args.moco_t, args.moco_k, args.frames) == (0.1, 64, 8)


def test_pretrain_bf16_autocast_on_cpu(small_tree, tmp_path):
    # --amp bf16 computes the step in bfloat16 (its losses are not float32's) and still the same
    # step (within bfloat16's rounding of the first, adversarial steps)
    losses = {}
    for amp in ("bf16", "none"):
        pretrain.main(small_args(small_tree, tmp_path / amp, "--amp", amp, "--adv-start", "0",
                                 "--epochs", "1"))
        log = read_log(tmp_path / amp)
        losses[amp] = [(r["loss_d"], r["loss_g"]) for r in log]
    assert len(losses["bf16"]) == 2
    for (d16, g16), (d32, g32) in zip(losses["bf16"], losses["none"]):
        assert np.isfinite(d16) and np.isfinite(g16)
        assert d16 == pytest.approx(d32, rel=0.02, abs=0.01) and g16 == pytest.approx(g32, rel=0.02)
    assert losses["bf16"] != losses["none"]


# -----------------------------------------------------------------------------
# pretrain.py: checkpoints, resume, signals, non-finite losses, DDP

def test_pretrain_resume_is_exact_mid_epoch(small_tree, tmp_path, monkeypatch):
    # a checkpoint after every step (as a signal or the 30-minute save would write one); the run
    # resumed from the one after the first step of epoch 1 (adversarial, G measured against random
    # drops at each of its 2 steps) ends as the straight run: the same step records, the same
    # epoch record (its averages include the step before the save), the same weights and queue
    monkeypatch.setattr(pretrain, "SAVE_EVERY_MIN", 0)
    kept = {}
    real_save = utils.save_atomic

    def save_and_keep(obj, path):
        real_save(obj, path)
        if isinstance(obj, dict) and (obj.get("epoch"), obj.get("epoch_step")) == (1, 1):
            kept["ckpt"] = path + ".mid"
            shutil.copy(path, kept["ckpt"])

    monkeypatch.setattr(utils, "save_atomic", save_and_keep)
    straight = tmp_path / "straight"
    model = pretrain.main(small_args(small_tree, straight))
    monkeypatch.setattr(utils, "save_atomic", real_save)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(kept["ckpt"], resumed / "ckpt.pt")
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["epoch_sums"][0]["steps"] == 1
    model2 = pretrain.main(small_args(small_tree, resumed))
    a = [r for r in read_log(straight) if r["step"] > 3]
    b = read_log(resumed)
    assert len(a) == len(b) == 1 and a[0]["phase"] == "adversarial"
    for ra, rb in zip(a, b):
        assert (ra["step"], ra["loss_d"], ra["loss_g"]) == (rb["step"], rb["loss_d"], rb["loss_g"])
    fields = ("loss", "acc", "spread", "chance", "probe_loss", "probe_top1", "g_vs_random")
    epoch_a = [r for r in read_log(straight, "epoch") if r["epoch"] == 2 and "loss" in r]
    epoch_b = [r for r in read_log(resumed, "epoch") if r["epoch"] == 2 and "loss" in r]
    assert [{k: r[k] for k in fields} for r in epoch_a] == [{k: r[k] for k in fields}
                                                            for r in epoch_b]
    for (name, x), y in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(x, y), name  # queue, ages, pointer, both encoders


def test_checkpoint_loads_weights_only_and_backbone_into_torchvision(small_tree, tmp_path):
    import torchvision
    out = tmp_path / "r3d"
    pretrain.main(small_args(small_tree, out, "--arch", "r3d_18", "--epochs", "1",
                             ))
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "pretrain" and ckpt["epoch"] == 1 and ckpt["args"]["arch"] == "r3d_18"
    assert {"queue", "queue_ptr", "queue_age"} <= {k.split(".")[-1] for k in ckpt["model"]}
    backbone = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    net = torchvision.models.video.r3d_18(num_classes=16)
    result = net.load_state_dict(backbone, strict=False)  # the projection head stays out
    assert result.missing_keys == ["fc.weight", "fc.bias"] and not result.unexpected_keys
    q = {k[len("encoder_q."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder_q.")}
    assert all(torch.equal(q[k], v) for k, v in backbone.items())
    assert not os.path.exists(str(out / "ckpt.pt") + ".tmp")


def test_sigterm_to_the_process_group_saves_and_resumes(small_tree, tmp_path):
    # as SLURM pre-empts a job: SIGTERM to the whole process group, the loader worker included
    # (--workers 1). One checkpoint mid-epoch, and the rerun goes on from its step
    out = tmp_path / "pre"
    cmd = [sys.executable, os.path.join(HERE, "pretrain.py"),
           *small_args(small_tree, out, "--epochs", "400", "--workers", "1")]
    run = Watched(cmd, start_new_session=True, env=os.environ)
    try:
        run.read_until("epoch 1 step 3/")
        os.killpg(run.proc.pid, signal.SIGTERM)
        code, rest = run.rest()
    finally:
        run.kill()
    assert code == 0, rest
    assert "signal received" in rest and "killed by signal" not in rest, rest
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 3
    r = subprocess.run(cmd[:-4] + ["--epochs", str(ckpt["epoch"] + 1), "--workers", "1"],
                       capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr
    resumed = f"resuming from {out / 'ckpt.pt'}: epoch {ckpt['epoch']}, step {ckpt['step']}"
    assert resumed in r.stdout
    steps = [r["step"] for r in read_log(out)]
    assert steps == list(range(1, steps[-1] + 1))  # no step repeated or lost across the restart


def test_nonfinite_step_leaves_weights_and_optimizers():
    # README: a non-finite loss skips the step. D's and G's weights, their optimizers' state and
    # their BN statistics stay as they were (the forward wrote NaN into the BN statistics); Eq 2
    # and the enqueue of the step's finite keys, which ran in the forward, stay
    torch.manual_seed(0)
    model = models.VideoMoCo(TINY, dim=8, K=12, m=0.9, shuffle_splits=1)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    opt_d = torch.optim.SGD(model.encoder_q.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    opt_g = torch.optim.SGD(generator.parameters(), 0.1, momentum=0.9)
    args = argparse.Namespace(method="videomoco", background_erasing=0, drop_frames=2)
    guard = types.SimpleNamespace(agree=lambda finite: bool(finite))
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step(video):
        run = pretrain.Run(args, model, generator, opt_d, opt_g, contextlib.nullcontext(), scaler,
                           guard)
        return pretrain.train_step(run, video, [], "adversarial", 0.9)

    video = torch.randn(4, 2, 3, 8, 32, 32)
    assert step(video)["updated"]  # the optimizers now hold momentum buffers
    before = copy.deepcopy([model.encoder_q.state_dict(), generator.state_dict(),
                            opt_d.state_dict(), opt_g.state_dict()])
    theta_k = [p.clone() for p in model.encoder_k.parameters()]
    theta_q = [p.clone() for p in model.encoder_q.parameters()]
    ptr = int(model.queue_ptr)
    video = torch.randn(4, 2, 3, 8, 32, 32)
    video[1, 0] = float("nan")  # one query clip: the losses are NaN, the keys finite
    out = step(video)
    assert not out["updated"] and not torch.isfinite(out["loss_d"])
    after = [model.encoder_q.state_dict(), generator.state_dict(), opt_d.state_dict(),
             opt_g.state_dict()]
    for old, new in zip(before[:2], after[:2]):
        assert old.keys() == new.keys()
        assert all(torch.equal(old[k], new[k]) for k in old), [k for k in old
                                                                if not torch.equal(old[k], new[k])]
    for old, new in zip(before[2:], after[2:]):
        assert old["param_groups"] == new["param_groups"]
        assert all(torch.equal(old["state"][i]["momentum_buffer"],
                               new["state"][i]["momentum_buffer"]) for i in old["state"])
    for p_k, old_k, p_q in zip(model.encoder_k.parameters(), theta_k, theta_q):
        torch.testing.assert_close(p_k, 0.9 * old_k + 0.1 * p_q, rtol=1e-6, atol=1e-7)
    assert int(model.queue_ptr) == (ptr + 4) % 12
    slots = [(ptr + i) % 12 for i in range(4)]
    torch.testing.assert_close(model.queue[:, slots], out["k"].T)


def adversarial_setup(seed=0):
    """(model, G, opt_d, opt_g, step) for pretrain.train_step's adversarial steps on CPU in a world
    of one; step(video, scaler=disabled)."""
    torch.manual_seed(seed)
    model = models.VideoMoCo(TINY, dim=8, K=12, m=0.9, shuffle_splits=1)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    opt_d = torch.optim.SGD(model.encoder_q.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    opt_g = torch.optim.SGD(generator.parameters(), 0.1, momentum=0.9)
    args = argparse.Namespace(method="videomoco", background_erasing=0, drop_frames=2)
    guard = types.SimpleNamespace(agree=lambda finite: bool(finite))

    def step(video, scaler=None):
        scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        run = pretrain.Run(args, model, generator, opt_d, opt_g, contextlib.nullcontext(), scaler,
                           guard)
        return pretrain.train_step(run, video, [], "adversarial", 0.9)

    return model, generator, opt_d, opt_g, step


@pytest.mark.parametrize("loss", ["loss_d", "loss_g"])
def test_either_nonfinite_loss_alone_skips_the_adversarial_step(loss):
    # D's loss finite and G's not, or the reverse: neither player steps
    model, generator, opt_d, opt_g, step = adversarial_setup()
    before = copy.deepcopy([model.encoder_q.state_dict(), generator.state_dict()])
    model.register_forward_hook(lambda module, inputs, out: {**out, loss: out[loss] * math.nan})
    out = step(torch.randn(4, 2, 3, 8, 32, 32))
    other = "loss_g" if loss == "loss_d" else "loss_d"
    assert not out["updated"] and torch.isfinite(out[other])
    for old, new in zip(before, [model.encoder_q.state_dict(), generator.state_dict()]):
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert all(p.grad is None for p in generator.parameters())


def test_adversarial_step_under_a_loss_scale_equals_the_unscaled_step():
    # --amp fp16's GradScaler scales both losses (D's Eq 6 and G's Eq 4) and unscales both
    # optimizers' gradients: at a finite scale the step is the unscaled one (exact: powers of 2)
    video = torch.randn(4, 2, 3, 8, 32, 32)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        model, generator, opt_d, opt_g, step = adversarial_setup()
        assert step(video, scaler)["updated"]
        results.append([model.encoder_q.state_dict(), generator.state_dict()])
    for plain, scaled in zip(*results):
        for name in plain:
            torch.testing.assert_close(scaled[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_nonfinite_losses_skip_steps_then_abort(small_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pretrain, "MAX_NONFINITE", 2)
    with pytest.raises(SystemExit, match="2 non-finite losses in a row"):
        pretrain.main(small_args(small_tree, tmp_path / "nan", "--lr", "1e30", "--epochs", "20"))
    assert "non-finite loss" in capsys.readouterr().out


def _ddp_worker(rank, world, port, argv, out):
    # gloo on CPU also on a machine with GPUs (there, two ranks would ask for nccl and a GPU each)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    model = pretrain.main(argv)
    torch.save({k: v for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("method,extra", [
    ("videomoco", []), ("cvrl", []), ("vclr", []),
    ("videomoco", ["--augment-on", "device", "--repeat-sample", "2"])])
def test_ddp_two_gloo_processes_keep_identical_queues_and_weights(small_tree, tmp_path, method,
                                                                  extra):
    port = _free_port()
    argv = small_args(small_tree, tmp_path, "--adv-start", "0", "--epochs", "1", "--method", method,
                      *extra)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, argv, str(tmp_path)),
                                nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # two steps of a global batch of 4 (2 per process); with --repeat-sample 2 two samples of one
    # video per process, so four steps: 16 keys through a queue of 12
    steps = 4 if extra else 2
    assert method == "cvrl" or int(s0["queue_ptr"]) == 4 * steps % 12
    for key in s0:
        if "running_" in key or "num_batches" in key:
            continue  # BN statistics are per process (DDP broadcast_buffers=False)
        assert torch.equal(s0[key], s1[key]), key
    log = read_log(tmp_path)
    assert len(log) == steps and all(np.isfinite(r["loss_d"]) for r in log)
    assert log[0]["phase"] == ("adversarial" if method == "videomoco" else method)


# -----------------------------------------------------------------------------
# the real launcher (torchrun, as the README's commands), on CPU with gloo, and the faults of a
# cluster: a scheduler's SIGTERM, a rank killed outright

RUN_AND_SAVE_RANK = """
import os, sys
sys.path.insert(0, {here!r})
import torch
import pretrain
model = pretrain.main(sys.argv[1:])
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""
LAUNCH_TIMEOUT = 240  # seconds for one launch on 2 loaded cores (each takes 15-40)


def torchrun(launcher, script, argv):
    return [sys.executable, "-m", "torch.distributed.run", *launcher, script, *argv]


def launcher_env():
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def ddp_args(root, out, *extra):
    # 48 videos, a global batch of 4: 12 steps an epoch; K = 20 against 48 keys an epoch
    return small_args(root, out, "--moco-k", "20", "--workers", "1", *extra)


def children(pid):
    """The pids of `pid`'s processes and theirs, read from /proc."""
    parents = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
        except OSError:
            continue
    found = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


class Watched:
    """A command's process (a torchrun agent, or pretrain.py), its output read line by line on a
    thread, so that every wait has a deadline; kill() ends it and every process under it
    (torchrun starts each worker in a session of its own, which the agent's death leaves
    running)."""

    def __init__(self, cmd, **popen):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, **{"env": launcher_env(), **popen})
        self.lines = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read_until(self, prefix, timeout=LAUNCH_TIMEOUT):
        """The lines up to the first that starts with `prefix`."""
        seen = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=max(deadline - time.time(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if line.startswith(prefix):
                return seen
        raise AssertionError(f"no line {prefix!r} within {timeout} s:\n" + "".join(seen)[-3000:])

    def rest(self, timeout=LAUNCH_TIMEOUT):
        """Everything it prints until it exits; (exit code, output)."""
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=30)
        seen = []
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                seen.append(line)
        return self.proc.returncode, "".join(seen)

    def kill(self):
        for pid in children(self.proc.pid) + [self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def launched(*cmds):
    agents = [Watched(cmd) for cmd in cmds]
    try:
        yield agents
    finally:
        for agent in agents:
            agent.kill()


def run_to_the_end(cmds):
    """Start every command at once (one per agent), wait for all; their joined output."""
    with launched(*cmds) as agents:
        results = [agent.rest() for agent in agents]
    for code, output in results:
        assert code == 0, output[-3000:]
    return "".join(output for _, output in results)


@pytest.mark.parametrize("nodes", [1, 2])
def test_torchrun_ranks_keep_identical_queues_and_weights_and_a_rerun_resumes(distinct_tree,
                                                                              tmp_path, nodes):
    # one agent of 2 processes (--standalone), or 2 agents of 1 process each, 2 "nodes" on
    # localhost meeting through the c10d rendezvous (the README's multi-node command)
    script = tmp_path / "run.py"
    script.write_text(RUN_AND_SAVE_RANK.format(here=HERE, out=str(tmp_path)))
    argv = ddp_args(distinct_tree, tmp_path / "out", "--epochs", "1", "--adv-start", "0")
    if nodes == 1:
        launchers = [["--standalone", "--nproc_per_node=2"]]
    else:
        rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=videomoco-test"]
        launchers = [rendezvous, rendezvous]
    cmds = [torchrun(launcher, str(script), argv) for launcher in launchers]
    run_to_the_end(cmds)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert int(states[0]["queue_ptr"]) == 48 % 20
    for key in states[0]:
        if "running_" in key or "num_batches" in key:
            continue  # BN statistics are per process (DDP broadcast_buffers=False)
        assert torch.equal(states[0][key], states[1][key]), key
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log] == list(range(1, 13))
    # the same command again: every rank resumes from the end of the run (rank 0's checkpoint)
    # and stops there
    output = run_to_the_end(cmds)
    assert f"resuming from {tmp_path / 'out' / 'ckpt.pt'}: epoch 1, step 12" in output
    for r in (0, 1):
        after = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert all(torch.equal(after[k], states[0][k]) for k in states[0])


def test_torchrun_sigterm_to_the_agent_saves_and_the_rerun_resumes_exactly(distinct_tree,
                                                                           tmp_path):
    # what a scheduler's pre-emption does: SIGTERM to torchrun's agent, which forwards it to its
    # workers' process groups (their loader workers included), at the first step of epoch 1.
    # One checkpoint, and the rerun of the same command ends as the run that was never
    # interrupted: the same steps, the same epoch records, the same weights, queue, G, optimizers
    def cmd(out):
        return torchrun(["--standalone", "--nproc_per_node=2"], os.path.join(HERE, "pretrain.py"),
                        ddp_args(distinct_tree, out, "--epochs", "2", "--adv-start", "1"))

    run_to_the_end([cmd(tmp_path / "straight")])
    cut = tmp_path / "cut"
    with launched(cmd(cut)) as (agent,):
        agent.read_until("epoch 1 step 13/")
        agent.proc.send_signal(signal.SIGTERM)
        _, rest = agent.rest()
    assert "signal received: saved a checkpoint at epoch 1" in rest, rest[-3000:]
    assert "killed by signal" not in rest, rest[-3000:]
    ckpt = torch.load(cut / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["epoch_step"] < 12, (ckpt["epoch"], ckpt["epoch_step"])
    output = run_to_the_end([cmd(cut)])
    assert f"resuming from {cut / 'ckpt.pt'}: epoch 1, step {ckpt['step']} (mid-epoch" in output
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(cut / "ckpt.pt", weights_only=True)
    for part in ("model", "generator"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for part in ("opt_d", "opt_g"):
        assert all(torch.equal(a[part]["state"][i]["momentum_buffer"],
                               b[part]["state"][i]["momentum_buffer"]) for i in a[part]["state"])
    straight_steps = read_log(tmp_path / "straight")
    cut_steps = read_log(cut)
    assert [r["step"] for r in cut_steps] == list(range(1, 25))  # none lost, none repeated
    assert [r["loss_d"] for r in straight_steps] == [r["loss_d"] for r in cut_steps]
    fields = ("loss", "acc", "spread", "chance", "probe_loss", "probe_top1", "g_vs_random")
    epochs = [[{k: r[k] for k in fields} for r in read_log(out, "epoch") if "loss" in r]
              for out in (tmp_path / "straight", cut)]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 2


def rank_process(agent_pid, rank):
    """The pid of the worker process of `rank` that torchrun's agent started (read from /proc)."""
    for pid in children(agent_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} among the processes of {agent_pid}")


def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(distinct_tree, tmp_path):
    # kill -9 of one rank under --max-restarts 1: the agent restarts both, and they resume from the
    # checkpoint of the end of epoch 0 and say so
    out = tmp_path / "out"
    cmd = torchrun(["--standalone", "--nproc_per_node=2", "--max-restarts=1"],
                   os.path.join(HERE, "pretrain.py"),
                   ddp_args(distinct_tree, out, "--epochs", "2", "--workers", "0"))
    with launched(cmd) as (agent,):
        agent.read_until("epoch 0 done")
        os.kill(rank_process(agent.proc.pid, 1), signal.SIGKILL)
        code, rest = agent.rest()
    assert code == 0, rest[-3000:]
    assert f"resuming from {out / 'ckpt.pt'}: epoch 1, step 12" in rest, rest[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 2
    assert [r["step"] for r in read_log(out)][-12:] == list(range(13, 25))


# -----------------------------------------------------------------------------
# pretrain.py: does it learn? Every method memorises a small set of distinct clips through the
# real pretraining path (pretrain.main), for the tiny encoder and for one of the paper's encoders
# at a small input (on 385ac2d, with the classifier init of the head and colour jitter always on,
# the loss stayed at 0.82-0.93 of ln(K+1) here); the queue-free metric, the collapse guard, the kNN
# monitor

def learning_args(root, out, method, arch, epochs=30):
    """30 epochs of 3 steps: 90 steps of a batch of 16 against a queue of 16 keys (ln 17 = 2.83), or
    31 in-batch negatives for CVRL (ln 31 = 3.43). No colour jitter: the clips differ by colour. One
    BN batch (--shuffle-splits 1): this test is about the losses, heads and optimisation; BN over
    sub-batches of 8 is noisy enough to hold instance accuracy at 0.4-0.8 here (measured), and the
    emulation itself is tested in train mode below. Paper-size encoders at a smaller input."""
    small = ["--frames", "4", "--crop", "16"] if arch != "tiny" else ["--frames", "8",
                                                                      "--crop", "32"]
    return ["--dataset", "folder", "--data-root", root, "--out", str(out), "--method", method,
            "--arch", arch,
            *small, "--batch-size", "16", "--moco-k", "16", "--moco-m", "0.99",
            "--shuffle-splits", "1",
            "--lr", "0.05", "--jitter", "0", "--grayscale", "0", "--epochs", str(epochs),
            "--workers", "0",
            "--print-freq", "1000", "--drop-frames", "2"]


@pytest.mark.parametrize("method,arch,extra", [
    ("videomoco", "tiny", []), ("moco", "tiny", []), ("cvrl", "tiny", []), ("vclr", "tiny", []),
    ("videomoco", "r3d_10", []),
    ("videomoco", "tiny", ["--augment-on", "device", "--repeat-sample", "2", "--epochs", "15"])])
def test_pretext_task_memorises_a_small_set(distinct_tree, tmp_path, method, arch, extra):
    # Every method and a paper-size encoder, through pretrain.main; and VideoMoCo with uint8 batches
    # augmented on the training device and two samples per decoded video, in as many steps.
    # (The head's collapse itself is isolated by
    # test_linear_head_learns_noise_patterns_where_the_classifier_init_collapses.)
    pretrain.main(learning_args(distinct_tree, tmp_path, method, arch) + extra)
    epochs = [r for r in read_log(tmp_path, "epoch") if "loss" in r]
    last = epochs[-1]
    assert len(epochs) == (15 if extra else 30)
    assert last["chance"] == pytest.approx(math.log(31 if method == "cvrl" else 17), rel=1e-3)
    assert last["loss"] < 0.5 * last["chance"], [round(r["loss"], 2) for r in epochs]
    assert last["acc"] >= 0.8, [round(r["acc"], 2) for r in epochs]
    assert last["spread"] > 0.3
    # and without a queue to fool it: 48 probe clips against their fresh keys (chance ln 48, 1/48;
    # measured 0.98-1.54 and 0.52-0.73)
    assert last["probe_chance"] == pytest.approx(math.log(48))
    assert last["probe_loss"] < 0.5 * last["probe_chance"], [round(r["probe_loss"], 2)
                                                             for r in epochs]
    assert last["probe_top1"] > 0.4, [round(r["probe_top1"], 2) for r in epochs]


def test_feature_spread_matches_loop_and_reads_one_when_isotropic_zero_when_collapsed():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 16, generator=gen) + 0.5
    unit = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in z.tolist()]
    stds = []
    for j in range(16):
        col = [row[j] for row in unit]
        mean = sum(col) / len(col)
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in col) / (len(col) - 1)))
    expected = sum(stds) / 16 * math.sqrt(16)
    assert pretrain.feature_spread(z).item() == pytest.approx(expected, rel=1e-5)
    isotropic = torch.randn(4096, 32, generator=gen)
    assert pretrain.feature_spread(isotropic).item() == pytest.approx(1.0, abs=0.05)
    collapsed = torch.randn(1, 32, generator=gen).expand(8, 32)
    assert pretrain.feature_spread(collapsed).item() == pytest.approx(0, abs=1e-6)


def test_queue_free_metric_matches_a_loop():
    # two views of 6 clips through copies of encoder_q and encoder_k in train mode (queries in
    # contiguous sub-batches of 3, keys in shuffled ones), then InfoNCE of each query against all 6
    # keys written out; the model itself is untouched
    torch.manual_seed(3)
    model = models.VideoMoCo(TINY, dim=8, K=16, m=0.5, tau=0.2)
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(0.1 * torch.randn_like(p))
    video = torch.randn(6, 2, 3, 4, 16, 16)
    before = copy.deepcopy(model.state_dict())
    loss, top1, chance = pretrain.queue_free_metric(model, [{"video": video}], 3,
                                                    torch.device("cpu"), contextlib.nullcontext())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q = torch.cat([model.encoder_q(video[:3, 0]), model.encoder_q(video[3:, 0])])
        shuffled = torch.cat([model.encoder_k(video[perm[:3], 1]),
                              model.encoder_k(video[perm[3:], 1])])
    k = torch.empty_like(shuffled)
    k[perm] = shuffled
    q, k = F.normalize(q, dim=1).tolist(), F.normalize(k, dim=1).tolist()
    losses, hits = [], 0
    for i in range(6):
        logits = [dot(q[i], k[j]) / 0.2 for j in range(6)]
        losses.append(-logits[i] + math.log(sum(math.exp(v) for v in logits)))
        hits += max(range(6), key=lambda j: logits[j]) == i
    assert loss == pytest.approx(sum(losses) / 6, rel=1e-5)
    assert top1 == pytest.approx(hits / 6) and chance == pytest.approx(math.log(6))


class DriftingCollapse(nn.Module):
    """Every clip maps onto one direction that turns by 0.5 rad per step, plus a 1e-3 part of its
    own: a collapsed embedding, with no instance information to speak of, that drifts with the
    steps as a collapsed encoder does with the lr."""

    def __init__(self):
        super().__init__()
        self.step = 0

    def forward(self, x):  # (N, 3, T, H, W) -> (N, 8)
        v = torch.zeros(8)
        v[0], v[1] = math.cos(0.5 * self.step), math.sin(0.5 * self.step)
        return v + 1e-3 * x.flatten(1)[:, :8]


def test_a_drifting_collapse_fools_the_training_loss_and_not_the_queue_free_metric():
    # (learning-evidence.md) Each step, a batch of 4 clips against a queue of the 16 keys written
    # in the 4 steps before: the positive is the only key of the current direction, so the
    # training loss sits far below its chance level and the old collapse rule (the training loss
    # within 2 % of chance) sees nothing. The queue-free metric scores against fresh keys of other
    # clips, which share the direction: its loss sits at ln P, and the guard fires.
    gen = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.encoder_q = model.encoder_k = DriftingCollapse()
    model.tau = 0.07
    queue, losses = [], []
    for step in range(12):
        model.encoder_q.step = step
        x = torch.randn(4, 3, 2, 4, 4, generator=gen)
        q = F.normalize(model.encoder_q(x + 0.01 * torch.randn(x.shape, generator=gen)), dim=1)
        k = F.normalize(model.encoder_k(x), dim=1)
        if len(queue) == 16:
            ages = torch.arange(1, 17).flip(0)
            losses.append(models.decayed_infonce(q, k, torch.stack(queue).T, ages, 0.07, 1.0))
        queue = (queue + list(k))[-16:]
    chance = math.log(17)
    training = sum(losses).item() / len(losses)
    assert training < 0.5 * chance  # "learning", by the training loss
    # (its feature spread, ~0, trips the spread rule too; 0.5 isolates the two loss rules)
    assert pretrain.collapse_warning(training, 0.5, chance) is None
    probe = [{"video": torch.randn(16, 2, 3, 2, 4, 4, generator=gen)}]
    loss, top1, probe_chance = pretrain.queue_free_metric(model, probe, 4, torch.device("cpu"),
                                                          contextlib.nullcontext())
    assert loss > 0.98 * probe_chance and probe_chance == pytest.approx(math.log(16))
    assert "queue-free loss" in pretrain.collapse_warning(loss, 0.5, probe_chance)


def test_collapse_guard_warns_once_when_the_loss_sits_at_chance(small_tree, tmp_path, capsys):
    # tau = 100 makes every logit ~0, so the training loss is ln(K+1) and the queue-free loss ln P
    # to within 1 %: the guard must say so, once
    pretrain.main(small_args(small_tree, tmp_path, "--moco-t", "100", "--epochs", "3",
                             "--adv-start", "3"))
    out = capsys.readouterr().out
    epochs = [r for r in read_log(tmp_path, "epoch") if "loss" in r]
    assert len(epochs) == 3 and all(r["loss"] > 0.98 * r["chance"] for r in epochs)
    assert all(r["probe_loss"] > 0.98 * r["probe_chance"] for r in epochs)
    assert epochs[0]["chance"] == pytest.approx(math.log(13))  # Eq 1 before --adv-start
    assert epochs[0]["probe_chance"] == pytest.approx(math.log(8))  # the 8 videos of small_tree
    assert out.count("warning: the queue-free loss") == 1
    assert pretrain.collapse_warning(loss=2.0, spread=0.8, chance=math.log(13)) is None
    assert "spread" in pretrain.collapse_warning(loss=2.0, spread=0.01, chance=math.log(13))


def naive_knn_top1(encoder, train, test, frames, stride, crop, k=20, temperature=0.07):
    """kNN top-1 by hand: BN statistics of the training videos' centre clips (one batch), pooled
    features one clip at a time, cosine, a Python loop for the weighted vote."""
    encoder = naive_bn_estimate(encoder, torch.cat([centre_clip(p, frames, stride, crop)
                                                    for p, _ in train]))

    def feature(path):
        with torch.no_grad(), models.pooled_features(encoder):
            f = encoder(centre_clip(path, frames, stride, crop))[0]
        return f / f.norm()

    gallery = [(feature(p), y) for p, y in train]
    correct = 0
    for p, y in test:
        f = feature(p)
        nearest = sorted(gallery, key=lambda g: -float(f @ g[0]))[:k]
        votes = {}
        for g, label in nearest:
            votes[label] = votes.get(label, 0.0) + math.exp(float(f @ g) / temperature)
        correct += max(votes, key=votes.get) == y
    return correct / len(test)


def test_knn_monitor_matches_a_naive_loop(small_tree):
    torch.manual_seed(0)
    encoder = models.build_encoder("tiny", 8).eval()
    before = copy.deepcopy(encoder.state_dict())
    args = pretrain.get_args_parser().parse_args(["--dataset", "folder", "--data-root", small_tree,
                                                  "--frames", "4",
                                                  "--crop", "32"])
    monitor = pretrain.KNNMonitor(args, workers=0, k=3)
    samples, _, _ = data.list_videos("folder", small_tree)
    expected = naive_knn_top1(encoder, samples, samples, 4, 1, 32, k=3)
    assert monitor(encoder, torch.device("cpu"),
                   contextlib.nullcontext()) == pytest.approx(expected)
    assert not encoder.training  # the monitor leaves the mode it found, and the statistics
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


def test_pretrain_monitor_measures_random_init_first_then_logs(
        small_tree, tmp_path, capsys):
    pretrain.main(small_args(small_tree, tmp_path, "--knn-every", "1", "--epochs", "2"))
    out = capsys.readouterr().out
    with open(tmp_path / "log.jsonl") as f:
        first = [json.loads(f.readline()) for _ in range(2)]
    # before any step: the queue-free metric, then kNN
    assert all(r["curve"] and r["epoch"] == 0 and "loss" not in r for r in first)
    assert "probe_loss" in first[0] and "knn_top1" in first[1]
    epochs = read_log(tmp_path, "epoch")
    assert [r["epoch"] for r in epochs if "knn_top1" in r] == [0, 1, 2]
    assert [r["epoch"] for r in epochs if "probe_loss" in r] == [0, 1, 2]
    assert [r["epoch"] for r in epochs if "loss" in r] == [1, 2]
    knn = [r for r in epochs if "knn_top1" in r]
    assert all(0 <= r["knn_top1"] <= 1 and r["knn_chance"] == 0.5 for r in knn)
    assert "kNN top-1 on the test split went from" in out
    assert "queue-free loss went from" in out


def test_learning_summary_reads_the_first_and_last_measurements(tmp_path, capsys):
    log = utils.Logger(str(tmp_path), 0)
    with open(log.path, "w") as f:
        f.write(json.dumps({"curve": True, "epoch": 0, "knn_top1": 0.2, "knn_chance": 1 / 6,
                            "probe_loss": 4.0, "probe_top1": 0.1, "probe_chance": math.log(64)})
                + "\n")
        f.write(json.dumps({"epoch": 0, "step": 1, "loss_d": 9.0}) + "\n")  # a step record
        for e in range(1, 11):
            f.write(json.dumps({"curve": True, "epoch": e, "probe_loss": 4.0 - 0.3 * e,
                                "probe_top1": 0.1 + 0.05 * e, "probe_chance": math.log(64),
                                "knn_top1": 0.2 + 0.04 * e, "knn_chance": 1 / 6}) + "\n")
        # a resumed run's later value replaces the earlier one
        f.write(json.dumps({"curve": True, "epoch": 10, "knn_top1": 0.7}) + "\n")
    pretrain.learning_summary(log, 10)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["queue-free loss went from 4.000 at epoch 0 to 1.000 after 10 epochs (chance "
                     "4.159), its top-1 from 0.100 to 0.600 (chance 0.016)",
                     "kNN top-1 on the test split went from 0.200 at epoch 0 to 0.700 after 10 "
                     "epochs (chance 0.167)"]


# -----------------------------------------------------------------------------
# pretrain.py with the other methods and switches, into finetune.py and evaluate.py

@pytest.mark.parametrize("method", ["cvrl", "vclr"])
def test_other_methods_pretrain_and_feed_finetune_and_evaluate_unchanged(small_tree,
                                                                         tmp_path, method):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    pretrain.main(small_args(small_tree, pre, "--method", method,
                             "--epochs", "1"))
    log = read_log(pre)
    assert {r["phase"] for r in log} == {method} and all(np.isfinite(r["loss_d"]) for r in log)
    assert method != "vclr" or all(0 <= r["order_acc"] <= 1 and r["loss_order"] > 0 for r in log)
    ckpt = torch.load(pre / "ckpt.pt", weights_only=True)
    assert ckpt["method"] == method and ckpt["generator"] is None
    backbone = torch.load(pre / "backbone.pt", weights_only=True)
    missing = models.build_encoder("tiny", 16).load_state_dict(backbone, strict=False).missing_keys
    assert missing == ["fc.weight", "fc.bias"]  # every head is left out
    finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--dataset", "folder", "--data-root", small_tree,
                   "--out", str(ft),
                   "--epochs", "1", "--batch-size", "4", "--workers", "0"])
    out = evaluate.main(["--ckpt", str(ft / "ckpt.pt"), "--clips", "2", "--workers", "0"])
    assert out["n_videos"] == 8 and 0 <= out["top1"] <= 1
    knn = evaluate.main(["--ckpt", str(pre / "ckpt.pt"), "--clips", "2", "--workers", "0"])
    assert 0 <= knn["R@1"] <= 1


def test_input_mode_is_recorded_and_a_mismatching_override_refused(small_tree, tmp_path):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    pretrain.main(small_args(small_tree, pre, "--input", "residual", "--background-erasing", "0.5",
                             "--epochs", "1",
                             "--adv-start", "0"))
    assert all(np.isfinite(r["loss_d"]) and np.isfinite(r["loss_g"]) for r in read_log(pre))
    with pytest.raises(SystemExit, match="pretrained on residual input"):
        finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--input", "rgb", "--out", str(ft)])
    model = finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--dataset", "folder", "--data-root",
                           small_tree, "--out", str(ft), "--epochs", "1", "--batch-size", "4",
                           "--workers", "0"])
    assert model.input_mode == "residual"
    assert torch.load(ft / "ckpt.pt", weights_only=True)["input"] == "residual"
    out = evaluate.main(["--ckpt", str(ft / "ckpt.pt"), "--clips", "2", "--workers", "0"])
    assert out["input"] == "residual"
    with pytest.raises(SystemExit, match="trained on residual input"):
        evaluate.main(["--ckpt", str(pre / "ckpt.pt"), "--input", "rgb"])
    with pytest.raises(SystemExit, match="--input residual run"):
        pretrain.main(small_args(small_tree, pre, "--epochs", "2"))  # resuming with another input


# -----------------------------------------------------------------------------
# finetune.py

def test_finetune_keeps_the_pretext_augmentation_but_the_demo_and_the_probe_do_not():
    # Sec 4.2: finetuning keeps the pretext stage's pre-processing (pretrain.py's defaults); the
    # demo preset and the linear probe (MAE's) use crop and flip only
    args = finetune.parse_args(["--data-root", "/x", "--dataset", "folder"])[0]
    pretext = pretrain.parse_args(["--data-root", "/x", "--dataset", "folder"])[0]
    assert (args.jitter, args.grayscale) == (pretext.jitter, pretext.grayscale) == (0.8, 0.2)
    for argv in ([], ["--data-root", "/x", "--dataset", "folder", "--linear"]):
        args = finetune.parse_args(argv)[0]
        assert (args.jitter, args.grayscale) == (0.0, 0.0)


def test_linear_probe_trains_only_the_head_and_finetune_resumes(small_tree, tmp_path, capsys):
    pre, lin = tmp_path / "pre", tmp_path / "lin"
    pretrain.main(small_args(small_tree, pre, "--epochs", "1"))
    argv = ["--ckpt", str(pre / "backbone.pt"), "--arch", "tiny", "--linear", "--dataset", "folder",
            "--data-root", small_tree, "--frames", "4", "--crop", "32", "--out", str(lin),
            "--epochs", "1",
            "--batch-size", "4", "--workers", "0"]
    model = finetune.main(argv)
    backbone = torch.load(pre / "backbone.pt", weights_only=True)
    samples, _, _ = data.list_videos("folder", small_tree)
    reference = models.build_encoder("tiny", 2)
    reference.load_state_dict(backbone, strict=False)
    # the frozen backbone's BN statistics, re-estimated on the training videos' centre clips
    reference = naive_bn_estimate(reference, torch.cat([centre_clip(p, 4, 1, 32)
                                                        for p, _ in samples]))
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            continue
        if "running_" in key:
            torch.testing.assert_close(value, reference.state_dict()[key], rtol=1e-4, atol=1e-6)
        elif "num_batches" in key:
            assert value == 1  # reset, then one batch of the 8 videos
        else:
            assert torch.equal(value, backbone[key]), key  # frozen
    assert torch.load(lin / "ckpt.pt",
                      weights_only=True)["args"]["lr"] == finetune.LINEAR_DEFAULTS["lr"]
    norm, fc = model.fc  # the probe: standardised features, then a linear layer
    assert not norm.affine and norm.num_batches_tracked > 0 and norm.running_mean.abs().sum() > 0
    assert isinstance(fc, torch.nn.Linear)
    out = evaluate.main(["--ckpt", str(lin / "ckpt.pt"), "--clips", "2", "--workers", "0"])
    assert out["kind"] == "finetune" and out["n_videos"] == 8
    capsys.readouterr()
    finetune.main(argv[:-6] + ["--epochs", "2", "--batch-size", "4", "--workers", "0"])
    assert f"resuming from {lin / 'ckpt.pt'}: epoch 1" in capsys.readouterr().out


def test_finetune_and_evaluate_take_the_dataset_from_the_checkpoint(small_tree, tmp_path, capsys):
    # the pretraining's dataset and root are the downstream default; a given dataset that differs
    # is said in one line
    pre = tmp_path / "pre"
    pretrain.main(small_args(small_tree, pre, "--epochs", "1"))
    run = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--linear"]
    capsys.readouterr()
    finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--out", str(tmp_path / "same"), *run])
    data_settings = torch.load(tmp_path / "same" / "ckpt.pt", weights_only=True)["data"]
    assert data_settings["dataset"] == "folder" and data_settings["data_root"] == small_tree
    assert "note:" not in capsys.readouterr().out
    kinetics = tmp_path / "k400"  # the same videos in the Kinetics layout
    for split in ("train", "val"):
        shutil.copytree(os.path.join(small_tree, "c0"), kinetics / split / "c0")
        shutil.copytree(os.path.join(small_tree, "c1"), kinetics / split / "c1")
    other = ["--dataset", "kinetics", "--data-root", str(kinetics)]
    finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--out", str(tmp_path / "other"), *run, *other])
    data_settings = torch.load(tmp_path / "other" / "ckpt.pt", weights_only=True)["data"]
    assert data_settings["dataset"] == "kinetics" and data_settings["frames"] == 4
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert notes == [f"note: finetuning on --dataset kinetics; {pre / 'ckpt.pt'} was pretrained "
                     "on folder"]
    evaluate.main(["--ckpt", str(pre / "ckpt.pt"), "--clips", "1", "--workers", "0", *other])
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert notes == [f"note: evaluating on --dataset kinetics; {pre / 'ckpt.pt'} was trained on "
                     "folder"]


# -----------------------------------------------------------------------------
# evaluate.py

def test_retrieval_recall_matches_brute_force_loop():
    gen = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(30, 8, generator=gen), dim=1)
    gallery = F.normalize(torch.randn(50, 8, generator=gen), dim=1)
    ql, gl = torch.randint(0, 4, (30,), generator=gen), torch.randint(0, 4, (50,), generator=gen)
    got = evaluate.retrieval_recall(query, gallery, ql, gl, ks=(1, 5, 10, 20))
    for k in (1, 5, 10, 20):
        hits = 0
        for i in range(30):
            dist_ = [(-sum(query[i][d].item() * gallery[j][d].item() for d in range(8)), j)
                     for j in range(50)]
            nearest = [j for _, j in sorted(dist_)[:k]]
            hits += any(gl[j] == ql[i] for j in nearest)
        assert got[f"R@{k}"] == pytest.approx(hits / 30)


def test_knn_vote_and_entropy_match_loops():
    gen = torch.Generator().manual_seed(1)
    query = F.normalize(torch.randn(12, 6, generator=gen), dim=1)
    gallery = F.normalize(torch.randn(40, 6, generator=gen), dim=1)
    gl = torch.randint(0, 3, (40,), generator=gen)
    pred = utils.knn_predict(query, gallery, gl, 3, k=7, temperature=0.1)
    for i in range(12):
        sims = sorted(((query[i] @ gallery[j]).item(), j) for j in range(40))[-7:]
        votes = [0.0] * 3
        for s, j in sims:
            votes[int(gl[j])] += math.exp(s / 0.1)
        assert int(pred[i]) == max(range(3), key=lambda c: votes[c])
    probs = torch.softmax(torch.randn(5, 4, generator=gen), dim=1)
    for row, h in zip(probs, evaluate.entropy(probs)):
        assert h.item() == pytest.approx(-sum(p * math.log(p) for p in row.tolist()), rel=1e-5)


def test_finetune_then_evaluate_end_to_end_json_keys(small_tree, tmp_path):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    pretrain.main(small_args(small_tree, pre, "--epochs", "1", "--adv-start", "0"))
    finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--dataset", "folder", "--data-root", small_tree,
                   "--out", str(ft),
                   "--epochs", "1", "--batch-size", "4", "--workers", "0", "--print-freq", "1"])
    ckpt = torch.load(ft / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "finetune" and ckpt["arch"] == "tiny" and ckpt["classes"] == ["c0", "c1"]
    assert ckpt["data"]["frames"] == 4 and ckpt["generator"]["drop_frames"] == 1
    out = evaluate.main(["--ckpt", str(ft / "ckpt.pt"), "--clips", "3", "--workers", "0",
                         "--occlusion", "--json", str(tmp_path / "r.json")])
    for key in ("top1", "top5", "n_videos", "n_skipped", "entropy_none", "entropy_random",
                "entropy_adversarial",
                "top1_none", "top1_random", "top1_adversarial"):
        assert out[key] is not None, key
    assert out["n_videos"] == 8 and 0 <= out["top1"] <= 1 and out["top1"] == out["top1_none"]
    assert json.load(open(tmp_path / "r.json")) == json.loads(json.dumps(out))
    knn = evaluate.main(["--ckpt", str(pre / "ckpt.pt"), "--clips", "2", "--workers", "0"])
    for key in ("R@1", "R@5", "R@10", "R@20", "knn_top1"):
        assert 0 <= knn[key] <= 1
    assert knn["R@20"] == 1.0  # the gallery holds both classes


def test_evaluate_rejects_corrupt_and_wrong_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    r = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--ckpt", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "not a readable checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    for content, message in ((b"", "not a readable checkpoint"),
                             (torch.zeros(2), "holds a Tensor, not a checkpoint dict")):
        path = tmp_path / "other.pt"
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        with pytest.raises(SystemExit, match=message):
            evaluate.main(["--ckpt", str(path)])
    odd = tmp_path / "odd.pt"
    torch.save({"kind": "something-else"}, odd)
    with pytest.raises(SystemExit, match="something-else checkpoint"):
        evaluate.main(["--ckpt", str(odd)])
    with pytest.raises(SystemExit, match="not found"):
        evaluate.main(["--ckpt", str(tmp_path / "missing.pt")])


# -----------------------------------------------------------------------------
# the whole: a minimal reference (the card's five files, methods.py, utils.py, bench.py)

# every module of the project (its .py files beside the tests), so a new file joins the tree's test
MODULES = sorted(f.removesuffix(".py") for f in os.listdir(HERE)
                 if f.endswith(".py") and not f.startswith(("test_", ".")))


def project_imports(module):
    """The project modules that `module`.py imports, read from its source."""
    tree = ast.parse(open(os.path.join(HERE, module + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_imports_form_a_tree_with_three_leaves():
    # models.py, data.py and utils.py import nothing of the project; methods.py only models.py and
    # data.py (its pairs are data.PairMakers), demo_data.py only data.py; the stage scripts only
    # models, data, demo_data, methods and utils (bench.py also pretrain.py, for its step)
    graph = {m: project_imports(m) for m in MODULES}
    card = {"models", "data", "methods", "utils", "pretrain", "finetune", "evaluate", "bench"}
    assert card <= set(graph)
    assert graph["models"] == graph["data"] == graph["utils"] == set()
    assert graph["methods"] == {"models", "data"}
    assert graph["demo_data"] == {"data"}
    for stage in ("pretrain", "finetune", "evaluate"):
        assert graph[stage] <= {"models", "data", "demo_data", "methods", "utils"}, stage
    assert graph["bench"] <= {"models", "data", "utils", "pretrain"}

    def visit(m, path):  # depth-first: a module met again on its own path is a cycle
        assert m not in path, path + [m]
        for n in graph[m]:
            visit(n, path + [m])

    for m in MODULES:
        visit(m, [])


def test_the_readme_names_a_test_for_every_equation():
    # the equation table of README.md: every test it names exists, and every equation has one
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("## The method, where it lives"):readme.index("One step, as")]
    rows = [line for line in table.splitlines() if line.startswith("| Eq")]
    assert len(rows) == 5  # Eq 1, 2, 3, 4, 5/6
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)  # the cells, escaped pipes kept
        tests = cells[3].replace("`", "").replace(",", " ").split()
        assert tests and all(callable(globals().get(n)) for n in tests), row


def fake_cv2(root, message):
    """A `cv2` package under `root` whose import fails with `message`, as opencv-python's does where
    a library it links is missing. Returns an environment that puts it ahead of the real one."""
    os.makedirs(os.path.join(root, "cv2"))
    with open(os.path.join(root, "cv2", "__init__.py"), "w") as f:
        f.write(f"raise ImportError({message!r})\n")
    env = dict(os.environ, PYTHONPATH=str(root))
    for name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS"):  # the nested pytest runs as the README's
        env.pop(name, None)
    return env


def opencv_pin():
    """'==version' of the installed opencv-python (or its contrib flavour), '' for neither."""
    for name in ("opencv-python", "opencv-contrib-python"):
        try:
            return "==" + importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return ""


def test_without_libgl_every_entry_point_stops_with_one_line(tmp_path):
    # a slim container or GPU node without libGL.so.1: the stage scripts, bench.py, demo_data.py's
    # commands and the tests' collection each print one line naming both fixes, and exit 1
    env = fake_cv2(tmp_path / "nogl", "libGL.so.1: cannot open shared object file: No such file "
                                      "or directory")
    scripts = ["pretrain.py", "finetune.py", "evaluate.py", "bench.py", "demo_data.py"]
    pytest_collect = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                      "--collect-only", "test_videomoco.py"]
    one_line = [[sys.executable, s, "--help"] for s in scripts] + [pytest_collect]
    # code that imports data.py can catch it as the ImportError it is
    catch = [sys.executable, "-c", "try:\n    import data\nexcept ImportError as e:\n"
                                   "    print('caught', type(e).__name__)"]
    # any other import error is not ours to explain: its own traceback, for a script and for pytest
    other = fake_cv2(tmp_path / "other", "numpy.core.multiarray failed to import")
    runs = ([(c, env) for c in one_line] + [(catch, env)]
            + [([sys.executable, "demo_data.py", "--help"], other), (pytest_collect, other)])
    procs = [subprocess.Popen(c, cwd=HERE, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c, e in runs]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()  # no-op for those that ended
    codes = [p.returncode for p in procs]
    headless = rf"pip install opencv-(contrib-)?python-headless{re.escape(opencv_pin())} "
    for command, code, out in zip(one_line, codes, outputs):
        lines = out.strip().splitlines()
        assert code == 1 and len(lines) == 1, (command, out)
        assert "error: OpenCV cannot load: libGL.so.1: cannot open shared object file" in lines[0]
        assert "apt-get install libgl1 libglib2.0-0" in lines[0], command
        assert re.search(headless, lines[0]), command
    n = len(one_line)
    assert codes[n] == 0 and outputs[n].strip() == "caught OpenCVUnavailable", outputs[n]
    assert codes[n + 1] == 1 and "Traceback" in outputs[n + 1]
    assert codes[n + 2] == 2 and "INTERNALERROR" not in outputs[n + 2]  # a collection error
    for out in outputs[n + 1:]:
        assert "numpy.core.multiarray failed to import" in out and "OpenCV cannot load" not in out
