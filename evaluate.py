"""
Evaluate checkpoints: prints a short table, then one JSON object as the last line of stdout.

    python evaluate.py --ckpt runs/demo-finetune/ckpt.pt              # 10-clip test: top1, top5
    python evaluate.py --ckpt runs/demo/ckpt.pt                       # pretraining: kNN retrieval
    python evaluate.py --ckpt runs/demo-finetune/ckpt.pt --occlusion  # top-1, k frames dropped
    python evaluate.py --ckpt runs/moco-finetune/ckpt.pt --ckpt runs/demo-finetune/ckpt.pt \
        --gen-ckpt runs/demo/ckpt.pt --figure fig4.png --cam fig5.png  # side by side, pictures

Finetuned checkpoint (finetune.py): `--clips` uniformly spaced clips per test video (x `--crops`),
softmax averaged (the paper's protocol, Sec 4.2). Pretraining checkpoint, backbone.pt (with --arch)
or random init: pooled backbone features, under BN statistics re-estimated on training clips, of the
train split (gallery) and test split (queries), L2-normalised per clip and averaged over clips; R@k
is a hit when any of the k nearest train videos has the query's class (VCOP / CoCLR); knn_top1 is a
weighted k-NN vote (weights exp(cos / 0.07), as DINO). --occlusion (paper Sec 3.4): entropy and
top-1 with k of T frames dropped, none / random / by the pretraining's G, per video and overall
(one pass: the none mode is the test, its top-1/5 the checkpoint's).
Several --ckpt are evaluated on the same clips, and under --occlusion with the same drops (each
batch dropped once per mode, then given to every checkpoint); --figure draws Fig 4 (frame strips,
dropped frames crossed, every checkpoint's prediction and entropy), --cam Fig 5 (Grad-CAM of the
true class on the last 3D conv block, per frame; with r(CAM, pixel motion)). Dataset and clip
settings default to the first checkpoint's; flags override them; checkpoints whose settings differ
are refused.
"""

import argparse
import dataclasses
import json
import os
import sys

import torch
import torch.nn.functional as F

import data
import demo_data
import models
import utils
import visualize
from utils import knn_predict, per_video, video_features

# for a checkpoint that carries no data settings (backbone.pt, random init): the demo preset's
DEMO_SETTINGS = {"dataset": "demo", "data_root": None, "split": 1,
                 **{k: utils.DEMO_CLIPS[k] for k in ("frames", "stride", "crop")}}


def get_args_parser():
    p = argparse.ArgumentParser("VideoMoCo evaluation")
    p.add_argument("--ckpt", action="append", default=None,
                   help="finetune ckpt.pt, pretraining ckpt.pt, or backbone.pt (with --arch); none "
                        "= random init of --arch (kNN baseline); repeat it to compare checkpoints "
                        "on the same clips (and, with --occlusion, the same drops)")
    p.add_argument("--label", action="append", default=None,
                   help="a name per --ckpt for the tables and figures (default: its folder)")
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
    p.add_argument("--figure", default=None,
                   help="PNG (the paper's Fig 4): frame strips with the dropped frames marked and "
                        "each checkpoint's prediction and entropy under each drop; implies "
                        "--occlusion")
    p.add_argument("--cam", default=None,
                   help="PNG (the paper's Fig 5): Grad-CAM of the last 3D conv block per frame, "
                        "every checkpoint on the same clips")
    p.add_argument("--figure-videos", type=int, default=3,
                   help="test videos in --figure and --cam (evenly spaced over the list)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "none"), help="(bf16 on CUDA)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of a random-init encoder and of --occlusion's random drops (rank "
                        "r of a world of W seeds them with seed * W + r)")
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


@dataclasses.dataclass
class Loaded:
    """One --ckpt, ready to evaluate: its kind, model, checkpoint dict, input mode, data settings
    and the label its rows carry."""
    path: str
    kind: str
    model: torch.nn.Module
    ckpt: dict
    input: str
    settings: dict
    label: str


def load_model(args, path, label=None):
    """`path` (None: a random init of --arch) as a Loaded: a finetuned classifier, a pretrained
    encoder or a random-init one, with its data settings."""
    if path is None:
        if args.arch is None:
            raise SystemExit("error: pass --ckpt, or --arch for a randomly initialised encoder "
                             "(the kNN baseline)")
        ckpt = {}
        kind = "random-init"
        recorded = None
    else:
        ckpt = utils.load_checkpoint(path)
        kind = ckpt.get("kind", "backbone")
        recorded = None
        if kind != "backbone":
            recorded = ckpt.get("input") or ckpt.get("args", {}).get("input")
    if args.input and recorded and args.input != recorded:
        raise SystemExit(f"error: {path} was trained on {recorded} input; --input "
                         f"{args.input} does not match")
    input_mode = recorded or args.input or "rgb"
    if kind == "random-init":
        torch.manual_seed(args.seed)
        model = models.build_encoder(args.arch, 128, input_mode)
        settings = DEMO_SETTINGS
    elif kind == "finetune":
        model = models.build_encoder(ckpt["arch"], len(ckpt["classes"]), input_mode)
        if ckpt["linear"]:
            utils.add_probe_norm(model)
        model.load_state_dict(ckpt["model"])
        settings = ckpt["data"]
    elif kind == "pretrain":
        arch, state = utils.backbone_state(ckpt)
        model = models.build_encoder(arch, 128, input_mode)
        # the head (fc) stays out: kNN uses pooled features
        model.load_state_dict(state, strict=False)
        settings = {k: ckpt["args"][k] for k in data.DATA_KEYS}
    elif kind == "backbone":
        if args.arch is None:
            raise SystemExit(f"error: {path} is a bare backbone; pass --arch")
        model = models.build_encoder(args.arch, 128, input_mode)  # fc dropped below
        backbone = {k: v for k, v in ckpt.items() if not k.startswith("fc.")}
        utils.transfer_weights(model, backbone, path)
        settings = DEMO_SETTINGS
    else:
        raise SystemExit(f"error: {path} is a {kind} checkpoint; evaluate takes finetune or "
                         "pretrain checkpoints")
    if kind in ("finetune", "pretrain") and args.dataset not in (None, settings["dataset"]):
        print(f"note: evaluating on --dataset {args.dataset}; {path} was trained on "
              f"{settings['dataset']}")
        settings = {**settings, "data_root": None, "split": 1}  # the other set's, not these
    if label is None:  # the checkpoint's folder: runs/moco-s0-ft/ckpt.pt -> moco-s0-ft
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) if path else "random"
    return Loaded(path, kind, model, ckpt, input_mode, settings, label)


def load_models(args):
    """Every --ckpt, and the data settings they are all evaluated on: the flags given, else the
    first checkpoint's; a later checkpoint whose own settings differ where no flag was given is
    refused (checkpoints are compared on the same clips or not at all)."""
    paths = args.ckpt or [None]
    labels = args.label or []
    if len(labels) not in (0, len(paths)):
        raise SystemExit(f"error: {len(labels)} --label for {len(paths)} --ckpt; give one per "
                         "checkpoint or none")
    given = {key for key in data.DATA_KEYS if getattr(args, key) is not None}
    loaded = []
    for i, path in enumerate(paths):
        one = load_model(args, path, labels[i] if labels else None)
        if loaded:
            first = loaded[0]
            for key in sorted(set(data.DATA_KEYS) - given):
                if one.settings[key] != first.settings[key]:
                    raise SystemExit(
                        f"error: {first.path} and {path} were trained on different {key} "
                        f"({first.settings[key]} and {one.settings[key]}); pass "
                        f"--{key.replace('_', '-')} to evaluate both on the same clips")
        loaded.append(one)
    names = [one.label for one in loaded]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: two checkpoints share a label ({', '.join(names)}); pass one "
                         "distinct --label per --ckpt")
    for key in data.DATA_KEYS:
        if key not in given:
            setattr(args, key, loaded[0].settings[key])
    return loaded


# -----------------------------------------------------------------------------
# occlusion

def occlusion_generator(args, loaded, device):
    """The G that picks frames for --occlusion, (G or None, k, where it came from): --gen-ckpt's,
    else the one the first checkpoint to carry one took over from its pretraining."""
    spec = None
    source = None
    if args.gen_ckpt:
        spec = utils.generator_spec(utils.load_checkpoint(args.gen_ckpt, kind="pretrain"))
        source = args.gen_ckpt
        if spec is None:
            raise SystemExit(f"error: {args.gen_ckpt} has no G (its run used --generator none)")
    else:
        for one in loaded:
            if one.ckpt.get("generator"):
                spec = one.ckpt["generator"]
                source = one.path
                break
    k = args.drop_frames
    if k is None:  # G's k scaled to these clips, else T/4
        k = round(spec["drop_frames"] * args.frames / spec["frames"]) if spec else args.frames // 4
    if not 0 < k < args.frames:
        raise SystemExit(f"error: --drop-frames must be in 1..{args.frames - 1} for {args.frames} "
                         "frames")
    if spec is None:
        return None, k, None
    generator = models.ConvLSTMGenerator()  # pretrain.py's G
    generator.load_state_dict(spec["state"])
    return generator.to(device).eval(), k, source


def occlusion(loaded, test_loader, labels, drops, args, device, ctx):
    """Every finetuned checkpoint's (Loaded) entropy and top-1 under every drop mode ({mode: x ->
    (x_dropped, mask)}), on the same clips with the same drops: each batch is dropped once per mode
    and given to all. Returns ([per checkpoint: {mode: {"probs" (V, classes) clip-averaged, "top1",
    "entropy"}}], {mode: (V, T) the drops of each video's first clip}, the video indices (V,),
    the skipped ones)."""
    t = args.frames
    classifiers = [one.model for one in loaded]

    def run(x):  # (V*C, 3, T, H, W) -> (V*C, modes x (classifiers x classes + T))
        out = []
        for drop in drops.values():
            x_dropped, mask = drop(x)
            out += [m(x_dropped).float().softmax(dim=1) for m in classifiers] + [mask.float()]
        return torch.cat(out, dim=1)

    outputs, skipped = per_video(run, test_loader, device, ctx)  # {video: (C, columns)}
    index = torch.tensor(sorted(outputs), dtype=torch.long)
    table = torch.stack([outputs[i] for i in index.tolist()])  # (V, C, columns)
    sizes = []
    for _ in drops:
        sizes += [len(one.ckpt["classes"]) for one in loaded] + [t]
    parts = iter(table.split(sizes, dim=2))
    results = [{} for _ in classifiers]
    masks = {}
    for mode in drops:
        for result in results:
            probs = next(parts).mean(dim=1)  # softmax averaged over clips (V, classes)
            h = entropy(probs)
            result[mode] = dict(probs=probs, entropy=h, top1=probs.argmax(dim=1) == labels[index])
        masks[mode] = next(parts)[:, 0]  # (V, T)
    return results, masks, index, skipped


def drop_modes(g_net, k, seed):
    """{mode: x -> (x with k frames dropped, mask (N, T))}: none, at random (a CPU generator seeded
    once: the same drops on every device and run with the same world size), by G (Eq 3) where
    there is one."""
    rng = torch.Generator().manual_seed(seed)
    modes = {"none": lambda x: (x, x.new_zeros(x.shape[0], x.shape[2])),
             "random": lambda x: models.random_drop(x, k, generator=rng)}
    if g_net is not None:
        modes["adversarial"] = lambda x: models.drop_frames(x, g_net(x), k)
    return modes


def occlusion_fields(per_mode):
    """The JSON fields of one classifier's occlusion rows: entropy and top-1 per mode, the top-1
    each drop costs, per-video predictions and entropies."""
    fields = dict(entropy_adversarial=None, top1_adversarial=None, top1_lost_adversarial=None)
    for mode, r in per_mode.items():
        fields[f"entropy_{mode}"] = r["entropy"].mean().item()
        fields[f"top1_{mode}"] = r["top1"].float().mean().item()
        if mode != "none":
            fields[f"top1_lost_{mode}"] = fields["top1_none"] - fields[f"top1_{mode}"]
    fields["per_video"] = {mode: dict(pred=r["probs"].argmax(dim=1).tolist(),
                                      entropy=[round(h, 5) for h in r["entropy"].tolist()])
                           for mode, r in per_mode.items()}
    return fields


# -----------------------------------------------------------------------------
# Grad-CAM (the paper's Fig 5 shows "attention maps" without saying how they are made; we use
# Grad-CAM, Selvaraju et al. 2017, in space and time)

def last_conv_block(model):
    """The encoder's last 3D conv block: layer4 of torchvision's VideoResNet, the last conv stage
    of TinyEncoder."""
    if hasattr(model, "layer4"):
        return model.layer4
    if isinstance(model, models.TinyEncoder):
        return model.features
    raise SystemExit(f"error: Grad-CAM knows no last conv block of {type(model).__name__}")


def grad_cam(model, x, target, layer):
    """Grad-CAM of class `target` (N,) for clips x (N, 3, T, H, W): the activations A
    (N, K, t, h, w) of `layer`, each channel weighted by the mean over (t, h, w) of
    d score_target / d A_k, summed over channels, ReLU. Returns (N, t, h, w), unnormalised; model
    in eval mode."""
    store = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: store.update(a=output))
    try:
        with torch.enable_grad():
            logits = model(x)
            scores = logits.float().gather(1, target[:, None]).sum()  # clips are independent
            grad, = torch.autograd.grad(scores, store["a"])
    finally:
        handle.remove()
    a = store["a"].detach().float()
    alpha = grad.float().mean(dim=(2, 3, 4), keepdim=True)  # (N, K, 1, 1, 1)
    return F.relu((alpha * a).sum(dim=1))  # (N, t, h, w)


def cam_per_frame(cam, size):
    """Grad-CAM (N, t, h, w) resized to the clip's (T, H, W) (trilinear) and scaled to [0, 1] per
    clip: one map per frame."""
    up = F.interpolate(cam[:, None], size=size, mode="trilinear", align_corners=False)[:, 0]
    return up / up.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None, None]


# -----------------------------------------------------------------------------
# the figures

def figure_videos(n_videos, count):
    """`count` test videos evenly spaced over the list (which goes by class), for the figures."""
    count = min(count, n_videos)
    return sorted({round(i * (n_videos - 1) / max(count - 1, 1)) for i in range(count)})


def first_clips(dataset, positions):
    """The first clip (3, T, H, W), normalised, of the video at each of `positions` of
    `dataset`, or of the next one that decodes: (video indices, clips)."""
    videos, clips = [], []
    for p in positions:
        for v in range(p, len(dataset)):
            item = dataset[v][0]
            if item["valid"] and v not in videos:
                videos.append(v)
                clips.append(item["video"][0])
                break
    return videos, clips


def figure_selection(dataset, count):
    """The videos both figures draw, and their first clips: `count` evenly spaced over the test
    list, each skipped for the next one where it does not decode."""
    videos, clips = first_clips(dataset, figure_videos(len(dataset), count))
    if not videos:
        raise SystemExit("error: no test video decodes; nothing to draw for --figure or --cam")
    return videos, clips


def video_title(dataset, classes, v):
    """A figure's line over video v: its file name and class."""
    path, label = dataset.samples[v]
    return f"{os.path.basename(path)}: {classes[label]}"


def draw_occlusion_figure(path, loaded, results, masks, index, selection, dataset, classes):
    """Fig 4 as a PNG: the selected videos' first clips and those clips' drops under every drop
    mode, each checkpoint's prediction and entropy (clip-averaged, as the numbers) beside each
    strip. A selected video the occlusion pass did not decode is left out (nothing is drawn where
    that leaves none). Returns the paths of the videos left out."""
    decoded = index.tolist()  # the videos the occlusion pass read
    left_out = [dataset.samples[v][0] for v in selection[0] if v not in decoded]
    kept = [(v, c) for v, c in zip(*selection) if v in decoded]
    if not kept:
        return left_out
    videos, clips = zip(*kept)
    positions = [decoded.index(v) for v in videos]
    captions = {mode: [] for mode in masks}
    for mode in masks:
        for p in positions:
            lines = []
            for one, per_mode in zip(loaded, results):
                r = per_mode[mode]
                ok = bool(r["top1"][p])
                colour = visualize.GREEN if ok else visualize.RED
                lines.append((f"{one.label}: {classes[int(r['probs'][p].argmax())]} "
                              f"H={r['entropy'][p].item():.2f}", colour))
            captions[mode].append(lines)
    visualize.occlusion_figure(path, [data.denormalize(c) for c in clips],
                               [video_title(dataset, classes, v) for v in videos],
                               {m: masks[m][positions] for m in masks}, captions)
    return left_out


def draw_cam_figure(path, loaded, selection, dataset, classes, device):
    """Fig 5 as a PNG: Grad-CAM of the true class per frame, every checkpoint on the selected
    videos' first clips; returns each checkpoint's mean r(CAM, pixel motion) over those clips."""
    videos, clips = selection
    x = torch.stack(clips).to(device)  # (V, 3, T, H, W)
    target = torch.tensor([dataset.samples[v][1] for v in videos], device=device)
    motion = models.pixel_motion(x)  # (V, T, H, W)
    cams = {}
    captions = {}
    r_motion = {}
    for one in loaded:
        cam = grad_cam(one.model, x, target, last_conv_block(one.model))
        per_frame = cam_per_frame(cam, x.shape[2:])  # (V, T, H, W)
        r = utils.pearson(per_frame, motion)  # per clip
        with torch.no_grad():
            pred = one.model(x).argmax(dim=1)
        cams[one.label] = per_frame.cpu()
        captions[one.label] = [[(f"predicts {classes[int(pred[i])]}",
                                 visualize.GREEN if pred[i] == target[i] else visualize.RED),
                                (f"r(CAM, motion) {r[i].item():+.2f}", visualize.BLACK)]
                               for i in range(len(videos))]
        r_motion[one.label] = r.mean().item()
    clips = [data.denormalize(c) for c in x.cpu()]
    titles = [video_title(dataset, classes, v) + " (Grad-CAM of this class)" for v in videos]
    visualize.cam_figure(path, clips, titles, cams, captions)
    return r_motion


# -----------------------------------------------------------------------------

def classify(model, test_loader, labels, args, device, ctx):
    """A finetuned classifier: softmax averaged over the clips and crops of each video, top-1/5."""
    probs, skipped = per_video(lambda x: model(x).softmax(dim=1), test_loader, device, ctx)
    index, p = utils.clip_average(probs)  # (V, classes)
    return classification(index, p, labels, skipped, args)


def classification(index, p, labels, skipped, args):
    """Top-1/5 of the clip-averaged softmax p (V, classes) of the videos `index`, and its line."""
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


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    data.quiet_opencv()
    rank, world, device = utils.init_distributed()
    loaded = load_models(args)
    demo_data.ensure(args.dataset, args.data_root)  # the checkpoints' data; a demo set: first use
    ctx, _ = utils.autocast_context(args.amp, device)
    if args.figure:
        args.occlusion = True  # the figure shows the occlusion rows
    finetuned = all(one.kind == "finetune" for one in loaded)
    if (args.occlusion or args.cam) and not finetuned:
        raise SystemExit("error: --occlusion, --figure and --cam need finetuned checkpoints "
                         "(classifiers)")
    if (args.figure or args.cam) and args.figure_videos < 1:
        raise SystemExit(f"error: --figure-videos {args.figure_videos}: a figure needs at "
                         "least 1 video")
    for path in (args.figure, args.cam, args.json):  # before the work, not after it
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise SystemExit(f"error: the folder of {path} does not exist")

    try:
        train, classes, _ = data.list_videos(args.dataset, args.data_root, args.split, True)
        test, _, _ = data.list_videos(args.dataset, args.data_root, args.split, False)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    for one in loaded:
        if one.kind == "finetune" and one.ckpt["classes"] != classes:
            raise SystemExit(f"error: {one.path} classifies {len(one.ckpt['classes'])} classes "
                             f"({one.ckpt['classes'][0]}, ...), not the {len(classes)} of "
                             f"{args.dataset} ({classes[0]}, ...)")
    test_loader = data.test_loader(test, args, args.batch_size, args.workers, args.clips,
                                   args.crops)
    labels = torch.tensor([y for _, y in test_loader.dataset.samples])
    for one in loaded:
        one.model.to(device).eval()
    if args.occlusion:  # its "none" mode is the test pass: top-1/5 come from it too
        g_net, k, g_source = occlusion_generator(args, loaded, device)
        # each rank its own random drops, and no two (--seed, rank) of a world size share them
        drops = drop_modes(g_net, k, args.seed * world + rank)
        per_ckpt, masks, index, skipped = occlusion(loaded, test_loader, labels, drops, args,
                                                    device, ctx)
    results = []
    lines = []  # per checkpoint, its table lines
    for i, one in enumerate(loaded):
        if one.kind != "finetune":  # frozen features: BN statistics re-estimated on training clips
            utils.estimate_bn_statistics(one.model, data.bn_loader(train, args, args.workers),
                                         device, ctx)
        result = {"checkpoint": one.path, "label": one.label, "kind": one.kind,
                  "input": one.input, "dataset": args.dataset, "split": args.split,
                  "clips": args.clips, "crops": args.crops, "n_videos": len(labels),
                  "bn_statistics": "checkpoint" if one.kind == "finetune" else "re-estimated"}
        if one.kind == "finetune" and args.occlusion:
            fields, line = classification(index, per_ckpt[i]["none"]["probs"], labels, skipped,
                                          args)
        elif one.kind == "finetune":
            fields, line = classify(one.model, test_loader, labels, args, device, ctx)
        else:
            gallery_loader = data.test_loader(train, args, args.batch_size, args.workers,
                                              args.clips, args.crops)
            fields, line = retrieval(one.model, test_loader, gallery_loader, labels, len(classes),
                                     args, device, ctx)
        result.update(fields)
        results.append(result)
        lines.append([line])

    extra = {}  # what belongs to all checkpoints together
    selection = None  # both figures draw the same videos
    written = [path for path in (args.figure, args.cam) if path]
    if (args.figure or args.cam) and rank == 0:
        selection = figure_selection(test_loader.dataset, args.figure_videos)
    if args.occlusion:
        for result, line, per_mode in zip(results, lines, per_ckpt):
            result.update(occlusion_fields(per_mode))
            line.append(f"occlusion, {k} of {args.frames} frames dropped: " + "  ".join(
                f"{m}: entropy {result[f'entropy_{m}']:.3f} top-1 {result[f'top1_{m}']:.3f}"
                for m in drops))
        extra["occlusion"] = dict(
            drop_frames=k, generator=g_source, videos=index.tolist(),
            labels=labels[index].tolist(),
            dropped_first_clip={m: [row.nonzero().flatten().tolist() for row in masks[m]]
                                for m in masks})
        if g_net is None:
            lines[0].append("(no generator: pass --gen-ckpt for the adversarial row)")
        if args.figure and rank == 0:
            left_out = draw_occlusion_figure(args.figure, loaded, per_ckpt, masks, index,
                                             selection, test_loader.dataset, classes)
            if left_out:  # decoded for the figure, then not in the pass: the run goes on
                lines[0].append(f"(--figure: {', '.join(left_out)} left out, not decoded in the "
                                "occlusion pass)")
            if len(left_out) == len(selection[0]):
                written.remove(args.figure)
            if args.clips * args.crops > 1:
                lines[0].append(f"(--figure: each strip shows its video's first clip and that "
                                f"clip's drops; H and the predictions are over all "
                                f"{args.clips * args.crops} clips)")
    if args.cam and rank == 0:
        r_motion = draw_cam_figure(args.cam, loaded, selection, test_loader.dataset, classes,
                                   device)
        for result in results:
            result["cam_motion_r"] = r_motion[result["label"]]

    out = results[0] if len(results) == 1 else {"checkpoints": results}
    out.update(extra)
    if device.type == "cuda":  # the whole run's peak, once
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if rank == 0:
        for one, line in zip(loaded, lines):
            print(f"{one.path} ({one.kind}) on {args.dataset} split {args.split}:")
            for text in line:
                print("  " + text)
        if len(loaded) > 1 and args.occlusion:
            print(paired_lines(results, drops))
        for path in written:
            print(f"wrote {path}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        print(json.dumps(out))
        sys.stdout.flush()
    utils.end_distributed()
    return out


def paired_lines(results, drops):
    """The top-1 each drop costs every checkpoint, against the first: on the same clips."""
    rows = []
    for mode in drops:
        if mode == "none":
            continue
        lost = [r[f"top1_lost_{mode}"] for r in results]
        rows.append(f"  top-1 lost to {mode} drops: " + ", ".join(
            f"{r['label']} {x:+.3f}" for r, x in zip(results, lost))
            + "; against the first: " + ", ".join(
            f"{r['label']} {x - lost[0]:+.3f}" for r, x in zip(results[1:], lost[1:])))
    return "same clips, same drops:\n" + "\n".join(rows)


if __name__ == "__main__":
    main()
