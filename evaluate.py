"""
Evaluate a checkpoint: prints a short table, then one JSON object as the last line of stdout.

    python evaluate.py --ckpt runs/demo-finetune/ckpt.pt              # 10-clip test: top1, top5
    python evaluate.py --ckpt runs/demo/ckpt.pt                       # pretraining: kNN retrieval
    python evaluate.py --ckpt runs/demo-finetune/ckpt.pt --occlusion  # top-1, k frames dropped
    python evaluate.py --ckpt runs/demo-finetune/ckpt.pt --cam 4 cams/ # Grad-CAM strips as PNG
    python evaluate.py --ckpt runs/demo/ckpt.pt --motion              # does it look at motion?

Finetuned checkpoint (finetune.py): `--clips` uniformly spaced clips per test video (x `--crops`),
softmax averaged (the paper's protocol, Sec 4.2). Pretraining checkpoint, backbone.pt (with --arch)
or --knn: pooled backbone features of the train split (gallery) and test split (queries),
L2-normalised per clip and averaged over clips; retrieval R@k is a hit when any of the k nearest
train videos has the query's class (VCOP / CoCLR protocol); knn_top1 is a weighted k-NN vote (k =
--knn-k, weights exp(cos / 0.07), as DINO). --occlusion (paper Sec 3.4): mean prediction entropy and
top-1 with k of T frames dropped, none / random / chosen by the pretraining's generator G. --motion:
how much the pooled features move when a clip's motion is removed (every frame = the middle one) or
its frames are shuffled, relative to the distance between two different test clips (0 = the encoder
ignores motion). Dataset and clip settings default to the checkpoint's; flags override them.
"""

import argparse
import json
import os
import sys

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import loading
import models
import utils
from models import pooled_features
from utils import knn_predict, per_video, video_features

DATA_KEYS = ("dataset", "data_root", "split", "frames", "stride", "crop")
# for a checkpoint that carries no data settings (backbone.pt, random init): the demo preset's
DEMO_SETTINGS = {"dataset": "demo", "data_root": None, "split": 1,
                 **{k: utils.DEMO_CLIPS[k] for k in ("frames", "stride", "crop")}}


def get_args_parser():
    p = argparse.ArgumentParser("VideoMoCo evaluation")
    p.add_argument("--ckpt", default=None,
                   help="finetune ckpt.pt, pretraining ckpt.pt, or backbone.pt (with --arch); none "
                        "= random init of --arch (kNN baseline)")
    p.add_argument("--dataset", default=None, choices=data.DATASETS,
                   help="default: the checkpoint's")
    p.add_argument("--data-root", default=None, help="default: the checkpoint's")
    p.add_argument("--split", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per clip; default: the checkpoint's")
    p.add_argument("--stride", type=int, default=None,
                   help="temporal stride; default: the checkpoint's")
    p.add_argument("--crop", type=int, default=None, help="crop size; default: the checkpoint's")
    p.add_argument("--arch", default=None, choices=models.ARCHS,
                   help="only for a bare backbone.pt or random init")
    p.add_argument("--input", default=None, choices=models.INPUTS,
                   help="encoder input; the checkpoint's by default (a mismatch is refused), rgb "
                        "for backbone.pt")
    p.add_argument("--clips", type=int, default=10,
                   help="uniformly spaced clips per video (paper: 10)")
    p.add_argument("--crops", type=int, default=1, choices=(1, 3), help="spatial crops per clip")
    p.add_argument("--knn", action="store_true",
                   help="kNN retrieval even for a finetuned checkpoint (its backbone)")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours in the k-NN vote")
    p.add_argument("--occlusion", action="store_true",
                   help="entropy and top-1 with frames dropped (finetuned checkpoint)")
    p.add_argument("--drop-frames", type=int, default=None,
                   help="k frames dropped for --occlusion (default: the G's, else T/4)")
    p.add_argument("--gen-ckpt", default=None,
                   help="pretraining checkpoint whose G chooses the frames for --occlusion")
    p.add_argument("--motion", action="store_true",
                   help="motion sensitivity of the pooled features: frozen and time-shuffled test "
                        "clips (any checkpoint)")
    p.add_argument("--cam", nargs=2, metavar=("N", "DIR"), default=None,
                   help="write Grad-CAM strips of N test clips to DIR")
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "none"),
                   help="autocast dtype (default: bf16 on CUDA)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of a random-init encoder and of --occlusion's random drops")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    return p


# -----------------------------------------------------------------------------
# metrics (pure functions, tested against loops)

def retrieval_recall(query, gallery, query_labels, gallery_labels, ks=(1, 5, 10, 20)):
    """R@k: fraction of queries with at least one of their k nearest gallery items (cosine) in the
    query's class. query (Q, D), gallery (G, D) L2-normalised."""
    sim = query @ gallery.T  # (Q, G)
    order = sim.topk(min(max(ks), gallery.shape[0]), dim=1).indices  # (Q, k_max)
    hits = gallery_labels[order] == query_labels[:, None]  # (Q, k_max)
    return {f"R@{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def entropy(probs):
    """Shannon entropy (nats) of each row of probabilities, the paper's Sec 3.4 measure."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)


def topk_accuracy(probs, labels, k):
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()


def relative_shift(feats, changed):
    """Mean distance between each clip's feature and its changed version, divided by the mean
    distance between two different clips: mean_i |f_i - f'_i| / mean_{i != j} |f_i - f_j|.
    feats, changed (N, D), N >= 2. 0: the change leaves the features where they were."""
    n = feats.shape[0]
    between = torch.cdist(feats, feats).sum() / (n * (n - 1))  # the diagonal is zero
    return ((feats - changed).norm(dim=1).mean() / between.clamp_min(1e-12)).item()


def freeze_motion(x):
    """Every frame of the clips (N, C, T, H, W) replaced by the middle one: appearance kept, motion
    gone."""
    return x[:, :, x.shape[2] // 2:x.shape[2] // 2 + 1].expand_as(x).contiguous()


def shuffle_frames(x, rng):
    """Each clip's frames in a random order of its own: the same frames, the order gone. rng: a
    torch.Generator."""
    order = torch.rand(x.shape[0], x.shape[2], generator=rng).argsort(dim=1).to(x.device)  # (N, T)
    return x.gather(2, order[:, None, :, None, None].expand_as(x))


def load_model(args):
    """(kind, model, ckpt): a finetuned classifier, a pretrained encoder or a random-init one, with
    the checkpoint's data settings filled into the flags not given."""
    if args.ckpt is None:
        if args.arch is None:
            raise SystemExit("error: pass --ckpt, or --arch for a randomly initialised encoder "
                             "(the kNN baseline)")
        ckpt, kind, recorded = {}, "random-init", None
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
        model = models.build_encoder(arch, ckpt["args"]["moco_dim"], args.input)
        # the head (fc) stays out: kNN uses pooled features
        model.load_state_dict(state, strict=False)
        settings = {k: ckpt["args"][k] for k in DATA_KEYS}
    elif kind == "backbone":
        if args.arch is None:
            raise SystemExit(f"error: {args.ckpt} is a bare backbone; pass --arch")
        dim = ckpt["fc.weight"].shape[0] if "fc.weight" in ckpt else 1
        model = models.build_encoder(args.arch, dim, args.input)
        backbone = {k: v for k, v in ckpt.items() if not k.startswith("fc.")}
        utils.transfer_weights(model, backbone, args.ckpt)
        settings = DEMO_SETTINGS
    else:
        raise SystemExit(f"error: {args.ckpt} is a {kind} checkpoint; evaluate takes finetune or "
                         "pretrain checkpoints")
    if kind in ("finetune", "pretrain") and args.dataset not in (None, settings["dataset"]):
        print(f"note: evaluating on --dataset {args.dataset}; {args.ckpt} was trained on "
              f"{settings['dataset']}")
    for key in DATA_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, settings[key])
    return kind, model, ckpt


# -----------------------------------------------------------------------------
# occlusion and class-activation maps

def occlusion_generator(args, ckpt, device):
    """The G that picks frames for --occlusion: --gen-ckpt's, else the one the finetuned checkpoint
    carried over from its pretraining; (None, k) if there is none."""
    spec = None
    if args.gen_ckpt:
        source = utils.load_checkpoint(args.gen_ckpt, kind="pretrain")
        a = source["args"]
        spec = {"state": source["generator"], "hidden": a["g_hidden"], "width": a["g_width"],
                "drop_frames": a["drop_frames"], "frames": a["frames"]}
    elif ckpt.get("generator"):
        spec = ckpt["generator"]
    k = args.drop_frames
    if not k:  # G's k scaled to these clips, else T/4
        k = round(spec["drop_frames"] * args.frames / spec["frames"]) if spec else args.frames // 4
    if spec is None:
        return None, k
    generator = models.ConvLSTMGenerator(3, spec["hidden"], spec["width"])
    generator.load_state_dict(spec["state"])
    return generator.to(device).eval(), k


def grad_cam(model, clip):
    """Grad-CAM (Selvaraju et al.) on the last conv stage, the input of `avgpool`, for the predicted
    class of one clip (1, 3, T, H, W). Returns (map (T, H, W) in [0, 1], predicted class)."""
    store = {}

    def hook(module, inputs):
        store["act"] = inputs[0]
        inputs[0].register_hook(lambda g: store.__setitem__("grad", g))

    handle = model.avgpool.register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(clip)
            pred = int(logits.argmax(1))
            model.zero_grad(set_to_none=True)
            logits[0, pred].backward()
    finally:
        handle.remove()
    act, grad = store["act"][0], store["grad"][0]  # (C, t, h, w)
    cam = F.relu((grad.mean(dim=(1, 2, 3))[:, None, None, None] * act).sum(0))  # (t, h, w)
    cam = F.interpolate(cam[None, None], size=clip.shape[2:], mode="trilinear",
                        align_corners=False)[0, 0]
    return (cam / cam.max().clamp_min(1e-8)).detach(), pred


def write_cam_strip(path, clip, cam, title, max_frames=8):
    """PNG strip: up to `max_frames` evenly spaced frames with the map overlaid, a title above."""
    frames = data.denormalize(clip[0].float().cpu()).clamp(0, 1).permute(1, 2, 3, 0).numpy()
    frames = (frames * 255).astype(np.uint8)  # (T, H, W, 3)
    cam = cam.cpu().numpy()
    picks = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    tiles = []
    for t in picks:
        heat = cv2.applyColorMap((cam[t] * 255).astype(np.uint8), cv2.COLORMAP_JET)
        tiles.append(cv2.addWeighted(cv2.cvtColor(frames[t], cv2.COLOR_RGB2BGR), 0.55,
                                     heat, 0.45, 0))
    strip = np.concatenate(tiles, axis=1)
    scale = max(1, 128 // strip.shape[0])
    strip = cv2.resize(strip, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    banner = np.full((22, strip.shape[1], 3), 255, np.uint8)
    cv2.putText(banner, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(path, np.concatenate([banner, strip], axis=0))


# -----------------------------------------------------------------------------

def clip_average(outputs):
    """{video index: (clips, D)} from per_video -> (sorted video indices (V,), (V, D) mean over
    clips)."""
    index = torch.tensor(sorted(outputs))
    return index, torch.stack([outputs[i].mean(0) for i in index.tolist()])


def classify(model, test_loader, labels, args, device, ctx):
    """A finetuned classifier: softmax averaged over the clips and crops of each video, top-1/5."""
    probs, skipped = per_video(lambda x: model(x).softmax(dim=1), test_loader, device, ctx)
    index, p = clip_average(probs)  # (V, classes)
    result = dict(top1=topk_accuracy(p, labels[index], 1),
                  top5=topk_accuracy(p, labels[index], min(5, p.shape[1])),
                  n_skipped=len(skipped), n_videos=len(index))
    return result, (f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
                    f"({len(index)} videos, {args.clips} clips x {args.crops} crops, "
                    f"{len(skipped)} skipped)")


def retrieval(model, test_loader, gallery_loader, labels, num_classes, args, device, ctx):
    """Test videos against the train split: recall at k and the weighted kNN vote."""
    gallery_labels = torch.tensor([y for _, y in gallery_loader.dataset.samples])
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
        index, p = clip_average(probs)  # (V, classes)
        result[f"entropy_{mode}"] = entropy(p).mean().item()
        result[f"top1_{mode}"] = topk_accuracy(p, labels[index], 1)
    return result, (f"occlusion, {k} of {args.frames} frames dropped: " + "  ".join(
        f"{m}: entropy {result[f'entropy_{m}']:.3f} top-1 {result[f'top1_{m}']:.3f}" for m in drops)
        + ("" if g_net is not None else
           "  (no generator: pass --gen-ckpt for the adversarial row)"))


def motion(model, test_loader, args, device, ctx):
    """How far pooled features move when a clip's motion is frozen or its frames are shuffled."""
    rng = torch.Generator().manual_seed(args.seed)
    with pooled_features(model):
        def three(x):  # the clip, its motion frozen, its frames shuffled
            return torch.cat([model(x), model(freeze_motion(x)), model(shuffle_frames(x, rng))],
                             dim=1)

        feats, _ = per_video(three, test_loader, device, ctx)
    # (V*C, D) each
    f, f_static, f_shuffled = torch.cat([feats[i] for i in sorted(feats)]).chunk(3, dim=1)
    if len(f) < 2:
        raise SystemExit("error: --motion compares test clips with each other and needs at least 2")
    result = dict(motion_static=relative_shift(f, f_static),
                  motion_shuffle=relative_shift(f, f_shuffled))
    return result, (f"motion sensitivity (feature shift / distance between clips): frozen clip "
                    f"{result['motion_static']:.3f}  shuffled frames "
                    f"{result['motion_shuffle']:.3f}  ({len(f)} clips)")


def cam_strips(model, test_loader, classes, args, device):
    """Grad-CAM strips of N test clips spread over the test list (so across classes), as PNGs."""
    n, out_dir = int(args.cam[0]), args.cam[1]
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for i in np.linspace(0, len(test_loader.dataset) - 1, n).round().astype(int).tolist():
        sample = test_loader.dataset[i]
        if not sample["valid"]:
            continue
        clip = sample["video"][len(sample["video"]) // 2][None].to(device)  # the middle clip
        cam, pred = grad_cam(model, clip)
        name = os.path.splitext(os.path.basename(test_loader.dataset.samples[i][0]))[0]
        title = f"{name}: true {classes[sample['label']]}, predicted {classes[pred]}"
        write_cam_strip(os.path.join(out_dir, f"{name}.png"), clip, cam, title)
        written += 1
    return dict(cam_dir=out_dir), f"Grad-CAM strips of {written} test clips written to {out_dir}"


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    rank, world, device = utils.init_distributed()
    kind, model, ckpt = load_model(args)
    model.to(device).eval()
    ctx, _ = utils.autocast_context(args.amp, device)
    if args.occlusion and kind != "finetune":
        raise SystemExit("error: --occlusion needs a finetuned checkpoint (a classifier)")
    if args.cam and kind != "finetune":
        raise SystemExit("error: --cam needs a finetuned checkpoint (a classifier)")

    def loader(train):
        try:
            dataset, classes, _ = loading.build_dataset(args, train=train, mode="test")
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
        return loading.build_loader(dataset, args.batch_size, args.workers, train=False), classes

    test_loader, classes = loader(train=False)
    if kind != "finetune":  # frozen features: BN statistics re-estimated on training clips
        try:
            utils.estimate_bn_statistics(model, utils.bn_loader(args, args.workers), device, ctx)
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
    labels = torch.tensor([y for _, y in test_loader.dataset.samples])
    result = {"checkpoint": args.ckpt, "kind": kind, "input": args.input, "dataset": args.dataset,
              "split": args.split, "clips": args.clips, "crops": args.crops,
              "n_videos": len(labels),
              "bn_statistics": "checkpoint" if kind == "finetune" else "re-estimated"}
    runs = []  # (result fields, table line) of each mode
    if kind == "finetune" and not args.knn:
        runs.append(classify(model, test_loader, labels, args, device, ctx))
    if kind != "finetune" or args.knn:
        gallery_loader, _ = loader(train=True)
        runs.append(retrieval(model, test_loader, gallery_loader, labels, len(classes), args,
                              device, ctx))
    if args.occlusion:
        runs.append(occlusion(model, test_loader, labels, ckpt, args, device, ctx))
    if args.motion:
        runs.append(motion(model, test_loader, args, device, ctx))
    if args.cam and rank == 0:
        runs.append(cam_strips(model, test_loader, classes, args, device))
    for fields, _ in runs:
        result.update(fields)

    if rank == 0:
        print(f"{args.ckpt} ({kind}) on {args.dataset} split {args.split}:")
        for _, line in runs:
            print("  " + line)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        print(json.dumps(result))
        sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
