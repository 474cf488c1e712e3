"""
Supervised finetuning (or a linear probe) of a pretrained encoder on an action-recognition dataset.

    python finetune.py --ckpt runs/demo/ckpt.pt   # the pretraining's dataset and clip settings
    python finetune.py                            # demo set, random init (the baseline)
    torchrun --nproc_per_node=8 finetune.py --ckpt k400/ckpt.pt --dataset ucf101 --data-root UCF
    python finetune.py --ckpt runs/k400/backbone.pt --arch r2plus1d_10 --linear ...   # linear probe

The paper's protocol (Sec 4.2): 10 epochs, batch 32, lr 0.05, UCF101/HMDB51 split 1; the 10-clip
test is evaluate.py's. The pretraining's encoder D is loaded without its head (a mismatch stops
with one line); the classifier head is new.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import demo_data
import models
import utils


def get_args_parser():
    p = argparse.ArgumentParser("VideoMoCo finetuning / linear probe")
    p.add_argument("--ckpt", default=None, help="ckpt.pt or backbone.pt; none = random init")
    p.add_argument("--linear", action="store_true",
                   help="freeze the backbone (BN statistics re-estimated on training clips, "
                        "then eval mode) and train the classifier only")
    data.add_data_args(p)  # --dataset --data-root --split --frames --stride --crop --workers ...
    p.add_argument("--arch", default="r2plus1d_10", choices=models.ARCHS,
                   help="encoder (the checkpoint's; backbone.pt needs it)")
    p.add_argument("--input", default=None, choices=models.INPUTS, help="(the checkpoint's)")
    p.add_argument("--epochs", type=int, default=10, help="(paper: 10; linear probe 30)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (paper: 32)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD lr, cosine decay (paper: 0.05)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--wd", type=float, default=5e-4,
                   help="weight decay (paper: not given; linear probe default 0)")
    # Sec 4.2: finetuning keeps the pretext stage's pre-processing (flip, colour jitter, random
    # decolorization); pretrain.py's defaults
    p.add_argument("--jitter", type=float, default=0.8, help="P(colour jitter) (linear probe 0)")
    p.add_argument("--grayscale", type=float, default=0.2, help="P(grayscale) (linear probe 0)")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "none"), help="(bf16 on CUDA)")
    p.add_argument("--out", default="runs/finetune", help="output folder: ckpt.pt, log.jsonl")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--print-freq", type=int, default=20, help="steps between log lines")
    return p


DEMO_PRESET = dict(**utils.DEMO_CLIPS, batch_size=16, epochs=30, workers=2, jitter=0.0,
                   grayscale=0.0, print_freq=10, out="runs/demo-finetune")
LINEAR_DEFAULTS = dict(epochs=30, lr=0.05, wd=0.0, jitter=0.0, grayscale=0.0)  # MAE's: crop, flip


@torch.no_grad()
def quick_test(model, loader, device, ctx):
    """Top-1 on one centre clip per test video (the full 10-clip protocol is evaluate.py's)."""
    model.eval()
    correct = torch.zeros(2, device=device)
    for batch in loader:
        video = batch["video"].to(device, non_blocking=True)  # (N, 1, 3, T, H, W)
        valid = batch["valid"].to(device)
        with ctx:
            pred = model(video[:, 0]).argmax(1)
        correct += torch.stack([((pred == batch["label"].to(device)) & valid).sum(),
                                valid.sum()]).float()
    if models.is_distributed():
        dist.all_reduce(correct)
    return (correct[0] / correct[1].clamp(min=1)).item()


def parse_args(argv):
    """The flags, with the source checkpoint's architecture, dataset, clip settings and input mode,
    then the demo preset and the linear probe's, as defaults (a given flag wins). Returns (args,
    backbone state, source checkpoint, preset, note); state and source are None without --ckpt, and
    note says when a given dataset differs from the pretraining's."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    state = None
    source = None
    settings = {}
    note = None
    if args.ckpt:
        _, state, source = utils.backbone_from_checkpoint(args.ckpt)
    if source is not None:
        settings = {k: source["args"][k] for k in ("arch",) + data.DATA_KEYS}
        settings["input"] = source["args"].get("input", "rgb")
        if args.input and args.input != settings["input"]:
            raise SystemExit(f"error: {args.ckpt} was pretrained on {settings['input']} input; "
                             f"--input {args.input} does not match")
        parser.set_defaults(**settings)
        args = parser.parse_args(argv)
        if args.arch != settings["arch"]:  # given
            raise SystemExit(f"error: --arch {args.arch} but {args.ckpt} was pretrained with "
                             f"{settings['arch']}")
        if args.dataset != settings["dataset"]:  # given: its root and split are not the source's
            note = (f"note: finetuning on --dataset {args.dataset}; {args.ckpt} was pretrained "
                    f"on {settings['dataset']}")
            settings = {k: v for k, v in settings.items() if k not in ("data_root", "split")}
            parser.set_defaults(data_root=None, split=1)
            args = parser.parse_args(argv)
    preset = {**(DEMO_PRESET if data.is_demo(args) else {}),
              **(LINEAR_DEFAULTS if args.linear else {})}
    parser.set_defaults(**{**preset, **settings})
    args = parser.parse_args(argv)
    args.input = args.input or "rgb"
    return args, state, source, preset, note


def build_model(args, state, num_classes, device, ctx, log):
    """The encoder with a new classifier, on `device`: pretrained weights transferred, or random
    init. The linear probe re-estimates the frozen backbone's BN statistics on training clips
    (utils.estimate_bn_statistics), then freezes all but its standardising BatchNorm and linear
    layer."""
    model = models.build_encoder(args.arch, num_classes, args.input).to(device)
    if state is not None:
        n = utils.transfer_weights(model, state, args.ckpt)
        log(f"loaded {n} pretrained tensors from {args.ckpt} ({args.arch}); classifier head new, "
            f"{num_classes} classes")
    else:
        log(f"random init of {args.arch} (no --ckpt): the baseline")
    if args.linear:
        samples, _, _ = data.list_videos(args.dataset, args.data_root, args.split, train=True)
        utils.estimate_bn_statistics(model, data.bn_loader(samples, args, args.workers), device,
                                     ctx)
        utils.add_probe_norm(model).to(device)
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("fc.")
    return model


def train_epoch(epoch, step, model, model_ddp, loader, bad, optimizer, ctx, scaler, args, progress,
                log, device):
    loader.sampler.set_epoch(epoch)
    for group in optimizer.param_groups:
        group["lr"] = args.lr * utils.cosine(epoch, 0, args.epochs)
    model_ddp.train()
    if args.linear:
        model.eval()  # frozen backbone: BN keeps the statistics re-estimated before training
        model.fc.train()  # the probe's own BatchNorm learns the feature statistics
    progress.restart()
    for epoch_step, batch in enumerate(loader):
        bad.update(batch["bad"])
        video = data.to_device(batch, device)[:, 0]  # (N, 3, T, H, W)
        label = batch["label"].to(device, non_blocking=True)
        with ctx:
            loss = F.cross_entropy(model_ddp(video).float(), label)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        progress.clips += args.batch_size
        if step % args.print_freq == 0 or epoch_step + 1 == len(loader):
            bad.flush()  # all ranks' bad videos (a collective, at the same step on every rank)
            shown = [("loss", loss.item(), ".4f"), ("lr", optimizer.param_groups[0]["lr"], ".4g")]
            progress.log(log, epoch, step, shown, f" bad {len(bad)}", bad_videos=len(bad))
    return step


def main(argv=None):
    args, state, source, preset, note = parse_args(argv)
    data.quiet_opencv()
    demo_data.ensure(args.dataset, args.data_root)  # a built-in set: written on first use
    rank, world, device = utils.init_distributed()
    per_rank = utils.per_rank(args.batch_size, world)
    log, ctx, scaler = utils.start_run(args, rank, device, preset)
    if note:
        log(note)

    # data
    try:
        samples, classes, missing = data.list_videos(args.dataset, args.data_root, args.split,
                                                     train=True)
        transform = data.TrainTransform(args.crop, jitter=args.jitter, grayscale=args.grayscale,
                                        on_device=args.augment_on == "device")
        train_set = data.VideoClips(samples, args.frames, args.stride, transform,
                                    data.SameClip(views=1, repeat=args.repeat_sample))
        loader = data.build_loader(train_set, per_rank, args.workers, train=True, seed=args.seed)
        bad = data.BadVideos(samples, missing, log=rank == 0)
        test_samples, _, _ = data.list_videos(args.dataset, args.data_root, args.split,
                                              train=False)
        test_loader = data.test_loader(test_samples, args, per_rank, args.workers)
        # model: pretrained backbone, new classifier head
        model = build_model(args, state, len(classes), device, ctx, log)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    model_ddp = utils.wrap_ddp(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, args.lr, momentum=args.momentum, weight_decay=args.wd)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    parts = {"model": model, "optimizer": optimizer}
    ckpt = utils.resume(ckpt_path, "finetune", parts, scaler, rank, log, args,
                        must_match=(("arch", None), ("linear", False)))
    start_epoch, step = (ckpt["epoch"], ckpt["step"]) if ckpt else (0, 0)

    # loop
    progress = utils.Progress(step, args.epochs * len(loader))
    data_settings = {k: getattr(args, k) for k in data.DATA_KEYS}
    for epoch in range(start_epoch, args.epochs):
        try:  # too many bad videos: raised on every rank at the same flush; saved epochs stay
            step = train_epoch(epoch, step, model, model_ddp, loader, bad, optimizer, ctx, scaler,
                               args, progress, log, device)
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
        top1 = quick_test(model_ddp, test_loader, device, ctx)
        utils.save_checkpoint(
            ckpt_path, "finetune", parts, scaler, rank, arch=args.arch, input=args.input,
            classes=classes, linear=args.linear, source=args.ckpt,
            generator=utils.generator_spec(source), data=data_settings,
            epoch=epoch + 1, step=step, test_top1_1clip=top1, args=vars(args))
        log(f"epoch {epoch} done: test top-1 (1 centre clip) {top1:.3f}; {len(bad)} bad videos "
            f"skipped; saved {ckpt_path}", epoch=epoch, test_top1_1clip=top1)
    log(f"done. next: python evaluate.py --ckpt {ckpt_path}  (10-clip test protocol)")
    utils.end_distributed()
    return model


if __name__ == "__main__":
    main()
