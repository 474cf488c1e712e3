"""The methods users compare VideoMoCo with, on the same encoders, data and scripts
(`pretrain.py --method cvrl|vclr`), and background erasing, a switch against the static-appearance
shortcut. models.py holds VideoMoCo itself.

    CVRL (Qian et al., CVPR 2021): temporally consistent spatial augmentation, two clips of a
        video at a distance drawn from a decreasing distribution, SimCLR's InfoNCE over the global
        batch.
    VCLR (Kuang et al., ICCV 2021): segment-level positives (tuples of one clip per segment), a
        video-level MoCo loss, temporal-order regularisation and, in its 3-D variant, a clip-level
        loss.
"""
import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models import (VideoMoCo, decayed_infonce, infonce_chance, is_distributed, pooled_features,
                    projection_head)


# -----------------------------------------------------------------------------
# temporal sampling of the positive pair (data.VideoClips): two clips d frames apart (CVRL), two
# tuples of one clip per segment (VCLR); VideoMoCo's pair is two views of the same clip

INTERVALS = ("linear", "quadratic", "uniform")


def interval_probs(max_distance, shape="linear"):
    """P(d), d = 0..max_distance, of the distance between the starts of CVRL's two clips (Qian et
    al., Sec 3.2: a monotonically decreasing distribution, so that distant clips, which may show
    different content, are rarer positives). linear: P(d) proportional to -d + c with c =
    max_distance + 1 (CVRL's choice); quadratic: (-d + c)^2; uniform: flat."""
    d = np.arange(max_distance + 1, dtype=np.float64)
    weight = {"linear": max_distance + 1 - d, "quadratic": (max_distance + 1 - d) ** 2,
              "uniform": np.ones_like(d)}[shape]
    return weight / weight.sum()


def cvrl_starts(rng, num_frames_video, span, shape="linear"):
    """Start frames of CVRL's two clips of `span` frames: distance d ~ interval_probs, the pair
    placed uniformly in the video, which clip comes first random."""
    last = max(num_frames_video - span, 0)
    d = int(rng.choice(last + 1, p=interval_probs(last, shape)))
    first = int(rng.integers(0, last - d + 1))
    pair = [first, first + d]
    return pair if rng.random() < 0.5 else pair[::-1]


def tuple_starts(rng, num_frames_video, span, segments):
    """VCLR's anchor and positive tuples (Kuang et al., Sec 3.2 and 5.3): the video is cut into
    `segments` equal parts and each tuple takes one clip per segment. As the official code draws two
    distinct frames per segment (`np.random.choice(segment, 2, replace=False)`), the anchor's and
    the positive's clips of a segment start at two distinct frames, drawn uniformly without
    replacement: among the starts whose clip lies inside the segment where there are two or more,
    else among the starts inside the segment whose clip stays in the video (it runs on into the
    next segment). Returns (anchor starts, positive starts, distinct); distinct is False when some
    segment offered a single start, which both clips then share."""
    bounds = np.linspace(0, num_frames_video, segments + 1)
    last = max(num_frames_video - span, 0)  # the last start whose clip ends in the video
    anchor, positive, distinct = [], [], True
    for j in range(segments):
        lo = int(math.ceil(bounds[j]))
        end = max(int(math.ceil(bounds[j + 1])), lo + 1)  # the next segment's first frame
        starts = range(lo, end - span + 1)  # clips inside the segment
        if len(starts) < 2:
            starts = range(lo, max(min(end - 1, last), lo) + 1)
        if len(starts) >= 2:
            a, p = rng.choice(len(starts), 2, replace=False)
        else:
            a = p = 0
            distinct = False
        anchor.append(starts[a])
        positive.append(starts[p])
    return anchor, positive, distinct


def order_shuffle(rng, segments):
    """With probability 0.5 a random permutation of a tuple's clips that is neither the identity nor
    its reverse, as the official code's `shuffle_list`, else the identity (VCLR Sec 3.3). Returns
    (permutation, shuffled)."""
    if segments < 3:
        raise ValueError(f"VCLR's order task needs at least 3 segments (a shuffle is neither the "
                         f"order nor its reverse), got {segments}")
    if rng.random() < 0.5:
        return list(range(segments)), False
    while True:
        perm = rng.permutation(segments).tolist()
        if perm != sorted(perm) and perm != sorted(perm, reverse=True):
            return perm, True


def background_erasing(x, p, weight=(0.1, 0.3), generator=None):
    """Background erasing (Wang et al., CVPR 2021, "Removing the background by adding the
    background"): with probability p per clip, a randomly chosen frame r of the same clip is mixed
    into every frame, x'_t = (1 - lam) x_t + lam x_r, lam ~ U(weight). The added component lam x_r
    is constant over time, so static appearance stops being a reliable cue for telling clips apart.
    x: (N, C, T, H, W). Returns (x', lam (N,), r (N,)); lam = 0 where the clip was left alone."""
    n, t = x.shape[0], x.shape[2]
    applied = torch.rand(n, generator=generator) < p
    lam = torch.empty(n).uniform_(*weight, generator=generator) * applied  # (N,)
    r = torch.randint(0, t, (n,), generator=generator)  # (N,)
    lam, r = lam.to(x.device, x.dtype), r.to(x.device)
    static = x[torch.arange(n, device=x.device), :, r]  # (N, C, H, W)
    lam5 = lam[:, None, None, None, None]
    return (1 - lam5) * x + lam5 * static[:, :, None], lam, r


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and hands each rank its own slice (the
    reduce-scatter that the gather's adjoint is)."""

    @staticmethod
    def forward(ctx, t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(t):
    """Concatenate `t` (N, D) from all processes along dim 0, in rank order, keeping the gradient:
    the backward sums each rank's gradient w.r.t. its slice and returns it to the owner, so every
    rank's loss reaches every rank's local embeddings. `t` itself in a world of one."""
    if not is_distributed():
        return t
    return _GatherWithGrad.apply(t)


def nt_xent(z1, z2, tau):
    """CVRL's (SimCLR's) InfoNCE over 2B views, B = N * world_size the global batch:
    for a view i with positive p(i) (the other clip of the same video),
    l_i = -log( exp(s_i,p(i) / tau) / sum_{j != i} exp(s_ij / tau) ), s = cosine similarity,
    the sum running over the other 2B - 1 views of the global batch (the positive and 2B - 2
    negatives). Returns (mean of l_i over the 2N local views, top-1 accuracy of the positive).

    z1, z2: (N, dim) projections of the two clips, normalised here. Every process must pass the same
    N (drop_last), since local row n is global row rank * N + n. Each process's loss is its share of
    the global mean: with gather_with_grad the gradient w.r.t. the local z is world_size times that
    of the global mean loss, and DistributedDataParallel's averaging divides it back, so the
    parameters get exactly the gradient of the global-batch loss. Computed in float32 even under
    autocast.
    """
    with torch.autocast(device_type=z1.device.type, enabled=False):
        n = z1.shape[0]
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        z_all = gather_with_grad(torch.cat([z1, z2], dim=1))  # (B, 2*dim): one all_gather for both
        b = z_all.shape[0]
        z_all = torch.cat(z_all.chunk(2, dim=1))  # (2B, dim): first views, then second views
        logits = torch.cat([z1, z2]) @ z_all.T / tau  # (2N, 2B)
        rank = dist.get_rank() if is_distributed() else 0
        own = rank * n + torch.arange(n, device=z1.device)  # (N,) global rows of the local clips
        self_index = torch.cat([own, own + b])  # (2N,)
        positive = torch.cat([own + b, own])  # (2N,)
        # a view is neither its own positive nor its own negative
        logits = logits.scatter(1, self_index[:, None], float("-inf"))
        loss = F.cross_entropy(logits, positive)
        acc = (logits.argmax(dim=1) == positive).float().mean().detach()
    return loss, acc


class CVRL(nn.Module):
    """CVRL (Qian et al., CVPR 2021): two clips of the same video are a positive pair, every other
    clip of the global batch a negative; the InfoNCE of SimCLR (`nt_xent`) with temperature T
    (CVRL's 0.1). No queue, no momentum encoder.

    The projection is CVRL's 3-layer MLP: encoder_q's `fc` (feature width -> hidden) is its first
    Linear, then BN, ReLU, Linear(hidden, hidden), BN, ReLU, Linear(hidden, dim). Downstream code
    keeps encoder_q without `fc`, as for VideoMoCo; `head` is dropped with everything else.
    Both clips go through the encoder in one batch (SimCLR concatenates its views the same way), so
    BN statistics span both views; `global_batchnorm` converts to SyncBatchNorm under DDP on CUDA,
    for CVRL's BN over the global batch.
    """

    def __init__(self, base_encoder, dim=128, hidden=2048, T=0.1):
        super().__init__()
        self.T = T
        self.encoder_q = base_encoder(num_classes=hidden)
        # see projection_head
        self.encoder_q.fc = projection_head(self.encoder_q.fc.in_features, hidden)
        self.head = nn.Sequential(
            nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, x1, x2):  # (N, 3, T, H, W) each, two clips of the same N videos
        n = x1.shape[0]
        z = self.head(self.encoder_q(torch.cat([x1, x2])))  # (2N, dim)
        loss, acc = nt_xent(z[:n], z[n:], self.T)
        return {"loss": loss, "acc": acc, "q": F.normalize(z[:n].detach().float(), dim=1)}


def tuple_embedding(pooled, head):
    """VCLR's video-level embedding of a tuple (Eq 4/5, the average as consensus), as the official
    code's `tsn_mode`: the pooled backbone features of the tuple's clips (N, S, F) are averaged,
    then projected by the head and L2-normalised -> (N, dim)."""
    return F.normalize(head(pooled.mean(dim=1)).float(), dim=1)


class VCLR(VideoMoCo):
    """VCLR (Kuang et al., ICCV 2021, "Video Contrastive Learning with Global Context"), the 3D-CNN
    variant of its Sec 5.3: a video is cut into `segments` segments and a tuple holds one clip per
    segment; two tuples of a video (their clips at distinct positions of each segment) are a
    positive pair.

    Loss = clip_weight * L_clip + L_v + order_weight * L_o, the paper's 3-D variant (Sec 5.3, Table
    8: the clip-level InfoNCE of its baseline plus the two losses of Sec 3):
      L_v, the video-level contrastive loss (Sec 3.2, Eq 4-6) in MoCo form: q is the embedding
        (`tuple_embedding`) of the anchor tuple from encoder_q, k that of the positive tuple from
        the momentum encoder with shuffle-BN; negatives from the queue (no decay).
      L_clip, clip-level InfoNCE in MoCo form: q is the embedding of the anchor's first clip (as
        the tuple is given, possibly shuffled) from encoder_q, k that of the positive tuple's clip
        of the same segment from the momentum encoder; negatives from a queue of clip-level keys
        of its own (`clip_queue`). clip_weight 0 gives the 2-D recipe's L_v + order_weight * L_o.
      L_o, the temporal order regularisation (Sec 3.3, Eq 7-10): the per-clip embeddings of the
        anchor tuple (encoder_q) and of the positive tuple (the momentum encoder, no gradient, as
        the official code feeds its key tuple), concatenated in the clip order given ->
        `order_head` (a linear classifier) -> 4 classes: 0 both tuples in order, 1 the first
        shuffled, 2 the second shuffled, 3 both shuffled. The data loader shuffles (into an order
        that is neither the identity nor its reverse); this module only classifies.
    As the official code (train_vclr.py, models/Contrast.py): tau 0.1 and K 131072 are
    pretrain.py's defaults for --method vclr. One deviation: the paper and the official code have a
    separate MLP head per loss; here encoder_q's `fc` serves all three, so that encoder_q is
    exported exactly as VideoMoCo's and only `order_head` is dropped downstream.
    encoder_q sees only the anchor's clips, and the keys come from encoder_k with shuffle-BN, so a
    query never shares BN statistics with its key.
    """

    def __init__(self, base_encoder, dim=128, K=131072, m=0.999, T=0.1, segments=3,
                 order_weight=1.0, shuffle_splits=2, mlp=True, clip_weight=1.0):
        super().__init__(base_encoder, dim, K, m, T, decay=1.0, decay_unit="key",
                         shuffle_splits=shuffle_splits, mlp=mlp)
        self.segments, self.order_weight, self.clip_weight = segments, order_weight, clip_weight
        self.order_head = nn.Linear(2 * segments * dim, 4)
        self.add_queue("clip_queue", dim)  # L_clip's negatives

    def forward(self, anchor, positive, order, segments=None):
        """anchor, positive: (N, S, 3, T, H, W) tuples, one clip per segment, possibly shuffled
        within the tuple; order: (N,) long, the order class of the pair (see the class docstring);
        segments: (N, 2, S) long, the segment of each clip of the anchor and of the positive as
        given (needed for L_clip; the data loader's "segments").

        Returns {"loss", "loss_nce" (L_v), "loss_order" (L_o), "loss_clip" (L_clip, or None),
        "acc" (top-1 of the positive key), "order_acc", "q", "k" (N, dim), "order_logits" (N, 4)}.
        As in VideoMoCo.forward, the momentum update and the enqueue happen only in training mode.
        """
        n, s = anchor.shape[:2]
        if s != self.segments or positive.shape[:2] != anchor.shape[:2]:
            raise ValueError(f"VCLR needs anchor, positive of shape (N, {self.segments}, 3, T, H, "
                             f"W), got {tuple(anchor.shape)} and {tuple(positive.shape)}")
        if self.clip_weight and (segments is None or tuple(segments.shape) != (n, 2, s)):
            raise ValueError(f"VCLR's clip-level loss needs segments of shape ({n}, 2, {s}) "
                             "(or clip_weight=0)")
        with pooled_features(self.encoder_q):
            pooled_q = self.encode_query(anchor.flatten(0, 1)).view(n, s, -1)  # (N, S, F)
        head_q = self.encoder_q.fc
        clip_q = F.normalize(head_q(pooled_q).float(), dim=2)  # (N, S, dim), per clip
        q = tuple_embedding(pooled_q, head_q)  # (N, dim)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            with pooled_features(self.encoder_k):
                pooled_k = self.encode_key(positive.flatten(0, 1)).view(n, s, -1)  # (N, S, F)
            head_k = self.encoder_k.fc
            clip_k = F.normalize(head_k(pooled_k).float(), dim=2)  # (N, S, dim)
            k = tuple_embedding(pooled_k, head_k)  # (N, dim)
        queue = self.queue.clone().detach()  # (dim, K), the negatives before this batch enters
        loss_nce, logits = decayed_infonce(q, k, queue, self.queue_age, self.T, 1.0,
                                           return_logits=True)

        # (N, 2*S*dim): the anchor's clips then the positive's, each in the order given (Eq 9)
        order_logits = self.order_head(torch.cat([clip_q, clip_k], dim=1).flatten(1)).float()
        loss_order = F.cross_entropy(order_logits, order)
        loss = loss_nce + self.order_weight * loss_order
        loss_clip = None
        if self.clip_weight:
            # L_clip: the anchor's first clip against the positive tuple's clip of the same segment
            # (N,) its position
            where = (segments[:, 1] == segments[:, 0, :1]).float().argmax(dim=1)
            k_clip = clip_k[torch.arange(n, device=where.device), where]  # (N, dim)
            loss_clip = decayed_infonce(clip_q[:, 0], k_clip, self.clip_queue.clone().detach(),
                                        self.clip_queue_age, self.T, 1.0)
            loss = loss + self.clip_weight * loss_clip

        acc = (logits.argmax(dim=1) == 0).float().mean().detach()
        order_acc = (order_logits.argmax(dim=1) == order).float().mean().detach()
        if self.training:
            self.dequeue_and_enqueue(k)
            if self.clip_weight:
                self.dequeue_and_enqueue(k_clip, "clip_queue")
        return {"loss": loss, "loss_nce": loss_nce, "loss_order": loss_order,
                "loss_clip": loss_clip, "acc": acc,
                "order_acc": order_acc, "q": q, "k": k, "order_logits": order_logits}


def contrastive_step(model, inputs, opt, autocast=contextlib.nullcontext(),
                     scaler=None, agree=None):
    """One step of CVRL or VCLR: model(*inputs) (CVRL: two clips; VCLR: two tuples, the order label
    and the segments), then the update by its loss, if agree(finite) (as models.videomoco_step).
    Returns the model's dict with "loss_d" (its loss), "loss_g" (None) and "updated"."""
    with autocast:
        out = model(*inputs)
    finite = bool(torch.isfinite(out["loss"]))
    out.update(loss_d=out["loss"], loss_g=None,
               updated=agree(finite) if agree is not None else finite)
    if out["updated"]:
        scaler = scaler if scaler is not None else torch.amp.GradScaler(out["loss"].device.type,
                                                                        enabled=False)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.step(opt)
        scaler.update()
    return out


def global_batchnorm(model, method, device, world, log):
    """CVRL normalises over the global batch (SyncBatchNorm, Qian et al. Sec 4.1). PyTorch's
    SyncBatchNorm runs on GPUs only: on CPU (gloo) each process keeps normalising its own batch, and
    the run says so. MoCo-style methods keep per-process BN: shuffle-BN needs it."""
    if method != "cvrl" or world == 1:
        return model
    if device.type != "cuda":
        log(f"cvrl on {world} CPU processes: BN statistics per process (SyncBatchNorm needs CUDA)")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def chance_level(method, model, batch_size, decay):
    """The loss of collapsed features, for pretrain.py's log: ln of the 2B - 1 candidates of CVRL,
    the queue's for the others (ln(1 + sum t^i), Eq 6; ln(K+1) without decay)."""
    if method == "cvrl":
        return math.log(2 * batch_size - 1)
    return infonce_chance(model.queue_age, model.decay if method == "vclr" else decay)


def add_method_args(p):
    """pretrain.py's flags for the comparison methods and the shortcut switch; each names its
    method."""
    p.add_argument("--cvrl-t", type=float, default=0.1,
                   help="CVRL: InfoNCE temperature (CVRL: 0.1)")
    p.add_argument("--cvrl-hidden", type=int, default=2048, help="CVRL: width of its MLP head")
    p.add_argument("--cvrl-interval", default="linear", choices=INTERVALS,
                   help="CVRL: distribution of the distance between its two clips")
    p.add_argument("--segments", type=int, default=3, help="VCLR: segments per video (VCLR: 3)")
    p.add_argument("--order-weight", type=float, default=1.0, help="VCLR: weight of L_o")
    p.add_argument("--clip-weight", type=float, default=1.0,
                   help="VCLR: weight of L_clip (0: 2-D recipe)")
    # against the static-appearance shortcut
    p.add_argument("--background-erasing", type=float, default=0.0,
                   help="P(a random frame of the query clip is mixed into all its frames)")
    p.add_argument("--be-weight", type=float, nargs=2, default=(0.1, 0.3), metavar=("LOW", "HIGH"),
                   help="range of the background-erasing weight")
