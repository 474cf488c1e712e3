"""
Self-supervised pretraining: VideoMoCo (Pan et al., CVPR 2021).

    python pretrain.py                  # demo preset: built-in data, CPU, a few minutes
    torchrun --nproc_per_node=8 pretrain.py --dataset kinetics --data-root /data/k400 --out k400
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT pretrain.py

The step, in paper terms. x is a clip, x_key another augmentation of the same clip. Before
--adv-start, D is trained alone with MoCo's InfoNCE (Eq 1, with the decay of Eq 6). From --adv-start
on, G scores every frame, the k most important frames are dropped (Eq 3), D minimises the decayed
InfoNCE with x_query as the query (Eq 5/6), and G maximises |D(x_query) - D(x)|_1 (Eq 4), each net
updated only by its own loss (models.adversarial_backward). The momentum encoder follows Eq 2.

Rerunning the same command with the same --out resumes from OUT/ckpt.pt. SIGTERM / SIGUSR1 (cluster
pre-emption) saves a checkpoint and exits cleanly.
"""

import argparse
import copy
import functools
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import loading
import methods
import models
import utils


METHODS = ("videomoco", "moco", "cvrl", "vclr")
G_RATIO_STEPS = 5  # steps of an adversarial epoch, evenly spaced, that measure G against random


def get_args_parser():
    p = argparse.ArgumentParser("VideoMoCo pretraining", add_help=True)
    loading.add_data_args(p)  # --dataset --data-root --split --frames --stride --crop --workers ...
    # model
    p.add_argument("--arch", default="r2plus1d_10", choices=models.ARCHS, help="encoder D")
    p.add_argument("--input", default="rgb", choices=models.INPUTS, help="rgb or residual frames")
    p.add_argument("--moco-dim", type=int, default=128, help="feature dimension (MoCo: 128)")
    p.add_argument("--moco-k", type=int, default=65536, help="queue size K in keys (paper: 65536)")
    p.add_argument("--moco-m", type=float, default=0.999, help="momentum m, Eq 2 (paper: 0.999)")
    p.add_argument("--moco-t", type=float, default=0.07, help="temperature tau, Eq 1 (paper: 0.07)")
    p.add_argument("--decay", type=float, default=0.99999,
                   help="t of Eq 6; 1 = MoCo (paper: 0.99999)")
    p.add_argument("--decay-start", type=int, default=None,
                   help="epoch from which D's loss is Eq 6, not Eq 1 (default: --adv-start)")
    p.add_argument("--decay-unit", default="key", choices=("key", "step"),
                   help="age i of Eq 6 in keys (paper) or in enqueue steps (authors' code)")
    p.add_argument("--shuffle-splits", type=int, default=2,
                   help="shuffle-BN processes emulated in one")
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True,
                   help="MoCo v2's MLP projection head (default) or --no-mlp, MoCo v1's linear one")
    p.add_argument("--jitter", type=float, default=0.8,
                   help="P(colour jitter) per clip (MoCo v2: 0.8)")
    p.add_argument("--grayscale", type=float, default=0.2,
                   help="P(grayscale) per clip (MoCo v2: 0.2)")
    # method: VideoMoCo, its MoCo baseline, and the methods users compare it with (methods.py)
    p.add_argument("--method", default="videomoco", choices=METHODS,
                   help="videomoco; moco (= --generator none --decay 1); cvrl; vclr")
    methods.add_method_args(p)  # CVRL, VCLR and background erasing
    # generator G
    p.add_argument("--generator", default="convlstm", choices=("convlstm", "random", "none"),
                   help="frames dropped by G (adversarial), at random (Table 1), or none (MoCo)")
    p.add_argument("--drop-frames", type=int, default=None, help="k of Eq 3 (default T/4: 8 of 32)")
    p.add_argument("--g-hidden", type=int, default=256, help="LSTM hidden units of G (paper: 256)")
    p.add_argument("--g-width", type=int, default=16, help="channels of G's first conv layer")
    p.add_argument("--g-temperature", type=float, default=1.0,
                   help="of the straight-through soft mask")
    p.add_argument("--adv-start", type=int, default=None,
                   help="first adversarial epoch (default: half)")
    # optimisation
    p.add_argument("--epochs", type=int, default=200, help="training epochs (paper: 200)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (paper: 128)")
    p.add_argument("--lr", type=float, default=0.02, help="D's SGD lr, cosine decay (paper: 0.02)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    p.add_argument("--wd", type=float, default=1e-4, help="D's weight decay (MoCo: 1e-4)")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "none"),
                   help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--channels-last", action="store_true",
                   help="encoders in channels_last_3d memory (bench.py --step measures it)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoders (bench.py --step measures it)")
    # run
    p.add_argument("--out", default="runs/pretrain",
                   help="ckpt.pt, backbone.pt, log.jsonl, curves.png")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--print-freq", type=int, default=20, help="steps between log lines")
    p.add_argument("--save-every-min", type=float, default=30,
                   help="minutes between mid-epoch saves")
    p.add_argument("--max-nonfinite", type=int, default=20,
                   help="non-finite losses in a row that stop")
    p.add_argument("--knn-every", type=int, default=0, help="epochs between kNN monitors; 0 = off")
    return p


# The demo preset: `python pretrain.py` without --data-root, about 2.5 minutes on 2 CPU cores; flags
# given win. K = 64 against 180 training videos (K/N 0.36; the paper's 65536 of Kinetics' 240k is
# 0.27); t makes the oldest key weigh 0.52 (0.9898^64) as the paper's 0.99999^65536; no colour
# jitter, which holds the loss at 0.75 of chance at this budget (RESULTS.md); grayscale stays.
DEMO_PRESET = dict(**utils.DEMO_CLIPS, batch_size=32, epochs=30, workers=2,
                   moco_k=64, moco_m=0.99, decay=0.9898, lr=0.1, jitter=0.0, knn_every=5,
                   print_freq=10, out="runs/demo")
# per method, on top of DEMO_PRESET: VCLR's three clips must fit in the demo's 32-48 frame videos
METHOD_DEMO_PRESET = {"vclr": dict(frames=8, stride=1)}
# a method's own defaults for the shared flags (the official VCLR code's tau and K); the demo
# preset's K wins over them
METHOD_DEFAULTS = {"vclr": dict(moco_t=0.1, moco_k=131072)}


# -----------------------------------------------------------------------------
# one step of the chosen method

def train_step(model, generator, video, order, phase, args, opt_d, opt_g, ctx, scaler, agree, decay,
               compare_random):
    """One step on a batch. video: (N, 2, 3, T, H, W), x and x_key, two augmentations of the same
    clip (VCLR: (N, 2, S, 3, T, H, W), two tuples, with `order` = (order label, segments)). Phases
    "moco", "random-drop" and "adversarial" are models.videomoco_step; "cvrl" and "vclr" are
    methods.contrastive_step. Returns the model's dict with "loss_d" (the encoder's loss), "loss_g"
    (G's, or None) and "updated"."""
    x, x_key = video[:, 0], video[:, 1]
    if args.background_erasing > 0:  # on the query view (every clip of VCLR's anchor tuple)
        x = methods.background_erasing(x.flatten(0, x.dim() - 5), args.background_erasing,
                                       args.be_weight)[0].view_as(x)
    if phase in ("cvrl", "vclr"):
        inputs = (x, x_key) if phase == "cvrl" else (x, x_key, *order)
        return methods.contrastive_step(model, inputs, opt_d, ctx, scaler, agree)
    generator = generator if phase == "adversarial" else None
    return models.videomoco_step(model, x, x_key, opt_d, generator, opt_g, args.drop_frames,
                                 args.g_temperature, decay, random_k=phase == "random-drop",
                                 compare_random=compare_random, autocast=ctx, scaler=scaler,
                                 agree=agree)


def settle_args(args, given):
    """Defaults that depend on other flags, and one-line errors for flags that do not fit."""
    if args.method == "moco":  # the paper's baseline row: no generator, no decay
        changed_g = "generator" in given and args.generator != "none"
        if changed_g or ("decay" in given and args.decay != 1):
            raise SystemExit("error: --method moco means --generator none --decay 1")
        args.generator, args.decay = "none", 1.0
    if args.method in ("cvrl", "vclr"):
        args.generator = "none"  # G belongs to VideoMoCo
    if args.adv_start is None:
        args.adv_start = args.epochs // 2  # the paper: D alone for the first half (Sec 4.2)
    if args.decay_start is None:  # Sec 3.2: "Initially, we train D ... only use ... Eq. (1)"
        args.decay_start = args.adv_start
    if args.method == "vclr" and args.segments < 3:
        raise SystemExit(f"error: --segments must be at least 3 for --method vclr (its order task "
                         f"shuffles a tuple into neither its order nor the reverse), got "
                         f"{args.segments}")
    if args.drop_frames is None:
        args.drop_frames = max(args.frames // 4, 1)  # the paper's ratio, 8 of 32 (Sec 3.1: 25 %)
    if args.generator != "none" and not 0 < args.drop_frames < args.frames:
        raise SystemExit(f"error: --drop-frames must be in 1..{args.frames - 1} for --frames "
                         f"{args.frames} (no dropping is --generator none)")


def build_models(args, device, world, log):
    """(model, G or None, and the two as the loop calls them: DDP-wrapped in a world of several)."""
    base_encoder = models.encoder_builder(args.arch, args.input)
    if args.method == "cvrl":
        model = methods.CVRL(base_encoder, args.moco_dim, args.cvrl_hidden, args.cvrl_t)
    elif args.method == "vclr":
        model = methods.VCLR(base_encoder, args.moco_dim, args.moco_k, args.moco_m, args.moco_t,
                             args.segments, args.order_weight, args.shuffle_splits, args.mlp,
                             args.clip_weight)
    else:
        model = models.VideoMoCo(base_encoder, args.moco_dim, args.moco_k, args.moco_m, args.moco_t,
                                 args.decay, args.decay_unit, args.shuffle_splits, args.mlp)
    model = methods.global_batchnorm(model, args.method, device, world, log).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    for name in ("encoder_q", "encoder_k") if args.compile else ():
        if hasattr(model, name):  # in place, so that the state_dict keys stay torchvision's
            getattr(model, name).compile()
    # G exists only where it is used: --method videomoco with --generator convlstm
    generator = None
    if args.generator == "convlstm":
        generator = models.ConvLSTMGenerator(3, args.g_hidden, args.g_width).to(device)
    log(f"{args.method}: encoder {args.arch} on {args.input} input, "
        f"{models.count_parameters(model.encoder_q) / 1e6:.2f}M parameters"
        + (f"; G: ConvLSTM, {models.count_parameters(generator) / 1e6:.2f}M" if generator else "")
        + f"; {world} process(es) on {device}")
    # every rank starts from rank 0's weights and queue (MoCo relies on identical queues), then no
    # buffer sync: the queue is updated identically on every rank from gathered keys, so
    # re-broadcasting it (dim x K floats) every step, as DDP's default would, is pure traffic
    return model, generator, utils.wrap_ddp(model, sync_buffers=False), utils.wrap_ddp(generator)


def save_checkpoint(path, args, parts, scaler, epoch, step, epoch_step, rank):
    """ckpt.pt (everything a resume needs) and backbone.pt (the query encoder without its
    projection head, keyed as torchvision's model of the same arch), both written atomically by
    rank 0. Collective: every rank calls it."""
    utils.save_checkpoint(path, "pretrain", parts, scaler, rank, method=args.method, epoch=epoch,
                          step=step, epoch_step=epoch_step, args=vars(args))
    if rank == 0:
        backbone = {k: v for k, v in parts["model"].encoder_q.state_dict().items()
                    if not k.startswith("fc.")}
        utils.save_atomic(backbone, os.path.join(os.path.dirname(path), "backbone.pt"))


def epoch_schedule(args, epoch, opt_d, opt_g):
    """Set both learning rates for `epoch`; returns (phase, t of Eq 6 for this epoch)."""
    for group in opt_d.param_groups:  # cosine, per epoch (MoCo v2)
        group["lr"] = args.lr * utils.cosine(epoch, 0, args.epochs)
    for group in opt_g.param_groups if opt_g else []:  # G's own cosine over its own phase
        group["lr"] = args.lr * utils.cosine(epoch, args.adv_start, args.epochs)
    phase = args.method if args.method in ("cvrl", "vclr") else "moco"
    if epoch >= args.adv_start and args.generator != "none":
        phase = "adversarial" if args.generator == "convlstm" else "random-drop"
    return phase, (args.decay if epoch >= args.decay_start else 1.0)


def train_epoch(epoch, skip, step, loader, bad, model, generator, opt_d, opt_g, ctx, scaler, args,
                guard, progress, save, log, device):
    """One epoch, from its step `skip` on. Returns (step, phase, decay, sums, stopped): sums (6,)
    over the updated steps: the contrastive loss, the instance accuracy, the feature spread, 1, and
    Eq 4's distance for G's drops and for random ones (on the steps that measure it); stopped: by a
    signal."""
    phase, decay = epoch_schedule(args, epoch, opt_d, opt_g)
    loader.sampler.set_epoch(epoch, skip * loader.batch_size)  # in videos
    model.train()
    if generator is not None:
        generator.train()
    progress.restart()
    sums = torch.zeros(6, device=device)
    for epoch_step, batch in enumerate(loader, start=skip):
        bad.update(batch["bad"])
        # (N, 2, 3, T, H, W); VCLR (N, 2, S, ...)
        video = data.to_device(batch, device)
        order = [batch[k].to(device) for k in ("order", "segments")] if "order" in batch else None
        out = train_step(model, generator, video, order, phase, args, opt_d, opt_g, ctx, scaler,
                         guard.agree, decay,
                         compare_random=epoch_step % max(len(loader) // G_RATIO_STEPS, 1) == 0)
        guard.count(out, step)
        spread = utils.feature_spread(out["q"])
        if out["updated"]:
            eq4 = (-out["loss_g"].detach(), out["l1_random"]) if "l1_random" in out else (0, 0)
            sums += torch.stack([torch.as_tensor(v, device=device).float() for v in (
                out.get("loss_nce", out["loss_d"]).detach(), out["acc"], spread, 1, *eq4)])
        step += 1
        progress.clips += args.batch_size
        if step % args.print_freq == 0 or epoch_step + 1 == len(loader):
            bad.flush()  # all ranks' bad videos (a collective, at the same step on every rank)
            loss_g = out["loss_g"].item() if out["loss_g"] is not None else float("nan")
            shown = [("loss_d", out["loss_d"].item(), ".4f"), ("loss_g", loss_g, ".4f"),
                     ("acc", out["acc"].item(), ".3f"), ("spread", spread.item(), ".3f"),
                     ("lr", opt_d.param_groups[0]["lr"], ".4g")]
            extra = {k: out[k].item() for k in ("loss_order", "order_acc", "loss_clip")
                     if out.get(k) is not None}  # VCLR's
            tail = "".join(f" {k} {v:.4f}" for k, v in extra.items()) + f" bad {len(bad)} [{phase}]"
            progress.log(log, epoch, step, shown, tail, bad_videos=len(bad), phase=phase, **extra)
        if guard.stop or guard.save_due:
            save(epoch, step, epoch_step + 1)
            guard.last_save = time.time()
            if guard.stop:
                log(f"signal received: saved a checkpoint at epoch {epoch} step {step}; "
                    "rerun the same command to resume")
                return step, phase, decay, sums, True
    return step, phase, decay, sums, False


def log_epoch(epoch, phase, sums, chance, probe, path, bad, log):
    """The epoch's record for curves.png (the means over its updated steps, and the queue-free
    metric `probe` = (loss, top-1, chance)); returns the collapse warning, or None. Collective (one
    all-reduce)."""
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss, acc, spread = (sums[:3] / sums[3].clamp(min=1)).tolist()
    # G's drops against random drops of as many frames, Eq 4's distance on the same clips (Table 1)
    g_vs_random = (sums[4] / sums[5]).item() if phase == "adversarial" and sums[5] > 0 else None
    probe_loss, probe_top1, probe_chance = probe
    log(f"epoch {epoch} done: loss {loss:.4f} (chance {chance:.4f}) acc {acc:.3f} "
        f"spread {spread:.3f}; queue-free loss {probe_loss:.4f} (chance {probe_chance:.4f}) "
        f"top-1 {probe_top1:.3f}"
        + (f"; Eq 4 distance of G's drops / random drops {g_vs_random:.3f}" if g_vs_random else "")
        + f"; {bad} bad videos skipped so far; saved {path}",
        curve=True, epoch=epoch + 1, loss=loss, acc=acc, spread=spread, chance=chance,
        probe_loss=probe_loss, probe_top1=probe_top1, probe_chance=probe_chance,
        g_vs_random=g_vs_random)
    return utils.collapse_warning(probe_loss, spread, probe_chance)


# -----------------------------------------------------------------------------
# the queue-free learning metric

PROBE_CLIPS = 64  # its probe set: chance ln 64


def build_probe(dataset, workers):
    """The queue-free metric's probe set, as one batch: two augmentations of one clip of each of
    PROBE_CLIPS training videos, the same videos, positions and augmentations at every measurement
    and for every --seed (a fixed subset and fixed per-sample seeds)."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(dataset.samples))[:PROBE_CLIPS]
    items = [(int(i), int(rng.integers(2**62))) for i in order]
    probe = data.VideoClips(dataset.samples, dataset.frames, dataset.stride, dataset.transform,
                            views=2)
    # (a generator of its own: the loader's base seed must not come from torch's global RNG,
    # which the training draws from)
    return torch.utils.data.DataLoader(probe, batch_size=len(items), sampler=items,
                                       num_workers=workers, collate_fn=loading.collate,
                                       worker_init_fn=loading.worker_init,
                                       generator=torch.Generator())


@torch.no_grad()
def queue_free_metric(model, probe, bn_batch, device, ctx):
    """The pretext task scored without a queue: the query of each probe clip (first view,
    encoder_q) against the keys of all P probe clips (second view) from the *current* key encoder,
    InfoNCE with the method's tau, the positive on the diagonal; chance is ln P. The training loss
    scores the positive against queue keys written up to K/B steps ago: a collapsed embedding that
    drifts with the lr beats those stale keys, and the training loss then sits well below chance
    with no instance discrimination (../shared/notes/learning-evidence.md). Fresh keys are not
    fooled. As in the training step the forwards run in train mode, queries in contiguous
    sub-batches of `bn_batch` and keys in shuffled ones, on copies of the encoders: the model's
    state is untouched. Returns (loss, top-1, chance)."""
    video = data.to_device(next(iter(probe)), device)  # (P, 2, 3, T, H, W)
    x, x_key = video[:, 0], video[:, 1]
    p = x.shape[0]
    head = getattr(model, "head", nn.Identity())  # CVRL projects after encoder_q's fc
    encoder_q = copy.deepcopy(nn.Sequential(model.encoder_q, head)).train()
    encoder_k = copy.deepcopy(nn.Sequential(getattr(model, "encoder_k", model.encoder_q),
                                            head)).train()
    chunks = max(1, p // bn_batch)
    perm = torch.randperm(p, generator=torch.Generator().manual_seed(0)).to(device)
    with ctx:
        q = torch.cat([encoder_q(c) for c in x.tensor_split(chunks)])  # (P, dim)
        k = torch.cat([encoder_k(c) for c in x_key[perm].tensor_split(chunks)])[perm.argsort()]
    logits = F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).T / model.T  # (P, P)
    labels = torch.arange(p, device=logits.device)
    top1 = (logits.argmax(dim=1) == labels).float().mean().item()
    return F.cross_entropy(logits, labels).item(), top1, math.log(p)


# -----------------------------------------------------------------------------

def main(argv=None):
    args, given = utils.parse_args(get_args_parser(), argv)
    utils.apply_preset(args, given, METHOD_DEFAULTS.get(args.method, {}))
    demo = {**DEMO_PRESET, **METHOD_DEMO_PRESET.get(args.method, {})}
    preset = utils.apply_preset(args, given, demo) if utils.is_demo(args) else {}
    rank, world, device = utils.init_distributed()
    per_rank = utils.per_rank(args.batch_size, world)
    settle_args(args, given)
    log, ctx, scaler = utils.start_run(args, rank, device, preset)

    # data
    try:
        temporal = {"cvrl": "cvrl", "vclr": "vclr"}.get(args.method, "same")
        dataset, _, bad = loading.build_dataset(args, train=True, views=2, temporal=temporal)
        loader = loading.build_loader(dataset, per_rank, args.workers, train=True, seed=args.seed)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")

    # model and optimizers: D's (encoder_q and any method head, never the momentum encoder) and G's
    # (no weight decay: it is a scorer, not a feature)
    model, generator, model_ddp, generator_ddp = build_models(args, device, world, log)
    opt_d = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], args.lr,
                            momentum=args.momentum, weight_decay=args.wd)
    opt_g = torch.optim.SGD(generator.parameters(), args.lr,
                            momentum=args.momentum) if generator else None
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    parts = {"model": model, "generator": generator, "opt_d": opt_d, "opt_g": opt_g}
    ckpt = utils.resume(ckpt_path, "pretrain", parts, scaler, rank, log, args, must_match=(
        ("method", "videomoco"), ("input", "rgb"), ("arch", None), ("moco_k", None)), may_change=(
        "epochs", "adv_start", "lr", "batch_size", "generator", "drop_frames", "decay"))
    start_epoch, step, skip = (0, 0, 0) if ckpt is None else (
        ckpt["epoch"], ckpt["step"], ckpt["epoch_step"])
    save = functools.partial(save_checkpoint, ckpt_path, args, parts, scaler, rank=rank)

    # watching the run: the loss against its chance level, the queue-free metric, the feature
    # spread, kNN on the test split; the first measurements are the random-init anchors
    knn = utils.KNNMonitor(args, args.workers) if args.knn_every > 0 else None
    probe = build_probe(dataset, args.workers)
    bn_batch = max(per_rank // args.shuffle_splits, 2)
    curves = os.path.join(args.out, "curves.png")
    if start_epoch == 0 and skip == 0:
        loss, top1, chance = queue_free_metric(model, probe, bn_batch, device, ctx)
        log(f"queue-free loss at random init: {loss:.4f} (chance {chance:.4f}) top-1 {top1:.3f}",
            curve=True, epoch=0, probe_loss=loss, probe_top1=top1, probe_chance=chance)
        if knn is not None:
            knn.measure(model.encoder_q, 0, device, ctx, log)

    # loop
    guard = utils.Guard(args, device, log)
    progress = utils.Progress(step, args.epochs * len(loader))
    stopped = warned = False
    try:  # a DataError (too many bad videos) is raised on every rank at the same flush
        for epoch in range(start_epoch, args.epochs):
            step, phase, decay, sums, stopped = train_epoch(
                epoch, skip, step, loader, bad, model_ddp, generator_ddp, opt_d, opt_g, ctx,
                scaler, args, guard, progress, save, log, device)
            if stopped:
                break
            skip = 0
            save(epoch + 1, step, 0)
            guard.last_save = time.time()
            chance = methods.chance_level(args.method, model, args.batch_size, decay)
            probe_metric = queue_free_metric(model, probe, bn_batch, device, ctx)
            warning = log_epoch(epoch, phase, sums, chance, probe_metric, ckpt_path, len(bad),
                                log)
            if warning and not warned:
                log(warning)
                warned = True
            if knn is not None and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
                knn.measure(model.encoder_q, epoch + 1, device, ctx, log)
            if rank == 0:
                utils.draw_curves(log.path, curves)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    if not stopped:
        if len(bad) and rank == 0:
            bad.write(os.path.join(args.out, "bad_videos.txt"))
        if rank == 0:
            utils.learning_summary(log, args.epochs)
        log(f"done. curves: {curves}; backbone: {os.path.join(args.out, 'backbone.pt')}\n"
            f"next: python evaluate.py --ckpt {ckpt_path}  (kNN retrieval of the features)\n"
            f"      python finetune.py --ckpt {ckpt_path} --out {args.out}-finetune")
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
