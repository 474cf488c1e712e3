"""
What the test files share: the naive references (each equation as an independent Python loop),
small encoded videos (real files written by OpenCV), and the helpers more than one file uses.
"""

import copy
import json
import math
import os
import queue
import socket
import struct

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import models


HERE = os.path.dirname(os.path.abspath(__file__))


TINY = models.encoder_builder("tiny")  # base_encoder of the small models in these tests


def read_clip(path, start, num_frames, stride=1):
    """`num_frames` uint8 RGB frames (T, H, W, 3) at `stride` from frame `start` (VideoReader)."""
    with data.VideoReader(path) as reader:
        return reader.clips([start], num_frames, stride)[0]


# -----------------------------------------------------------------------------
# small encoded videos (the fixtures that write them are conftest.py's)


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
