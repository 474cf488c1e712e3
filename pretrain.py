"""
Self-supervised pretraining: VideoMoCo (Pan et al., CVPR 2021), and the methods it is compared with.

    python pretrain.py                  # demo preset: built-in data, CPU, under 3 minutes
    torchrun --nproc_per_node=8 pretrain.py --dataset kinetics --data-root /data/k400 --out k400

One step is `train_step` below, with models.py: x is a clip, x_key another augmentation of it. D
is trained alone with MoCo's InfoNCE (Eq 1) before --adv-start; from then on G scores every frame,
the k most important are dropped (Eq 3), D minimises the decayed InfoNCE with x_query as the query
(Eq 5/6) and G maximises |D(x_query) - D(x)|_1 (Eq 4), each by its own loss; Eq 2 moves the
momentum encoder. The same command with the same --out resumes; SIGTERM / SIGUSR1 save and exit.
"""

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import curves
import data
import demo_data
import methods
import models
import utils

METHODS = ("videomoco", "moco", "cvrl", "vclr")
G_RATIO_STEPS = 5  # steps of an adversarial epoch, evenly spaced, that measure G against random
SAVE_EVERY_MIN = 30  # minutes between mid-epoch saves
MAX_NONFINITE = 20  # non-finite losses in a row that stop the run
PROBE_CLIPS = 64  # the queue-free metric's probe set: chance ln 64
# the epoch record's sums; at the measured steps (G_RATIO_STEPS) also what G drops: "drops", the
# dropped frames per clip position (a (T,) vector), and "motion_corr", the correlation of G's
# importance with the frames' motion, summed over the measured steps (counted in "measured")
EPOCH_SUMS = ("loss", "acc", "spread", "steps", "l1_g", "l1_random", "measured", "motion_corr",
              "drops")


def get_args_parser():
    p = argparse.ArgumentParser("VideoMoCo pretraining", add_help=True)
    data.add_data_args(p)  # --dataset --data-root --split --frames --stride --crop --workers ...
    # model
    p.add_argument("--arch", default="r2plus1d_10", choices=models.ARCHS, help="encoder D")
    p.add_argument("--input", default="rgb", choices=models.INPUTS, help="rgb or residual frames")
    p.add_argument("--moco-k", type=int, default=65536, help="queue size K in keys (paper: 65536)")
    p.add_argument("--moco-m", type=float, default=0.999, help="momentum m, Eq 2 (paper: 0.999)")
    p.add_argument("--moco-t", type=float, default=0.07,
                   help="temperature tau, Eq 1 (MoCo: 0.07; CVRL, VCLR: 0.1)")
    p.add_argument("--decay", type=float, default=0.99999, help="t of Eq 6 (paper: 0.99999)")
    p.add_argument("--decay-start", type=int, default=None,
                   help="epoch from which D's loss is Eq 6, not Eq 1 (default: --adv-start)")
    p.add_argument("--shuffle-splits", type=int, default=2, help="shuffle-BN processes emulated")
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True,
                   help="MoCo v2's MLP projection head (default) or --no-mlp, MoCo v1's linear one")
    p.add_argument("--jitter", type=float, default=0.8, help="P(colour jitter) (MoCo v2: 0.8)")
    p.add_argument("--grayscale", type=float, default=0.2, help="P(grayscale) (MoCo v2: 0.2)")
    # method: VideoMoCo, its MoCo baseline, and the methods users compare it with (methods.py)
    p.add_argument("--method", default="videomoco", choices=METHODS,
                   help="videomoco; moco (= --generator none --decay 1); cvrl; vclr")
    p.add_argument("--clip-weight", type=float, default=1.0,
                   help="VCLR: weight of L_clip (0: the 2-D recipe)")
    p.add_argument("--background-erasing", type=float, default=0.0,
                   help="P(a random frame of the query clip is mixed into all its frames)")
    # generator G
    p.add_argument("--generator", default="convlstm", choices=("convlstm", "random", "none"),
                   help="frames dropped by G (adversarial), at random (Table 1), or none (MoCo)")
    p.add_argument("--drop-frames", type=int, default=None, help="k of Eq 3 (default T/4: 8 of 32)")
    p.add_argument("--adv-start", type=int, default=None, help="first adversarial epoch (half)")
    # optimisation: SGD with momentum 0.9 for D (weight decay 1e-4, MoCo's) and G (none)
    p.add_argument("--epochs", type=int, default=200, help="training epochs (paper: 200)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (paper: 128)")
    p.add_argument("--lr", type=float, default=0.02,
                   help="initial lr of D and G, cosine decay (paper: 0.02)")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "none"),
                   help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--channels-last", action="store_true", help="encoders in channels_last_3d")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    # run
    p.add_argument("--out", default="runs/pretrain", help="ckpt.pt, backbone.pt, log.jsonl")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--print-freq", type=int, default=20, help="steps between log lines")
    p.add_argument("--knn-every", type=int, default=0, help="epochs between kNN monitors; 0 = off")
    return p


def defaults(method, demo):
    """The defaults that depend on --method and on whether this is the demo (a built-in set, no
    --data-root); a flag given on the command line wins over them.

    The demo: `python pretrain.py`, under 3 minutes on 2 CPU cores. K = 64 against 180 training
    videos (K/N 0.36; the paper's 65536 of Kinetics' 240k is 0.27); t makes the oldest key weigh
    0.52 (0.9898^64) as the paper's 0.99999^65536; no colour jitter, which holds the loss at 0.75
    of chance at this budget (RESULTS.md). A method's own: MoCo is VideoMoCo without G and decay;
    CVRL's and the official VCLR code's tau; VCLR's K; VCLR's three clips must fit in the demo's
    32-48 frame videos."""
    d = {}
    if demo:
        d.update(utils.DEMO_CLIPS, batch_size=32, epochs=30, workers=2, moco_k=64, moco_m=0.99,
                 decay=0.9898, lr=0.1, jitter=0.0, knn_every=5, print_freq=10, out="runs/demo")
    if method != "videomoco":
        d["generator"] = "none"  # G is VideoMoCo's
    if method == "moco":
        d["decay"] = 1.0
    if method in ("cvrl", "vclr"):
        d["moco_t"] = 0.1
    if method == "vclr" and demo:
        d.update(frames=8, stride=1)
    if method == "vclr" and not demo:
        d["moco_k"] = 131072
    return d


def parse_args(argv):
    """The flags, with `defaults` for those not given; returns (args, the defaults applied)."""
    parser = get_args_parser()
    first = parser.parse_args(argv)  # what the defaults depend on: --method, --dataset, --data-root
    preset = defaults(first.method, data.is_demo(first))
    parser.set_defaults(**preset)
    return parser.parse_args(argv), preset


def settle_args(args):
    """Defaults that depend on other flags, and one-line errors for flags that do not fit."""
    if args.method == "moco" and (args.generator != "none" or args.decay != 1):
        raise SystemExit("error: --method moco means --generator none --decay 1")
    if args.method in ("cvrl", "vclr") and args.generator != "none":
        raise SystemExit(f"error: --method {args.method} has no generator (G is VideoMoCo's)")
    if args.adv_start is None:
        args.adv_start = args.epochs // 2  # the paper: D alone for the first half (Sec 4.2)
    if args.decay_start is None:  # Sec 3.2: "Initially, we train D ... only use ... Eq. (1)"
        args.decay_start = args.adv_start
    if args.drop_frames is None:
        args.drop_frames = max(args.frames // 4, 1)  # the paper's ratio, 8 of 32 (Sec 3.2: 25 %)
    if args.generator != "none" and not 0 < args.drop_frames < args.frames:
        raise SystemExit(f"error: --drop-frames must be in 1..{args.frames - 1} for --frames "
                         f"{args.frames} (no dropping is --generator none)")


def main(argv=None):
    args, preset = parse_args(argv)
    data.quiet_opencv()
    demo_data.ensure(args.dataset, args.data_root)  # a built-in set: written on first use
    rank, world, device = utils.init_distributed()
    per_rank = utils.per_rank(args.batch_size, world)
    settle_args(args)
    log, ctx, scaler = utils.start_run(args, rank, device, preset)

    # data
    try:
        dataset, loader, bad = build_data(args, per_rank, rank)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")

    # model and optimizers: D's (encoder_q and any method head, never the momentum encoder) and G's
    # (no weight decay: it is a scorer, not a feature)
    model, generator, model_ddp, generator_ddp = build_models(args, device, world, log)
    opt_d = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], args.lr,
                            momentum=0.9, weight_decay=1e-4)
    opt_g = torch.optim.SGD(generator.parameters(), args.lr, momentum=0.9) if generator else None
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    parts = {"model": model, "generator": generator, "opt_d": opt_d, "opt_g": opt_g}
    ckpt = utils.resume(ckpt_path, "pretrain", parts, scaler, rank, log, args, must_match=(
        ("method", "videomoco"), ("input", "rgb"), ("arch", None), ("moco_k", None)), may_change=(
        "epochs", "adv_start", "lr", "batch_size", "generator", "drop_frames", "decay"))
    start_epoch, step = (0, 0) if ckpt is None else (ckpt["epoch"], ckpt["step"])
    resumed = {}
    if ckpt is not None and ckpt["epoch_step"]:  # mid-epoch: each rank's sums of the epoch so far
        resumed = {"epoch_step": ckpt["epoch_step"],
                   "sums": rank_share(ckpt.get("epoch_sums"), rank, world)}
    save = functools.partial(save_checkpoint, ckpt_path, args, parts, scaler, rank=rank)

    # watching the run: the loss against its chance level, the queue-free metric, the feature
    # spread, kNN on the test split; the first measurements are the random-init anchors
    knn = KNNMonitor(args, args.workers) if args.knn_every > 0 else None
    probe = build_probe(dataset)
    bn_batch = max(per_rank // args.shuffle_splits, 2)
    if start_epoch == 0 and not resumed:
        loss, top1, chance = queue_free_metric(model, probe, bn_batch, device, ctx)
        log(f"queue-free loss at random init: {loss:.4f} (chance {chance:.4f}) top-1 {top1:.3f}",
            curve=True, epoch=0, probe_loss=loss, probe_top1=top1, probe_chance=chance)
        if knn is not None:
            knn.measure(model.encoder_q, 0, device, ctx, log)

    # loop
    guard = Guard(device, log)
    run = Run(args=args, model=model_ddp, generator=generator_ddp, opt_d=opt_d, opt_g=opt_g,
              ctx=ctx, scaler=scaler, guard=guard, device=device, loader=loader, bad=bad,
              progress=utils.Progress(step, args.epochs * len(loader)), log=log, save=save)
    stopped = warned = False
    try:  # a DataError (too many bad videos) is raised on every rank at the same flush
        for epoch in range(start_epoch, args.epochs):
            done = train_epoch(run, epoch, step, resumed)
            step = done["step"]
            stopped = done["stopped"]
            if stopped:
                break
            resumed = {}
            save(epoch + 1, step, 0)
            guard.last_save = time.time()
            chance = methods.chance_level(args.method, model, args.batch_size, done["decay"])
            probe_metric = queue_free_metric(model, probe, bn_batch, device, ctx)
            warning = log_epoch(epoch, done["phase"], done["sums"], chance, probe_metric,
                                ckpt_path, len(bad), log)
            if warning and not warned:
                log(warning)
                warned = True
            if knn is not None and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
                knn.measure(model.encoder_q, epoch + 1, device, ctx, log)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    if not stopped:
        if len(bad) and rank == 0:
            bad.write(os.path.join(args.out, "bad_videos.txt"))
        if rank == 0:
            learning_summary(log, args.epochs)
            curves.draw_or_say(log.path, os.path.join(args.out, "curves.png"), log)
        log(f"done. log: {log.path}; backbone: {os.path.join(args.out, 'backbone.pt')}\n"
            f"next: python evaluate.py --ckpt {ckpt_path}  (kNN retrieval of the features)\n"
            f"      python finetune.py --ckpt {ckpt_path} --out {args.out}-finetune")
    utils.end_distributed()
    return model


# -----------------------------------------------------------------------------
# the loop: an epoch, a step

@dataclasses.dataclass
class Run:
    """What stays the same for a whole run, which train_epoch and train_step read. The step's: the
    flags, D's wrapper and G as the step calls them (DDP-wrapped in a world of several; G None
    where there is none), their optimizers, the autocast context, the loss scaler, the guard. The
    loop's: the device, the loader, the record of bad videos, the progress meter, the log and
    `save(epoch, step, epoch_step, sums)`."""
    args: argparse.Namespace
    model: nn.Module
    generator: nn.Module | None
    opt_d: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer | None
    ctx: object  # a context manager: autocast, or nullcontext
    scaler: torch.amp.GradScaler
    guard: "Guard"
    device: torch.device = torch.device("cpu")
    loader: torch.utils.data.DataLoader | None = None
    bad: data.BadVideos | None = None
    progress: utils.Progress | None = None
    log: object = print
    save: object = None


def train_epoch(run, epoch, step, resumed):
    """One epoch from global step `step`; resumed: {} or, from a mid-epoch checkpoint,
    {"epoch_step": the steps done, "sums": this rank's share of the epoch's sums so far}. Returns
    {"step": the global step after it, "phase", "decay": t of Eq 6, "sums": the EPOCH_SUMS over
    the updated steps, "stopped": by a signal, after saving}."""
    args = run.args
    loader = run.loader
    bad = run.bad
    guard = run.guard
    skip = resumed.get("epoch_step", 0)
    phase, decay = epoch_schedule(args, epoch, run.opt_d, run.opt_g)
    loader.sampler.set_epoch(epoch, skip * loader.batch_size)  # in videos
    run.model.train()
    if run.generator is not None:
        run.generator.train()
    run.progress.restart()
    sums = {k: torch.zeros((), device=run.device) for k in EPOCH_SUMS}
    sums["drops"] = torch.zeros(args.frames, device=run.device)
    for k, v in (resumed.get("sums") or {}).items():
        sums[k] += v.to(run.device)
    steps = skip + len(loader)  # the epoch's, a resumed one's included (the loader skips `skip`)
    for epoch_step, batch in enumerate(loader, start=skip):
        bad.update(batch["bad"])
        video = data.to_device(batch, run.device)  # (N, 2, 3, T, H, W); VCLR (N, 2, S, ...)
        extra = []
        if "order" in batch:  # VCLR's order labels and segments
            extra = [batch[k].to(run.device) for k in ("order", "segments")]
        measure = phase == "adversarial" and epoch_step % max(steps // G_RATIO_STEPS, 1) == 0
        out = train_step(run, video, extra, phase, decay, measure_random=measure)
        guard.count(out, step)
        spread = feature_spread(out["q"])
        if out["updated"]:
            sums["loss"] += out["loss_nce"].detach().float()
            sums["acc"] += out["acc"].float()
            sums["spread"] += spread
            sums["steps"] += 1
            if measure:
                sums["l1_g"] += -out["loss_g"].detach().float()
                sums["l1_random"] += out["l1_random"].float()
                sums["measured"] += 1
                sums["motion_corr"] += out["motion_corr"]
                sums["drops"] += out["drops"]
        step += 1
        run.progress.clips += args.batch_size
        if step % args.print_freq == 0 or epoch_step + 1 == steps:
            bad.flush()  # all ranks' bad videos (a collective, at the same step on every rank)
            log_step(run, out, spread, epoch, step, phase)
        if guard.stop or guard.save_due:
            run.save(epoch, step, epoch_step + 1, sums)
            guard.last_save = time.time()
            if guard.stop:
                run.log(f"signal received: saved a checkpoint at epoch {epoch} step {step}; "
                        "rerun the same command to resume")
                return {"step": step, "phase": phase, "decay": decay, "sums": sums,
                        "stopped": True}
    return {"step": step, "phase": phase, "decay": decay, "sums": sums, "stopped": False}


def log_step(run, out, spread, epoch, step, phase):
    """The progress line and record of a step (rank 0 prints; host syncs, every print_freq)."""
    shown = [("loss_d", out["loss_d"].item(), ".4f")]
    no_g = {}  # without G (the MoCo phase, the peers) loss_g is logged as null and not shown
    if out["loss_g"] is None:
        no_g["loss_g"] = None
    else:
        shown.append(("loss_g", out["loss_g"].item(), ".4f"))
    shown += [("acc", out["acc"].item(), ".3f"), ("spread", spread.item(), ".3f"),
              ("lr", run.opt_d.param_groups[0]["lr"], ".4g")]
    vclr = {k: out[k].item() for k in ("loss_order", "order_acc", "loss_clip")
            if out.get(k) is not None}
    tail = "".join(f" {k} {v:.4f}" for k, v in vclr.items()) + f" bad {len(run.bad)} [{phase}]"
    run.progress.log(run.log, epoch, step, shown, tail, bad_videos=len(run.bad), phase=phase,
                     **no_g, **vclr)


def train_step(run, video, extra, phase, decay, measure_random=False):
    """One step on a batch, in the paper's order. video: (N, 2, 3, T, H, W), x and x_key, two
    augmentations of each clip (CVRL: two clips; VCLR: (N, 2, S, 3, T, H, W), two tuples, with
    extra = [order labels, segments]). phase: epoch_schedule's; "adversarial": G drops k frames
    (Eq 3), "random-drop": k random frames are dropped (Table 1). decay: t of Eq 6 (1 = Eq 1).
    Returns models.forward_output's dict with "updated" and, when measure_random, "l1_random"."""
    args = run.args
    model = run.model
    generator = run.generator
    adversarial = phase == "adversarial"
    x = video[:, 0]
    x_key = video[:, 1]
    bn_before = [b.clone() for b in bn_statistics(model, generator)]  # restored if the step skips
    if args.background_erasing > 0:  # on the query view (every clip of VCLR's anchor tuple)
        x = methods.background_erasing(x.flatten(0, x.dim() - 5),
                                       args.background_erasing)[0].view_as(x)
    with run.ctx:
        if args.method in ("cvrl", "vclr"):
            out = model(x, x_key, *extra)
        else:
            if adversarial:  # Eq 3: G scores every frame, its k most important are dropped
                importance = generator(x)  # (N, T)
                x_query, mask = models.drop_frames(x, importance, args.drop_frames)
            elif phase == "random-drop":  # Table 1's random-drop row
                x_query, _ = models.random_drop(x, args.drop_frames)
            else:
                x_query = x
            # D sees a detached copy, so that loss_d's backward stops at D's input
            x_query_in = x_query.detach().requires_grad_(adversarial)
            # Eq 2, the keys (shuffle-BN), Eq 5/6 for D (Eq 1 if decay is 1) and Eq 4 for G
            out = model(x_query_in, x_key, decay=decay, adversarial=adversarial, x_full=x)
            if measure_random:
                out["l1_random"] = random_drop_distance(model, x, out["q_full"], args.drop_frames)
                out["drops"] = mask.detach().float().sum(dim=0)  # (T,) per clip position
                out["motion_corr"] = motion_correlation(importance.detach(), x)
    # a non-finite loss skips the step on every rank alike (the step's one host sync): D, G, their
    # optimizers and BN statistics stay as they were. Eq 2 and the enqueue, which MoCo's order runs
    # in the forward before the loss exists, stay: they read only theta_q, which the skip leaves
    # as it was, and theta_k; keys that are not finite never enter the queue (dequeue_and_enqueue)
    finite = torch.isfinite(out["loss_d"])
    if out["loss_g"] is not None:
        finite = finite & torch.isfinite(out["loss_g"])
    out["updated"] = run.guard.agree(finite)
    if not out["updated"]:
        torch._foreach_copy_(bn_statistics(model, generator), bn_before)
        return out
    opts = (run.opt_d, run.opt_g) if adversarial else (run.opt_d,)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    if adversarial:  # D by Eq 5/6 alone, G by Eq 4 alone
        models.adversarial_backward(out["loss_d"], out["loss_g"], x_query, x_query_in,
                                    run.opt_d.param_groups[0]["params"], scale=run.scaler.scale)
    else:
        run.scaler.scale(out["loss_d"]).backward()
    for opt in opts:  # both through the one scaler under float16
        run.scaler.step(opt)
    run.scaler.update()
    return out


def bn_statistics(*modules):
    """The BN running statistics of `modules` (None skipped), which a train-mode forward writes."""
    return [b for module in modules if module is not None for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


@torch.no_grad()
def random_drop_distance(model, x, q_full, k):
    """Table 1's yardstick for G: Eq 4's distance for x' = x with k frames dropped at random, on the
    clips G saw (q_full = D(x)). On a copy: a train-mode forward moves BN running statistics."""
    copy_ = copy.deepcopy(getattr(model, "module", model))  # (the module under DDP)
    q = F.normalize(copy_.encode_query(models.random_drop(x, k)[0]), dim=1)
    return (q.float() - q_full.float()).abs().sum(dim=1).mean()


@torch.no_grad()
def motion_correlation(importance, x):
    """Pearson's correlation of G's importance (N, T) with each frame's motion
    (models.frame_motion), per clip, averaged over the clips: near 1 where G would drop the
    frames that move most (Sec 1: "temporally important"), 0 where its scores ignore motion."""
    return utils.pearson(importance, models.frame_motion(x)).mean()


def epoch_schedule(args, epoch, opt_d, opt_g):
    """Both learning rates for `epoch`: D's cosine over the run (MoCo v2), G's from the same initial
    lr (the paper's 0.02 for both) over its own phase. Returns (the phase, for the log:
    "adversarial", "random-drop", "moco", "cvrl" or "vclr"; t of Eq 6)."""
    for group in opt_d.param_groups:
        group["lr"] = args.lr * utils.cosine(epoch, 0, args.epochs)
    for group in opt_g.param_groups if opt_g else []:
        group["lr"] = args.lr * utils.cosine(epoch, args.adv_start, args.epochs)
    phase = args.method if args.method in ("cvrl", "vclr") else "moco"
    if epoch >= args.adv_start and args.generator != "none":
        phase = "adversarial" if args.generator == "convlstm" else "random-drop"
    return phase, (args.decay if epoch >= args.decay_start else 1.0)


class Guard:
    """What every rank decides alike at each step, in one all-reduce: skip a non-finite step (stop
    after MAX_NONFINITE in a row), stop on SIGTERM / SIGUSR1 (pre-emption), save every
    SAVE_EVERY_MIN minutes."""

    def __init__(self, device, log):
        self.device = device
        self.log = log
        self.last_save = time.time()
        self.signal = self.stop = self.save_due = False
        self.nonfinite = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: setattr(self, "signal", True))

    def agree(self, finite):
        """Whether to update (finite: a bool tensor), alike on every rank; sets stop, save_due."""
        due = time.time() - self.last_save > SAVE_EVERY_MIN * 60
        flags = torch.stack([torch.tensor(float(self.signal), device=self.device),
                             (~finite).float().to(self.device),
                             torch.tensor(float(due), device=self.device)])
        if models.is_distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.stop, nonfinite, self.save_due = (bool(v) for v in flags.tolist())
        return not nonfinite

    def count(self, out, step):
        if out["updated"]:
            self.nonfinite = 0
            return
        self.nonfinite += 1
        self.log(f"non-finite loss at step {step} (loss_d {out['loss_d'].item()}, "
                 f"{self.nonfinite} in a row): step skipped")
        if self.nonfinite >= MAX_NONFINITE:
            raise SystemExit(f"error: {self.nonfinite} non-finite losses in a row; "
                             "lower --lr or try --amp none")


# -----------------------------------------------------------------------------
# the builders: data, models, checkpoints

def build_data(args, per_rank, rank):
    """(training dataset, its loader, the record of bad videos): two augmented views of one clip
    (VideoMoCo, MoCo), or CVRL's or VCLR's positive pair."""
    samples, _, missing = data.list_videos(args.dataset, args.data_root, args.split, train=True)
    transform = data.TrainTransform(args.crop, jitter=args.jitter, grayscale=args.grayscale,
                                    on_device=args.augment_on == "device")
    pair = {"cvrl": methods.CVRLPair(), "vclr": methods.VCLRTuples()}.get(
        args.method, data.SameClip(views=2, repeat=args.repeat_sample))
    if args.repeat_sample > 1 and args.method in ("cvrl", "vclr"):
        raise data.DataError(f"--repeat-sample {args.repeat_sample}: only where a sample is one "
                             "clip (not --method cvrl or vclr)")
    dataset = data.VideoClips(samples, args.frames, args.stride, transform, pair)
    loader = data.build_loader(dataset, per_rank, args.workers, train=True, seed=args.seed)
    return dataset, loader, data.BadVideos(samples, missing, log=rank == 0)


def build_models(args, device, world, log):
    """(model, G or None, and the two as the loop calls them: DDP-wrapped in a world of several)."""
    base_encoder = models.encoder_builder(args.arch, args.input)
    if args.method == "cvrl":
        model = methods.CVRL(base_encoder, tau=args.moco_t)
    elif args.method == "vclr":
        model = methods.VCLR(base_encoder, K=args.moco_k, m=args.moco_m, tau=args.moco_t,
                             shuffle_splits=args.shuffle_splits, mlp=args.mlp,
                             clip_weight=args.clip_weight)
    else:
        model = models.VideoMoCo(base_encoder, K=args.moco_k, m=args.moco_m, tau=args.moco_t,
                                 decay=args.decay, shuffle_splits=args.shuffle_splits,
                                 mlp=args.mlp)
    model = methods.global_batchnorm(model, args.method, device, world, log).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    for name in ("encoder_q", "encoder_k") if args.compile else ():
        if hasattr(model, name):  # in place, so that the state_dict keys stay torchvision's
            getattr(model, name).compile()
    # G exists only where it is used: --method videomoco with --generator convlstm
    generator = models.ConvLSTMGenerator().to(device) if args.generator == "convlstm" else None
    log(f"{args.method}: encoder {args.arch} on {args.input} input, "
        f"{models.count_parameters(model.encoder_q) / 1e6:.2f}M parameters"
        + (f"; G: ConvLSTM, {models.count_parameters(generator) / 1e6:.2f}M" if generator else "")
        + f"; {world} process(es) on {device}")
    # every rank starts from rank 0's weights and queue (MoCo relies on identical queues), then no
    # buffer sync: the queue is updated identically on every rank from gathered keys, so
    # re-broadcasting it (dim x K floats) every step, as DDP's default would, is pure traffic
    return model, generator, utils.wrap_ddp(model, sync_buffers=False), utils.wrap_ddp(generator)


def save_checkpoint(path, args, parts, scaler, epoch, step, epoch_step, sums=None, *, rank):
    """ckpt.pt (all a resume needs) and backbone.pt (encoder_q without its head), by rank 0.
    Mid-epoch, every rank's sums of the epoch so far, so that the resumed epoch's record is the
    uninterrupted one's. Collective."""
    epoch_sums = None
    if sums is not None:
        epoch_sums = utils.gather_objects([{k: v.cpu() for k, v in sums.items()}])  # rank order
    utils.save_checkpoint(path, "pretrain", parts, scaler, rank, method=args.method, epoch=epoch,
                          step=step, epoch_step=epoch_step, epoch_sums=epoch_sums, args=vars(args))
    if rank == 0:
        backbone = {k: v for k, v in parts["model"].encoder_q.state_dict().items()
                    if not k.startswith("fc.")}
        utils.save_atomic(backbone, os.path.join(os.path.dirname(path), "backbone.pt"))


def rank_share(per_rank, rank, world):
    """This rank's sums from a mid-epoch checkpoint's per-rank list; in a world of another size
    rank 0 takes them all (the epoch record stays right, to float rounding); older checkpoints
    have none (None: the resumed epoch's averages start from zero)."""
    if not per_rank:
        return None
    if len(per_rank) == world:
        return per_rank[rank]
    if rank != 0:
        return None
    return {k: sum(s[k] for s in per_rank) for k in per_rank[0]}


# -----------------------------------------------------------------------------
# watching the run: the queue-free metric, the feature spread, kNN on the test split

def build_probe(dataset):
    """The queue-free metric's probe set, one batch: two augmentations of a clip of PROBE_CLIPS
    training videos, the same at every measurement and for every --seed (fixed per-sample seeds;
    the loader's own generator leaves torch's global RNG alone)."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(dataset.samples))[:PROBE_CLIPS]
    items = [(int(i), int(rng.integers(2**62))) for i in order]
    probe = data.VideoClips(dataset.samples, dataset.frames, dataset.stride, dataset.transform,
                            data.SameClip(views=2))
    return torch.utils.data.DataLoader(probe, batch_size=len(items), sampler=items,
                                       collate_fn=data.collate, generator=torch.Generator())


@torch.no_grad()
def queue_free_metric(model, probe, bn_batch, device, ctx):
    """The pretext task scored without a queue: each probe clip's query (first view, encoder_q)
    against the keys of all P probe clips (second view) from the *current* key encoder, InfoNCE
    with the method's tau; chance is ln P. The training loss scores against keys up to K/B steps
    old, which a collapsed embedding drifting with the lr beats with nothing learned; fresh keys
    are not fooled. Train-mode forwards as in the step (queries in contiguous sub-batches of
    `bn_batch`, keys in shuffled ones) on copies of the encoders. Returns (loss, top-1, chance)."""
    video = data.to_device(next(iter(probe)), device)  # (P, 2, 3, T, H, W)
    x = video[:, 0]
    x_key = video[:, 1]
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
    logits = F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).T / model.tau  # (P, P)
    labels = torch.arange(p, device=logits.device)
    top1 = (logits.argmax(dim=1) == labels).float().mean().item()
    return F.cross_entropy(logits, labels).item(), top1, math.log(p)


def feature_spread(z):
    """sqrt(D) x the mean per-dimension std over the batch of L2-normalised z (N, D): SimSiam's
    collapse monitor (Chen & He 2021, Sec 4.1), ~1 for isotropic features, 0 for collapsed ones."""
    z = F.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


def collapse_warning(loss, spread, chance):
    """One line for an epoch whose queue-free loss ended within 2 % of its chance level or whose
    mean feature spread stayed near 0, else None (the training loss is no evidence either way)."""
    if loss >= 0.98 * chance:
        why = (f"the queue-free loss ({loss:.3f}) ended an epoch within 2% of its chance level "
               f"{chance:.3f}")
    elif spread < 0.1:
        why = f"the feature spread ({spread:.3f}) stayed near 0 (collapse) for a whole epoch"
    else:
        return None
    return f"warning: {why}: the pretext task is not learning; see README, 'Does it learn?'"


class KNNMonitor:
    """Weighted 20-NN top-1 of pooled features during pretraining (MoCo's CIFAR demo): train split
    as gallery, test split as queries, one centre clip per video, BN statistics re-estimated on
    training clips in a copy of the encoder."""

    def __init__(self, args, workers, k=20):
        self.k = k
        lists = [data.list_videos(args.dataset, args.data_root, args.split, train)[:2]
                 for train in (True, False)]
        self.bn_loader = data.bn_loader(lists[0][0], args, workers)
        self.loaders = [data.test_loader(samples, args, 16, workers) for samples, _ in lists]
        self.labels = [torch.tensor([y for _, y in samples]) for samples, _ in lists]
        self.num_classes = len(lists[0][1])

    def __call__(self, encoder, device, ctx):
        encoder = utils.estimate_bn_statistics(copy.deepcopy(encoder), self.bn_loader, device, ctx)
        with models.pooled_features(encoder):
            (g, g_index, _), (q, q_index, _) = (utils.video_features(encoder, loader, device, ctx)
                                                for loader in self.loaders)
        pred = utils.knn_predict(q, g, self.labels[0][g_index], self.num_classes, self.k)
        return (pred == self.labels[1][q_index]).float().mean().item()

    def measure(self, encoder, epochs_done, device, ctx, log):
        top1 = self(encoder, device, ctx)
        chance = 1 / self.num_classes
        log(f"kNN top-1 after {epochs_done} epochs: {top1:.3f} (chance {chance:.3f}; "
            f"{self.k}-NN on the test split, 1 clip per video)", curve=True, epoch=epochs_done,
            knn_top1=top1, knn_chance=chance)


def log_epoch(epoch, phase, sums, chance, probe, path, bad, log):
    """The epoch's record (the means over its updated steps, and the queue-free metric `probe` =
    (loss, top-1, chance)); returns the collapse warning, or None. Collective (one all-reduce)."""
    totals = torch.cat([v.reshape(-1) for v in sums.values()])  # one all-reduce for all
    if models.is_distributed():
        dist.all_reduce(totals)
    s = dict(zip(sums, totals.split([v.numel() for v in sums.values()])))
    s = {k: v.reshape(sums[k].shape) for k, v in s.items()}
    loss, acc, spread = ((s[k] / s["steps"].clamp(min=1)).item() for k in ("loss", "acc", "spread"))
    # G's drops against random drops of as many frames, Eq 4's distance on the same clips (Table 1)
    g_vs_random = (s["l1_g"] / s["l1_random"]).item() if s["l1_random"] > 0 else None
    # what G drops: the share of its drops at each clip position, and its motion correlation
    drops = motion_corr = None
    if s["measured"] > 0:
        drops = (s["drops"] / s["drops"].sum()).tolist()
        motion_corr = (s["motion_corr"] / s["measured"]).item()
    probe_loss, probe_top1, probe_chance = probe
    log(f"epoch {epoch} done: loss {loss:.4f} (chance {chance:.4f}) acc {acc:.3f} "
        f"spread {spread:.3f}; queue-free loss {probe_loss:.4f} (chance {probe_chance:.4f}) "
        f"top-1 {probe_top1:.3f}"
        + (f"; Eq 4 distance of G's drops / random drops {g_vs_random:.3f}" if g_vs_random else "")
        + (f"; G's importance vs motion r {motion_corr:+.3f}" if motion_corr is not None else "")
        + f"; {bad} bad videos skipped so far; saved {path}",
        curve=True, epoch=epoch + 1, loss=loss, acc=acc, spread=spread, chance=chance,
        probe_loss=probe_loss, probe_top1=probe_top1, probe_chance=probe_chance,
        g_vs_random=g_vs_random, drops=drops, motion_corr=motion_corr)
    return collapse_warning(probe_loss, spread, probe_chance)


def learning_summary(log, epochs):
    """The first and last queue-free and kNN measurements of the run, a line each (rank 0)."""
    records = {}
    with open(log.path) as f:  # the per-epoch records; a resumed run's later ones replace
        for r in filter(lambda r: r.get("curve"), map(json.loads, f)):
            records.setdefault(r["epoch"], {}).update(r)
    records = [records[e] for e in sorted(records)]
    probe = [r for r in records if r.get("probe_loss") is not None]
    if len(probe) > 1:
        a = probe[0]
        b = probe[-1]
        log(f"queue-free loss went from {a['probe_loss']:.3f} at epoch {a['epoch']} to "
            f"{b['probe_loss']:.3f} after {epochs} epochs (chance {b['probe_chance']:.3f}), "
            f"its top-1 from {a['probe_top1']:.3f} to {b['probe_top1']:.3f} (chance "
            f"{math.exp(-b['probe_chance']):.3f})")
    knn = [r for r in records if r.get("knn_top1") is not None]
    if len(knn) > 1:
        log(f"kNN top-1 on the test split went from {knn[0]['knn_top1']:.3f} at epoch "
            f"{knn[0]['epoch']} to {knn[-1]['knn_top1']:.3f} after {epochs} epochs "
            f"(chance {knn[-1]['knn_chance']:.3f})")



if __name__ == "__main__":
    main()
