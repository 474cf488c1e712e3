"""
What the stage scripts share, so that none of them imports another (DINO's utils.py): the
monitors of a run (pooled features of test-mode clips, the weighted kNN vote, the feature spread
that shows a collapse, the curves drawn from its log.jsonl), the run plumbing (flags and presets,
distributed setup, autocast, RNG state, atomic checkpoints, logging, pre-emption) and the transfer
of a pretrained encoder into a downstream model.

    python utils.py curves runs/demo/log.jsonl            # (re)draw runs/demo/curves.png
"""

import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import random
import signal
import sys
import time

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import loading
from models import pooled_features


# -----------------------------------------------------------------------------
# features of whole test sets, kNN

def gather_objects(obj):
    """The concatenation of a list `obj` over all ranks (rank order); `obj` in a world of one."""
    if not dist.is_initialized():
        return obj
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return [x for part in parts for x in part]


@torch.no_grad()
def per_video(fn, loader, device, ctx):
    """fn(clips (V*C, 3, T, H, W)) -> (V*C, D) per clip; returns {index: (C, D) cpu float}, skipped
    indices, over all ranks. Each batch holds V videos of C clips; invalid (bad) videos are
    skipped."""
    results, skipped = [], []
    for batch in loader:
        video = batch["video"].to(device, non_blocking=True)  # (V, C, 3, T, H, W)
        v, c = video.shape[:2]
        with ctx:
            out = fn(video.flatten(0, 1)).float().view(v, c, -1).cpu()
        for i, index in enumerate(batch["index"].tolist()):
            if batch["valid"][i]:
                results.append((index, out[i]))
            else:
                skipped.append(index)
    return dict(gather_objects(results)), gather_objects(skipped)


def video_features(model, loader, device, ctx):
    """(features (V, D), video indices (V,), skipped): the pooled features of each clip,
    L2-normalised, averaged over the video's clips and normalised again; the model is used as it
    is (eval mode)."""
    with pooled_features(model):
        feats, skipped = per_video(lambda x: F.normalize(model(x), dim=1), loader, device, ctx)
    index = torch.tensor(sorted(feats), dtype=torch.long)
    pooled = torch.stack([feats[i].mean(0) for i in index.tolist()])
    return F.normalize(pooled, dim=1), index, skipped


BN_CLIPS, BN_BATCH = 1024, 32


def bn_loader(args, workers, clips=BN_CLIPS):
    """The clips that BN statistics are estimated on before every frozen evaluation: the centre
    clip (evaluation transform, one crop) of up to `clips` training videos, a fixed random subset
    (the split files are ordered by class), in batches of BN_BATCH. Not sharded: every rank
    estimates the same statistics."""
    dataset, _, _ = loading.build_dataset(args, train=True, mode="test", clips=1,
                                          transform=data.EvalTransform(args.crop))
    keep = np.random.default_rng(0).permutation(len(dataset.samples))[:clips]
    dataset.samples = [dataset.samples[i] for i in sorted(keep)]
    return torch.utils.data.DataLoader(dataset, batch_size=BN_BATCH, num_workers=workers,
                                       collate_fn=loading.collate,
                                       worker_init_fn=loading.worker_init,
                                       generator=torch.Generator())  # not the global RNG's draws


@torch.no_grad()
def estimate_bn_statistics(encoder, loader, device, ctx):
    """Precise BN (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021), in place: the running
    statistics of every BN layer become the average over the batches of `loader` of its batch
    statistics in train-mode forwards. Returns the encoder in eval mode.

    Every frozen evaluation (kNN, the linear probe, the kNN monitor) calls it first, so that every
    encoder, pretrained or random, is read under statistics estimated the same way on full
    training clips. The pretraining's own running statistics average whatever D was fed last
    (full clips for MoCo, clips with k frames zeroed for the adversarial and random-drop rows, and
    both where D(x) of Eq 4 runs in train mode), and a random init has none (mean 0, variance 1)."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average, every batch weighted alike
    encoder.train()
    for batch in loader:
        video = batch["video"][batch["valid"]].flatten(0, 1)  # (V*C, 3, T, H, W), bad ones out
        with ctx:
            encoder(video.to(device, non_blocking=True))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return encoder.eval()


def knn_predict(query, gallery, gallery_labels, num_classes, k=20, temperature=0.07):
    """Weighted k-NN vote: each of the k nearest gallery items votes exp(cos / T) for its class."""
    sim, index = (query @ gallery.T).topk(min(k, gallery.shape[0]), dim=1)  # (Q, k)
    votes = torch.zeros(query.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
    votes.scatter_add_(1, gallery_labels[index], (sim / temperature).exp())
    return votes.argmax(dim=1)


class KNNMonitor:
    """Weighted 20-NN top-1 of an encoder's pooled features during pretraining (MoCo's CIFAR demo,
    solo-learn's online kNN): the train split is the gallery, the test split the queries, one centre
    clip per video (evaluate.py uses 10). The clips are decoded on every call: nothing is cached."""

    def __init__(self, args, workers, k=20):
        self.k = k
        self.bn_loader = bn_loader(args, workers)
        loaders = []
        for train in (True, False):
            dataset, classes, _ = loading.build_dataset(args, train=train, mode="test", clips=1)
            loaders.append(loading.build_loader(dataset, 16, workers, train=False))
        self.gallery_loader, self.query_loader = loaders
        self.num_classes = len(classes)
        self.labels = [torch.tensor([y for _, y in loader.dataset.samples]) for loader in loaders]

    def __call__(self, encoder, device, ctx):
        # a copy under re-estimated BN statistics (estimate_bn_statistics); the encoder is untouched
        encoder = estimate_bn_statistics(copy.deepcopy(encoder), self.bn_loader, device, ctx)
        g, g_index, _ = video_features(encoder, self.gallery_loader, device, ctx)
        q, q_index, _ = video_features(encoder, self.query_loader, device, ctx)
        pred = knn_predict(q, g, self.labels[0][g_index], self.num_classes, self.k)
        return (pred == self.labels[1][q_index]).float().mean().item()

    def measure(self, encoder, epochs_done, device, ctx, log):
        top1 = self(encoder, device, ctx)
        chance = 1 / self.num_classes
        log(f"kNN top-1 after {epochs_done} epochs: {top1:.3f} (chance {chance:.3f}; "
            f"{self.k}-NN on the test split, 1 clip per video)", curve=True, epoch=epochs_done,
            knn_top1=top1, knn_chance=chance)



def learning_summary(log, epochs):
    """The first and last measurement of the queue-free metric and of kNN in the run's log, one line
    each (rank 0: it reads the log)."""
    records = read_epoch_log(log.path)
    probe = [r for r in records if r.get("probe_loss") is not None]
    if len(probe) > 1:
        a, b = probe[0], probe[-1]
        log(f"queue-free loss went from {a['probe_loss']:.3f} at epoch {a['epoch']} to "
            f"{b['probe_loss']:.3f} after {epochs} epochs (chance {b['probe_chance']:.3f}), "
            f"its top-1 from {a['probe_top1']:.3f} to {b['probe_top1']:.3f} (chance "
            f"{math.exp(-b['probe_chance']):.3f})")
    knn = [r for r in records if r.get("knn_top1") is not None]
    if len(knn) > 1:
        log(f"kNN top-1 on the test split went from {knn[0]['knn_top1']:.3f} at epoch "
            f"{knn[0]['epoch']} to {knn[-1]['knn_top1']:.3f} after {epochs} epochs "
            f"(chance {knn[-1]['knn_chance']:.3f})")


# -----------------------------------------------------------------------------
# collapse monitor

def feature_spread(z):
    """sqrt(D) x the mean over dimensions of the standard deviation over the batch of L2-normalised
    features z (N, D): the collapse monitor of SimSiam (Chen & He 2021, Sec 4.1) scaled so that
    isotropic features give ~1 and features collapsed onto one point give 0."""
    z = F.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


COLLAPSE_LOSS_FRACTION = 0.98  # "within 2 % of chance"
COLLAPSE_SPREAD = 0.1


def collapse_warning(loss, spread, chance):
    """One line for an epoch whose queue-free loss `loss` ended within 2 % of its chance level or
    whose mean feature spread stayed near 0, else None. (The training loss is no evidence either
    way: against a stale queue it can sit far below chance with nothing learned.)"""
    if loss >= COLLAPSE_LOSS_FRACTION * chance:
        why = (f"the queue-free loss ({loss:.3f}) ended an epoch within 2% of its chance level "
               f"{chance:.3f}")
    elif spread < COLLAPSE_SPREAD:
        why = f"the feature spread ({spread:.3f}) stayed near 0 (collapse) for a whole epoch"
    else:
        return None
    return f"warning: {why}: the pretext task is not learning; see README, 'Does it learn?'"


# -----------------------------------------------------------------------------
# curves.png from log.jsonl

CURVES = (("loss", "training loss (against the queue)", "chance"),
          ("probe_loss", "queue-free loss", "probe_chance"), ("spread", "feature spread", None),
          ("knn_top1", "kNN top-1 (test split)", "knn_chance"))


def read_epoch_log(path):
    """The per-epoch records (those with "curve": true) of a log.jsonl, in order; a later record of
    the same epoch and key (a resumed run) replaces the earlier one."""
    records = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("curve"):
                records.setdefault(r["epoch"], {}).update(r)
    return [records[e] for e in sorted(records)]


def _panel(records, key, title, ref_key, size=(400, 250)):
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 52, 12, 26, 30
    cv2.putText(img, title, (left, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    points = [(r["epoch"], r[key]) for r in records
              if r.get(key) is not None and math.isfinite(r[key])]
    refs = [r[ref_key] for r in records if ref_key and r.get(ref_key) is not None]
    if not points:
        cv2.putText(img, "no data", (w // 2 - 30, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (128, 128, 128), 1)
        return img
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_max = max(max(xs), 1)
    lo, hi = min(ys + refs + [0.0]), max(ys + refs)
    hi = hi if hi > lo else lo + 1
    to_px = lambda x, y: (int(left + (w - left - right) * x / x_max),  # noqa: E731
                          int(h - bottom - (h - top - bottom) * (y - lo) / (hi - lo)))
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    for frac in (0, 0.5, 1):
        y = lo + frac * (hi - lo)
        cv2.putText(img, f"{y:.2f}", (2, to_px(0, y)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                    (0, 0, 0), 1, cv2.LINE_AA)
    for x in sorted({0, x_max // 2, x_max}):
        cv2.putText(img, str(x), (to_px(x, lo)[0] - 4, h - bottom + 14), cv2.FONT_HERSHEY_SIMPLEX,
                    0.38, (0, 0, 0), 1)
    cv2.putText(img, "epoch", (w // 2 - 18, h - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1)
    if refs:  # the chance level, dashed grey
        y = to_px(0, refs[-1])[1]
        for x in range(left, w - right, 10):
            cv2.line(img, (x, y), (min(x + 5, w - right), y), (150, 150, 150), 1)
    pts = np.array([to_px(x, y) for x, y in points], np.int32)
    cv2.polylines(img, [pts], False, (200, 90, 20), 2, cv2.LINE_AA)
    for p in pts:
        cv2.circle(img, tuple(int(v) for v in p), 3, (200, 90, 20), -1, cv2.LINE_AA)
    return img


def draw_curves(log_path, png_path):
    """A 2x2 PNG of the training loss, the queue-free loss, the feature spread and kNN top-1 (chance
    dashed) against epoch, from the per-epoch records of log.jsonl; written atomically."""
    records = read_epoch_log(log_path)
    panels = [_panel(records, key, title, ref) for key, title, ref in CURVES]
    img = np.concatenate([np.concatenate(panels[:2], 1), np.concatenate(panels[2:], 1)], 0)
    tmp = png_path + ".tmp.png"
    cv2.imwrite(tmp, img)
    os.replace(tmp, png_path)
    return img

# -----------------------------------------------------------------------------
# run plumbing shared by the stage scripts: flags and presets, distributed setup, autocast, RNG
# state, atomic checkpoints, logging, pre-emption

DEMO_CLIPS = dict(arch="tiny", frames=16, stride=2, crop=64)  # the demo presets' encoder and clips


def parse_args(parser, argv=None):
    """(args, given): the parsed flags and the names of those set on the command line, so that a
    preset can fill in only the others."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    sentinel = object()
    probe = parser.parse_args(argv, argparse.Namespace(**{k: sentinel for k in vars(args)}))
    return args, {k for k, v in vars(probe).items() if v is not sentinel}


def apply_preset(args, given, preset):
    """Set the flags of `preset` that were not given on the command line; returns what it set."""
    applied = {k: v for k, v in preset.items() if k not in given}
    for key, value in applied.items():
        setattr(args, key, value)
    return applied


def is_demo(args):
    return args.dataset in data.DEMOS and args.data_root is None


def wrap_ddp(module, sync_buffers=True):
    """DistributedDataParallel in a world of several processes, every one starting from rank 0's
    parameters and buffers; the module itself (or None) in a world of one."""
    if module is None or not dist.is_initialized():
        return module
    for t in module.state_dict().values():
        dist.broadcast(t, src=0)
    # torch >= 2.14 renamed the switch broadcast_buffers to forward_sync_buffers
    renamed = "forward_sync_buffers" in inspect.signature(DDP).parameters
    return DDP(module, **{"forward_sync_buffers" if renamed else "broadcast_buffers": sync_buffers})


def per_rank(batch_size, world):
    """The batch of one process, or a one-line error when the global batch does not divide."""
    if batch_size % world:
        raise SystemExit(f"error: --batch-size {batch_size} is not divisible by {world} processes")
    return batch_size // world


def init_distributed():
    """torchrun's environment -> process group (nccl on CUDA, gloo on CPU); none -> a world of one,
    same code, collectives skipped. Returns (rank, world_size, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def autocast_context(amp, device):
    """(context, GradScaler) for --amp. The scaler is enabled for float16 only; disabled, its
    scale() is the identity, step() a plain optimizer step and its state_dict() empty."""
    amp = amp or ("bf16" if device.type == "cuda" else "none")
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("error: --amp fp16 needs CUDA; use --amp bf16 on CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if amp == "none":
        return contextlib.nullcontext(), scaler
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), scaler


def rng_state():
    """Every RNG's full state, in types torch.load(weights_only=True) accepts."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(words), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path):
    """torch.save to path.tmp, then os.replace: a crash mid-write never leaves a broken file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind=None):
    """torch.load(weights_only=True), one clear line for a missing, corrupt or wrong-kind file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: checkpoint not found: {path}")
    except Exception as e:  # unpickling errors come in many types
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict) or (kind is not None and ckpt.get("kind") != kind):
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} is a {found} checkpoint, expected {kind}")
    return ckpt


def save_checkpoint(path, kind, parts, scaler, rank, **fields):
    """One dict, written atomically by rank 0: the state_dict of every part (None stays None), the
    GradScaler's, every rank's RNG state (a resumed run continues each stream) and `fields`.
    Collective: every rank calls it."""
    states = gather_objects([rng_state()])
    if rank == 0:
        parts = {k: v.state_dict() if v is not None else None for k, v in parts.items()}
        save_atomic({"kind": kind, **parts, "scaler": scaler.state_dict(), "rng": states,
                     **fields}, path)


def resume(path, kind, parts, scaler, rank, log, args, must_match=(), may_change=()):
    """The inverse of save_checkpoint, if `path` exists: every part that is not None, the scaler and
    this rank's RNG state are restored; returns the checkpoint dict, or None. A flag in
    `must_match` that differs from the checkpoint's (name, default for older checkpoints) is a
    one-line error; one in `may_change` a warning."""
    if not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path, kind)
    flag = {k: "--" + k.replace("_", "-") for k in [*dict(must_match), *may_change]}
    for key, default in must_match:
        if ckpt["args"].get(key, default) != getattr(args, key):
            raise SystemExit(f"error: {path} is a {flag[key]} {ckpt['args'].get(key, default)} "
                             f"run; use another --out for {flag[key]} {getattr(args, key)}")
    for name, part in parts.items():
        if part is not None:
            part.load_state_dict(ckpt[name])
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # older: one dict
    set_rng_state(states[rank] if rank < len(states) else states[0])
    changed = [k for k in may_change if ckpt["args"].get(k) != getattr(args, k)]
    if changed:
        log("warning: resuming with changed flags " + ", ".join(
            f"{flag[k]} {ckpt['args'].get(k)} -> {getattr(args, k)}" for k in changed))
    done = ckpt.get("epoch_step", 0)
    log(f"resuming from {path}: epoch {ckpt['epoch']}, step {ckpt['step']}"
        + (f" (mid-epoch, {done} steps of it done)" if done else ""))
    return ckpt


class Logger:
    """One human line and one JSON line (OUT/log.jsonl) per call, rank 0 only."""

    def __init__(self, out, rank):
        self.rank, self.path = rank, os.path.join(out, "log.jsonl")

    def __call__(self, line, **fields):
        if self.rank != 0:
            return
        print(line, flush=True)
        if fields:
            with open(self.path, "a") as f:
                f.write(json.dumps(fields) + "\n")


def start_run(args, rank, device, preset):
    """The output folder, the log (saying which demo preset flags were filled in), every RNG seeded
    per rank, and autocast. Returns (log, autocast context, GradScaler)."""
    os.makedirs(args.out, exist_ok=True)
    log = Logger(args.out, rank)
    if getattr(args, "augment_on", "") is None:  # the GPU is cheaper than the loader (bench.py)
        args.augment_on = "device" if device.type == "cuda" else "workers"
    if preset:
        log(f"demo preset (no --data-root): {', '.join(f'{k}={v}' for k, v in preset.items())}")
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    ctx, scaler = autocast_context(args.amp, device)
    return log, ctx, scaler


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The progress line of a training loop: "epoch E step S/TOTAL <shown> R clips/s eta H:MM:SS
    <tail>", logged with the same fields. Count trained clips in `clips`; `restart()` at the start
    of an epoch, so that evaluation between epochs does not count as training time."""

    def __init__(self, step, total_steps):
        self.first_step, self.total, self.t_start = step, total_steps, time.time()
        self.restart()

    def restart(self):
        self.t_log, self.clips = time.time(), 0

    def log(self, log, epoch, step, shown, tail="", **fields):
        """shown: (name, value, format spec) in print order; `fields` are logged, not printed."""
        now = time.time()
        rate = self.clips / max(now - self.t_log, 1e-9)
        eta = (now - self.t_start) / max(step - self.first_step, 1) * (self.total - step)
        text = " ".join(f"{name} {value:{spec}}" for name, value, spec in shown)
        log(f"epoch {epoch} step {step}/{self.total} {text} {rate:.1f} clips/s eta "
            f"{format_eta(eta)}{tail}",
            epoch=epoch, step=step, **{name: value for name, value, _ in shown},
            clips_per_s=rate, eta_s=eta,
            **fields)
        self.restart()


def cosine(epoch, start, end):
    """The factor of a half-cosine learning-rate schedule that starts at 1 in epoch `start` and ends
    near 0 in epoch `end` - 1 (MoCo v2, per epoch); 0 before `start`."""
    if epoch < start:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * (epoch - start) / max(end - start, 1)))


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (cluster pre-emption); all ranks agree on it at each step."""

    def __init__(self):
        self.set = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.set = True


def all_ranks_any(flags, device):
    """Element-wise OR of small boolean lists across ranks (one all-reduce)."""
    t = torch.tensor([float(f) for f in flags], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class Guard:
    """What every rank must decide alike at each step, in one all-reduce: skip a non-finite step
    (and stop after --max-nonfinite in a row), stop on a signal, save a mid-epoch checkpoint."""

    def __init__(self, args, device, log):
        self.args, self.device, self.log = args, device, log
        self.signal, self.nonfinite, self.last_save = StopFlag(), 0, time.time()
        self.stop = self.save_due = False

    def agree(self, finite):  # models.videomoco_step's `agree`: update or not
        due = time.time() - self.last_save > self.args.save_every_min * 60
        flags = [self.signal.set, not finite, due]
        self.stop, nonfinite, self.save_due = all_ranks_any(flags, self.device)
        return not nonfinite

    def count(self, out, step):
        if out["updated"]:
            self.nonfinite = 0
            return
        self.nonfinite += 1
        self.log(f"non-finite loss at step {step} (loss_d {out['loss_d'].item()}, "
                 f"{self.nonfinite} in a row): step skipped")
        if self.nonfinite >= self.args.max_nonfinite:
            raise SystemExit(f"error: {self.nonfinite} non-finite losses in a row; "
                             "lower --lr or try --amp none")


# -----------------------------------------------------------------------------
# moving a pretrained encoder into a downstream model

def backbone_state(ckpt):
    """(arch, query-encoder state dict without the projection head `fc`) of a loaded pretraining
    checkpoint, whatever its method (all of them keep the encoder under `encoder_q.`)."""
    prefix = "encoder_q."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items()
             if k.startswith(prefix) and not k.startswith(prefix + "fc.")}
    return ckpt["args"]["arch"], state


def backbone_from_checkpoint(path):
    """(arch or None, encoder state dict without the projection head `fc`, the checkpoint dict or
    None) from a pretraining checkpoint or a backbone.pt; one clear line for anything else."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") == "pretrain":
        arch, state = backbone_state(ckpt)
        return arch, state, ckpt
    if "kind" in ckpt:
        raise SystemExit(f"error: {path} is a {ckpt['kind']} checkpoint; finetuning starts from a "
                         "pretraining checkpoint or a backbone.pt")
    # backbone.pt: a bare state dict
    return None, {k: v for k, v in ckpt.items() if not k.startswith("fc.")}, None


def transfer_weights(model, state, source):
    """Load a pretrained backbone into `model` (head excluded); report what did not match, and stop
    with one line when nothing or the wrong architecture matches."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:1]
        raise SystemExit(f"error: {source} does not fit --arch: "
                         f"{first[0] if first else str(e)[:200]}")
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        if len(missing) > len(state) // 2:
            raise SystemExit(f"error: {source} does not match the architecture: {len(missing)} "
                             f"missing keys, e.g. {missing[0]}; pass the right --arch")
        print(f"weight transfer from {source}: {len(missing)} missing keys {missing[:3]}, "
              f"{len(result.unexpected_keys)} unexpected {result.unexpected_keys[:3]}")
    return len(state) - len(result.unexpected_keys)


def add_probe_norm(model):
    """The linear probe's classifier: a BatchNorm without affine parameters standardises each frozen
    feature before `fc` (as MAE's linear probe does); it is still a linear classifier. Without it
    the probe's learning rate means something different for every encoder: here a random-init
    encoder's pooled features have norm ~0.5 and a pretrained one's ~6, so one lr underfits the
    first and overshoots the second. The head becomes fc = Sequential(BatchNorm1d, Linear)."""
    model.fc = nn.Sequential(nn.BatchNorm1d(model.fc.in_features, affine=False), model.fc)
    return model


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "curves":
        sys.exit("usage: python utils.py curves OUT/log.jsonl")
    out = os.path.join(os.path.dirname(sys.argv[2]) or ".", "curves.png")
    draw_curves(sys.argv[2], out)
    print(out)
