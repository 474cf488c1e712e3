"""
Evaluate a checkpoint: prints a short table, then one JSON object as the last line of stdout.

    python evaluate.py --ckpt runs/demo-finetune/ckpt.pt              # 10-clip test: top1, top5
    python evaluate.py --ckpt runs/demo/ckpt.pt                       # pretraining: kNN retrieval
    python evaluate.py --ckpt runs/demo-finetune/ckpt.pt --occlusion  # top-1, k frames dropped

Finetuned checkpoint (finetune.py): `--clips` uniformly spaced clips per test video (x `--crops`),
softmax averaged (the paper's protocol, Sec 4.2). Pretraining checkpoint, backbone.pt (with --arch)
or random init: pooled backbone features, under BN statistics re-estimated on training clips, of the
train split (gallery) and test split (queries), L2-normalised per clip and averaged over clips; R@k
is a hit when any of the k nearest train videos has the query's class (VCOP / CoCLR); knn_top1 is a
weighted k-NN vote (weights exp(cos / 0.07), as DINO). --occlusion (paper Sec 3.4): entropy and
top-1 with k of T frames dropped, none / random / by the pretraining's G. Dataset and clip settings
default to the checkpoint's; flags override them.
"""

import argparse
import json
import os
import sys

import torch

import data
import demo_data
import models
import utils
from utils import knn_predict, per_video, video_features

# for a checkpoint that carries no data settings (backbone.pt, random init): the demo preset's
DEMO_SETTINGS = {"dataset": "demo", "data_root": None, "split": 1,
                 **{k: utils.DEMO_CLIPS[k] for k in ("frames", "stride", "crop")}}


def get_args_parser():
    p = argparse.ArgumentParser("VideoMoCo evaluation")
    p.add_argument("--ckpt", default=None,
                   help="finetune ckpt.pt, pretraining ckpt.pt, or backbone.pt (with --arch); none "
                        "= random init of --arch (kNN baseline)")
    p.add_argument("--dataset", default=None, choices=data.DATASETS, help="the checkpoint's")
    for flag, kind in (("--data-root", str), ("--split", int), ("--frames", int),
                       ("--stride", int), ("--crop", int)):
        p.add_argument(flag, type=kind, default=None, help="default: the checkpoint's")
    p.add_argument("--arch", default=None, choices=models.ARCHS,
                   help="only for a bare backbone.pt or random init")
    p.add_argument("--input", default=None, choices=models.INPUTS,
                   help="encoder input; the checkpoint's by default (a mismatch is refused), rgb "
                        "for backbone.pt")
    p.add_argument("--clips", type=int, default=10, help="clips per video (paper: 10)")
    p.add_argument("--crops", type=int, default=1, choices=(1, 3), help="spatial crops per clip")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours in the k-NN vote")
    p.add_argument("--occlusion", action="store_true",
                   help="entropy and top-1 with frames dropped (finetuned checkpoint)")
    p.add_argument("--drop-frames", type=int, default=None,
                   help="k frames dropped for --occlusion (default: the G's, else T/4)")
    p.add_argument("--gen-ckpt", default=None,
                   help="pretraining checkpoint whose G chooses the frames for --occlusion")
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "none"), help="(bf16 on CUDA)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of a random-init encoder and of --occlusion's random drops")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    return p


# -----------------------------------------------------------------------------
# metrics (pure functions, tested against loops)

def retrieval_recall(query, gallery, query_labels, gallery_labels, ks=(1, 5, 10, 20)):
    """R@k: the fraction of normalised queries (Q, D) with one of their k nearest gallery items
    (G, D) in their class."""
    sim = query @ gallery.T  # (Q, G)
    order = sim.topk(min(max(ks), gallery.shape[0]), dim=1).indices  # (Q, k_max)
    hits = gallery_labels[order] == query_labels[:, None]  # (Q, k_max)
    return {f"R@{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def entropy(probs):
    """Shannon entropy (nats) of each row of probabilities, the paper's Sec 3.4 measure."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)


def topk_accuracy(probs, labels, k):
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()


def load_model(args):
    """(kind, model, ckpt): a finetuned classifier, a pretrained encoder or a random-init one, with
    the checkpoint's data settings filled into the flags not given."""
    if args.ckpt is None:
        if args.arch is None:
            raise SystemExit("error: pass --ckpt, or --arch for a randomly initialised encoder "
                             "(the kNN baseline)")
        ckpt = {}
        kind = "random-init"
        recorded = None
    else:
        ckpt = utils.load_checkpoint(args.ckpt)
        kind = ckpt.get("kind", "backbone")
        recorded = None
        if kind != "backbone":
            recorded = ckpt.get("input") or ckpt.get("args", {}).get("input")
    if args.input and recorded and args.input != recorded:
        raise SystemExit(f"error: {args.ckpt} was trained on {recorded} input; --input "
                         f"{args.input} does not match")
    args.input = recorded or args.input or "rgb"
    if kind == "random-init":
        torch.manual_seed(args.seed)
        model = models.build_encoder(args.arch, 128, args.input)
        settings = DEMO_SETTINGS
    elif kind == "finetune":
        model = models.build_encoder(ckpt["arch"], len(ckpt["classes"]), args.input)
        if ckpt["linear"]:
            utils.add_probe_norm(model)
        model.load_state_dict(ckpt["model"])
        settings = ckpt["data"]
    elif kind == "pretrain":
        arch, state = utils.backbone_state(ckpt)
        model = models.build_encoder(arch, 128, args.input)
        # the head (fc) stays out: kNN uses pooled features
        model.load_state_dict(state, strict=False)
        settings = {k: ckpt["args"][k] for k in data.DATA_KEYS}
    elif kind == "backbone":
        if args.arch is None:
            raise SystemExit(f"error: {args.ckpt} is a bare backbone; pass --arch")
        model = models.build_encoder(args.arch, 128, args.input)  # fc dropped below
        backbone = {k: v for k, v in ckpt.items() if not k.startswith("fc.")}
        utils.transfer_weights(model, backbone, args.ckpt)
        settings = DEMO_SETTINGS
    else:
        raise SystemExit(f"error: {args.ckpt} is a {kind} checkpoint; evaluate takes finetune or "
                         "pretrain checkpoints")
    if kind in ("finetune", "pretrain") and args.dataset not in (None, settings["dataset"]):
        print(f"note: evaluating on --dataset {args.dataset}; {args.ckpt} was trained on "
              f"{settings['dataset']}")
        settings = {**settings, "data_root": None, "split": 1}  # the other set's, not these
    for key in data.DATA_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, settings[key])
    return kind, model, ckpt


# -----------------------------------------------------------------------------
# occlusion

def occlusion_generator(args, ckpt, device):
    """The G that picks frames for --occlusion: --gen-ckpt's, else the one the finetuned checkpoint
    carried over from its pretraining; (None, k) if there is none."""
    spec = None
    if args.gen_ckpt:
        spec = utils.generator_spec(utils.load_checkpoint(args.gen_ckpt, kind="pretrain"))
        if spec is None:
            raise SystemExit(f"error: {args.gen_ckpt} has no G (its run used --generator none)")
    elif ckpt.get("generator"):
        spec = ckpt["generator"]
    k = args.drop_frames
    if k is None:  # G's k scaled to these clips, else T/4
        k = round(spec["drop_frames"] * args.frames / spec["frames"]) if spec else args.frames // 4
    if not 0 < k < args.frames:
        raise SystemExit(f"error: --drop-frames must be in 1..{args.frames - 1} for {args.frames} "
                         "frames")
    if spec is None:
        return None, k
    generator = models.ConvLSTMGenerator()  # pretrain.py's G
    generator.load_state_dict(spec["state"])
    return generator.to(device).eval(), k


# -----------------------------------------------------------------------------

def classify(model, test_loader, labels, args, device, ctx):
    """A finetuned classifier: softmax averaged over the clips and crops of each video, top-1/5."""
    probs, skipped = per_video(lambda x: model(x).softmax(dim=1), test_loader, device, ctx)
    index, p = utils.clip_average(probs)  # (V, classes)
    result = dict(top1=topk_accuracy(p, labels[index], 1),
                  top5=topk_accuracy(p, labels[index], min(5, p.shape[1])),
                  n_skipped=len(skipped), n_videos=len(index))
    return result, (f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
                    f"({len(index)} videos, {args.clips} clips x {args.crops} crops, "
                    f"{len(skipped)} skipped)")


def retrieval(model, test_loader, gallery_loader, labels, num_classes, args, device, ctx):
    """Test videos against the train split: recall at k and the weighted kNN vote."""
    gallery_labels = torch.tensor([y for _, y in gallery_loader.dataset.samples])
    with models.pooled_features(model):
        q, q_index, q_skipped = video_features(model, test_loader, device, ctx)
        g, g_index, g_skipped = video_features(model, gallery_loader, device, ctx)
    recall = retrieval_recall(q, g, labels[q_index], gallery_labels[g_index])
    pred = knn_predict(q, g, gallery_labels[g_index], num_classes, args.knn_k)
    result = dict(recall, knn_top1=(pred == labels[q_index]).float().mean().item(),
                  n_skipped=len(q_skipped) + len(g_skipped), n_videos=len(q_index),
                  n_gallery=len(g_index))
    return result, ("retrieval " + "  ".join(f"{k} {v:.4f}" for k, v in recall.items())
                    + f"  kNN top-1 {result['knn_top1']:.4f} (k={args.knn_k}; "
                    f"{len(q_index)} queries, {len(g_index)} train videos)")


def occlusion(model, test_loader, labels, ckpt, args, device, ctx):
    """Entropy and top-1 of a classifier with k frames dropped: none, at random, by the
    pretraining's G."""
    g_net, k = occlusion_generator(args, ckpt, device)
    drops = {"none": lambda x: x, "random": lambda x: models.random_drop(x, k)[0]}
    if g_net is not None:
        drops["adversarial"] = lambda x: models.drop_frames(x, g_net(x), k)[0]
    result = dict(entropy_adversarial=None, top1_adversarial=None)
    torch.manual_seed(args.seed)  # the random drops are the same on every run
    for mode, drop in drops.items():
        probs, _ = per_video(lambda x: model(drop(x)).softmax(dim=1), test_loader, device, ctx)
        index, p = utils.clip_average(probs)  # (V, classes)
        result[f"entropy_{mode}"] = entropy(p).mean().item()
        result[f"top1_{mode}"] = topk_accuracy(p, labels[index], 1)
    return result, (f"occlusion, {k} of {args.frames} frames dropped: " + "  ".join(
        f"{m}: entropy {result[f'entropy_{m}']:.3f} top-1 {result[f'top1_{m}']:.3f}" for m in drops)
        + ("" if g_net is not None else
           "  (no generator: pass --gen-ckpt for the adversarial row)"))


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    data.quiet_opencv()
    rank, world, device = utils.init_distributed()
    kind, model, ckpt = load_model(args)
    demo_data.ensure(args.dataset, args.data_root)  # the checkpoint's data; a demo set: first use
    model.to(device).eval()
    ctx, _ = utils.autocast_context(args.amp, device)
    if args.occlusion and kind != "finetune":
        raise SystemExit("error: --occlusion needs a finetuned checkpoint (a classifier)")

    try:
        train, classes, _ = data.list_videos(args.dataset, args.data_root, args.split, True)
        test, _, _ = data.list_videos(args.dataset, args.data_root, args.split, False)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    test_loader = data.test_loader(test, args, args.batch_size, args.workers, args.clips,
                                   args.crops)
    if kind != "finetune":  # frozen features: BN statistics re-estimated on training clips
        utils.estimate_bn_statistics(model, data.bn_loader(train, args, args.workers), device, ctx)
    labels = torch.tensor([y for _, y in test_loader.dataset.samples])
    result = {"checkpoint": args.ckpt, "kind": kind, "input": args.input, "dataset": args.dataset,
              "split": args.split, "clips": args.clips, "crops": args.crops,
              "n_videos": len(labels),
              "bn_statistics": "checkpoint" if kind == "finetune" else "re-estimated"}
    runs = []  # (result fields, table line) of each mode
    if kind == "finetune":
        runs.append(classify(model, test_loader, labels, args, device, ctx))
    else:
        gallery_loader = data.test_loader(train, args, args.batch_size, args.workers, args.clips,
                                          args.crops)
        runs.append(retrieval(model, test_loader, gallery_loader, labels, len(classes), args,
                              device, ctx))
    if args.occlusion:
        runs.append(occlusion(model, test_loader, labels, ckpt, args, device, ctx))
    for fields, _ in runs:
        result.update(fields)
    if device.type == "cuda":
        result["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    if rank == 0:
        print(f"{args.ckpt} ({kind}) on {args.dataset} split {args.split}:")
        for _, line in runs:
            print("  " + line)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        print(json.dumps(result))
        sys.stdout.flush()
    utils.end_distributed()
    return result


if __name__ == "__main__":
    main()
