"""
What the stage scripts share, so that none of them imports another (DINO's utils.py); of the project
it imports only models.py (is_distributed). The run plumbing (distributed setup, autocast, RNG
state, atomic checkpoints and resume, logging and progress, the learning-rate schedule), frozen
evaluation (BN statistics re-estimated on training clips, features of whole sets, the weighted kNN
vote) and the transfer of a pretrained encoder into a downstream model.
"""

import contextlib
import inspect
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import models

# -----------------------------------------------------------------------------
# frozen evaluation: BN statistics, features of whole sets, kNN

def gather_objects(obj):
    """The concatenation of a list `obj` over all ranks (rank order); `obj` in a world of one."""
    if not models.is_distributed():
        return obj
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return [x for part in parts for x in part]


@torch.no_grad()
def per_video(fn, loader, device, ctx):
    """fn over batches of V videos of C clips (V*C, 3, T, H, W) -> ({index: (C, D) cpu float},
    skipped (bad) indices), over all ranks."""
    results = []
    skipped = []
    for batch in loader:
        video = batch["video"].to(device, non_blocking=True)  # (V, C, 3, T, H, W)
        v, c = video.shape[:2]
        with ctx:
            out = fn(video.flatten(0, 1)).float().view(v, c, -1).cpu()
        for i, index in enumerate(batch["index"].tolist()):
            if batch["valid"][i]:
                results.append((index, out[i].clone()))  # a view would pickle the whole batch
            else:
                skipped.append(index)
    return dict(gather_objects(results)), gather_objects(skipped)


def video_features(model, loader, device, ctx):
    """(features (V, D), video indices, skipped): model(clip) normalised, averaged over a video's
    clips, normalised again; the model as it is (eval; within models.pooled_features for pooled)."""
    feats, skipped = per_video(lambda x: F.normalize(model(x), dim=1), loader, device, ctx)
    index, mean = clip_average(feats)
    return F.normalize(mean, dim=1), index, skipped


def clip_average(outputs):
    """{video index: (clips, D)} of per_video -> (sorted indices (V,), (V, D) means over clips)."""
    index = torch.tensor(sorted(outputs), dtype=torch.long)
    return index, torch.stack([outputs[i].mean(0) for i in index.tolist()])


def pearson(a, b):
    """Pearson's r of each row of a and b (N, ...), each row flattened: (N,)."""
    a = a.flatten(1).float()
    b = b.flatten(1).float()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


@torch.no_grad()
def estimate_bn_statistics(encoder, loader, device, ctx):
    """Precise BN (Wu & Johnson 2021), in place: every BN layer's running statistics become the
    average over `loader`'s batches of its train-mode batch statistics; returns it in eval mode.
    Every frozen evaluation calls it, so that every encoder, pretrained or random, is read under
    statistics estimated alike on full training clips: the pretraining's own average what D saw
    last (full clips for MoCo, dropped ones in adversarial and random-drop rows), a random init's
    are 0 and 1."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average, every batch weighted alike
    encoder.train()
    for batch in loader:
        video = batch["video"][batch["valid"]].flatten(0, 1)  # (V*C, 3, T, H, W), bad ones out
        if len(video) == 0:  # an empty batch would still count in the cumulative average
            continue
        with ctx:
            encoder(video.to(device, non_blocking=True))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return encoder.eval()


def knn_predict(query, gallery, gallery_labels, num_classes, k=20, temperature=0.07):
    """Weighted k-NN vote: each of the k nearest gallery items votes exp(cos / temperature) for
    its class."""
    sim, index = (query @ gallery.T).topk(min(k, gallery.shape[0]), dim=1)  # (Q, k)
    votes = torch.zeros(query.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
    votes.scatter_add_(1, gallery_labels[index], (sim / temperature).exp())
    return votes.argmax(dim=1)


# -----------------------------------------------------------------------------
# run plumbing: distributed setup, autocast, RNG state, atomic checkpoints, logging

DEMO_CLIPS = dict(arch="tiny", frames=16, stride=2, crop=64)  # the demo presets' encoder and clips


def wrap_ddp(module, sync_buffers=True):
    """DistributedDataParallel in a world of several processes, every one starting from rank 0's
    parameters and buffers; the module itself (or None) in a world of one."""
    if module is None or not models.is_distributed():
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
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): pick the fastest kernels
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        # torchrun's agent keeps one TCP store across the restarts of --max-restarts, so a
        # restarted group may read the dead group's addresses (torch 2.14 with gloo: a refused
        # connection, at random). Each group formed on that store takes keys of its own: its
        # generation, counted in the store by its ranks (TORCHELASTIC_RESTART_COUNT would not do:
        # only the agent whose worker failed counts the restart). A rank that dies before it
        # gets here leaves the count short, and the next group waits out the store's timeout.
        store, _, _ = next(dist.rendezvous("env://"))
        generation = (store.add(f"videomoco/groups_of_{world}", 1) - 1) // world
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world,
                                store=dist.PrefixStore(f"group{generation}/", store))
    return rank, world, device


def end_distributed():
    """The end of a stage: its process group, if init_distributed formed one, destroyed."""
    if dist.is_initialized():
        dist.destroy_process_group()


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
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before it replaces the last good checkpoint
    os.replace(tmp, path)


def load_checkpoint(path, kind=None):
    """torch.load(weights_only=True), one clear line for a missing, corrupt or wrong-kind file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: checkpoint not found: {path}")
    except Exception as e:  # unpickling errors come in many types
        first = (str(e).splitlines() or ["empty or truncated"])[0][:120]
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{first})")
    if not isinstance(ckpt, dict):
        raise SystemExit(f"error: {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if kind is not None and ckpt.get("kind") != kind:
        raise SystemExit(f"error: {path} is a {ckpt.get('kind', 'backbone or foreign')} file, "
                         f"not a {kind} checkpoint")
    return ckpt


def save_checkpoint(path, kind, parts, scaler, rank, **fields):
    """One dict, written atomically by rank 0: every part's state_dict, the GradScaler's, every
    rank's RNG state and `fields`. Collective."""
    states = gather_objects([rng_state()])
    if rank == 0:
        parts = {k: v.state_dict() if v is not None else None for k, v in parts.items()}
        save_atomic({"kind": kind, **parts, "scaler": scaler.state_dict(), "rng": states,
                     **fields}, path)


def resume(path, kind, parts, scaler, rank, log, args, must_match=(), may_change=()):
    """save_checkpoint's inverse, if `path` exists (parts, scaler, this rank's RNG); returns the
    checkpoint or None. A flag of `must_match` ((name, default of older checkpoints)) that differs
    is a one-line error, one of `may_change` a warning."""
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
        self.rank = rank
        self.path = os.path.join(out, "log.jsonl")

    def __call__(self, line, **fields):
        if self.rank != 0:
            return
        print(line, flush=True)
        if fields:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                # this process's peak GPU memory so far, for bench's GPU report
                fields["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            with open(self.path, "a") as f:
                f.write(json.dumps(fields) + "\n")


def start_run(args, rank, device, preset):
    """The output folder, the log (saying which flags a preset set), every RNG seeded per rank, and
    autocast. Returns (log, autocast context, GradScaler)."""
    os.makedirs(args.out, exist_ok=True)
    log = Logger(args.out, rank)
    preset = {k: v for k, v in preset.items() if getattr(args, k) == v}  # those not given
    if preset:
        log(f"preset: {', '.join(f'{k}={v}' for k, v in preset.items())}")
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    ctx, scaler = autocast_context(args.amp, device)
    return log, ctx, scaler


class Progress:
    """A training loop's progress line, "epoch E step S/TOTAL <shown> R clips/s eta H:MM:SS <tail>",
    logged with the same fields. Count clips in `clips`; `restart()` at each epoch's start."""

    def __init__(self, step, total_steps):
        self.first_step = step
        self.total = total_steps
        self.t_start = time.time()
        self.restart()

    def restart(self):
        self.t_log = time.time()
        self.clips = 0

    def log(self, log, epoch, step, shown, tail="", **fields):
        """shown: (name, value, format spec) in print order; `fields` are logged, not printed."""
        now = time.time()
        rate = self.clips / max(now - self.t_log, 1e-9)
        eta = (now - self.t_start) / max(step - self.first_step, 1) * (self.total - step)
        text = " ".join(f"{name} {value:{spec}}" for name, value, spec in shown)
        s = int(eta)
        log(f"epoch {epoch} step {step}/{self.total} {text} {rate:.1f} clips/s eta "
            f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}{tail}", epoch=epoch, step=step,
            **{name: value for name, value, _ in shown}, clips_per_s=rate, eta_s=eta, **fields)
        self.restart()


def cosine(epoch, start, end):
    """A half-cosine lr factor, 1 in epoch `start`, near 0 in `end` - 1 (MoCo v2); 0 before."""
    if epoch < start:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * (epoch - start) / max(end - start, 1)))


# -----------------------------------------------------------------------------
# moving a pretrained encoder into a downstream model

def backbone_state(ckpt):
    """(arch, encoder_q's state dict without its head `fc`) of a pretraining checkpoint."""
    prefix = "encoder_q."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items()
             if k.startswith(prefix) and not k.startswith(prefix + "fc.")}
    return ckpt["args"]["arch"], state


def backbone_from_checkpoint(path):
    """(arch, encoder state without `fc`, checkpoint) of a pretraining ckpt.pt, or (None, state,
    None) of a backbone.pt; one clear line for anything else."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") == "pretrain":
        arch, state = backbone_state(ckpt)
        return arch, state, ckpt
    if "kind" in ckpt:
        raise SystemExit(f"error: {path} is a {ckpt['kind']} checkpoint; finetuning starts from a "
                         "pretraining checkpoint or a backbone.pt")
    # backbone.pt: a bare state dict
    return None, {k: v for k, v in ckpt.items() if not k.startswith("fc.")}, None


def generator_spec(ckpt):
    """A pretraining checkpoint's G and its settings, for evaluate.py --occlusion (finetune.py
    carries it into its checkpoint); None if the run had no G."""
    if ckpt is not None and ckpt.get("generator") is not None:
        return {"state": ckpt["generator"],
                **{k: ckpt["args"][k] for k in ("drop_frames", "frames")}}


def transfer_weights(model, state, source):
    """A pretrained backbone into `model` (head excluded): what did not match is reported, the
    wrong architecture stops with one line."""
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
    """The linear probe's classifier, fc = (BatchNorm1d without affine, Linear), as MAE's: still
    linear, and one lr suits every encoder (pooled features of norm ~0.5 at random init, ~6
    pretrained)."""
    model.fc = nn.Sequential(nn.BatchNorm1d(model.fc.in_features, affine=False), model.fc)
    return model
