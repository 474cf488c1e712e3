"""The methods VideoMoCo is compared with on the same encoders, data and scripts (`pretrain.py
--method cvrl|vclr`), and background erasing against the static-appearance shortcut. CVRL (Qian et
al., CVPR 2021): two clips of a video at a distance from a decreasing distribution, SimCLR's loss
over the global batch. VCLR (Kuang et al., ICCV 2021): tuples of one clip per segment as positives,
a video-level MoCo loss, temporal-order regularisation and, in its 3-D variant, a clip-level loss.
"""
import math
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import PairMaker
from models import (VideoMoCo, concat_all_gather, decayed_infonce, forward_output, infonce_chance,
                    is_distributed, pooled_features, projection_head)


# -----------------------------------------------------------------------------
# the positive pairs, for data.VideoClips: two clips d frames apart (CVRL), two tuples of one clip
# per segment (VCLR); VideoMoCo's is data.SameClip, two views of one clip

INTERVALS = ("linear", "quadratic", "uniform")


def interval_probs(max_distance, shape="linear"):
    """P(d), d = 0..max_distance, of the distance between CVRL's two clips (Sec 3.2: decreasing, so
    distant clips are rarer positives): linear (CVRL's) -d + c, c = max_distance + 1; quadratic
    (-d + c)^2; uniform."""
    d = np.arange(max_distance + 1, dtype=np.float64)
    weight = {"linear": max_distance + 1 - d, "quadratic": (max_distance + 1 - d) ** 2,
              "uniform": np.ones_like(d)}[shape]
    return weight / weight.sum()


def cvrl_starts(rng, num_frames_video, span, shape="linear"):
    """CVRL's two clip starts: distance d ~ interval_probs, placed uniformly, in random order."""
    last = max(num_frames_video - span, 0)
    d = int(rng.choice(last + 1, p=interval_probs(last, shape)))
    first = int(rng.integers(0, last - d + 1))
    pair = [first, first + d]
    return pair if rng.random() < 0.5 else pair[::-1]


class CVRLPair(PairMaker):
    """CVRL's positive pair, for data.VideoClips: two clips of a video whose starts are d ~
    interval_probs(`interval`) apart, each with its own augmentation -> "video": (2, 3, T, H, W)."""
    def __init__(self, interval="linear"):
        self.interval = interval

    def starts(self, rng, num_frames, span):
        return cvrl_starts(rng, num_frames, span, self.interval)

    def samples(self, clips, rng, augment):
        return [augment(clips, rng)]


def tuple_starts(rng, num_frames_video, span, segments):
    """VCLR's anchor and positive tuples (Sec 3.2, 5.3): one clip per segment of `segments` equal
    parts, the two clips of a segment at distinct starts drawn without replacement, as the official
    code's `np.random.choice(segment, 2, replace=False)`: among the starts whose clip fits in the
    segment where two do, else among the segment's starts whose clip stays in the video. Returns
    (anchor, positive, distinct); distinct is False where a segment offered one start only."""
    bounds = np.linspace(0, num_frames_video, segments + 1)
    last = max(num_frames_video - span, 0)  # the last start whose clip ends in the video
    anchor = []
    positive = []
    distinct = True
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
    """With probability 0.5 a random order of a tuple's clips that is neither the identity nor its
    reverse (the official `shuffle_list`), else the identity (Sec 3.3). -> (order, shuffled)."""
    if segments < 3:
        raise ValueError(f"VCLR's order task needs at least 3 segments (a shuffle is neither the "
                         f"order nor its reverse), got {segments}")
    if rng.random() < 0.5:
        return list(range(segments)), False
    while True:
        perm = rng.permutation(segments).tolist()
        if perm != sorted(perm) and perm != sorted(perm, reverse=True):
            return perm, True


class VCLRTuples(PairMaker):
    """VCLR's positive pair, for data.VideoClips: two tuples (tuple_starts), one augmentation per
    tuple, each shuffled with probability 0.5 -> "video" (2, S, 3, T, H, W), "order" (0 both in
    order, 1 the first shuffled, 2 the second, 3 both), "segments" (2, S), each clip's segment."""
    def __init__(self, segments=3):
        self.segments = segments
        self.warned = False

    def starts(self, rng, num_frames, span):
        anchor, positive, distinct = tuple_starts(rng, num_frames, span, self.segments)
        if not distinct and not self.warned:
            self.warned = True  # once per loader process
            print(f"warning: a video of {num_frames} frames has a segment too short for two clip "
                  "positions: its VCLR anchor and positive clips coincide there", file=sys.stderr,
                  flush=True)
        return anchor + positive

    def samples(self, clips, rng, augment):
        s = self.segments
        frames = clips.shape[1]
        tuples = []
        params = []
        shuffled = []
        segments = []
        for clips_of_tuple in (clips[:s], clips[s:]):
            # one augmentation for the whole tuple: its clips side by side in time
            t, extra = augment([np.concatenate(clips_of_tuple)], rng)
            if extra:  # uint8 (1, S*T, crop, crop, 3) -> (S, T, crop, crop, 3)
                t = t.view(s, frames, *t.shape[2:])
                params.append(extra["aug"][0])
            else:  # float (1, 3, S*T, crop, crop) -> (S, 3, T, crop, crop)
                t = t.view(3, s, frames, *t.shape[3:]).transpose(0, 1)
            perm, was_shuffled = order_shuffle(rng, s)
            tuples.append(t[perm])
            shuffled.append(was_shuffled)
            segments.append(perm)  # position j of the tuple holds the clip of segment perm[j]
        extra = {"aug": torch.stack(params)} if params else {}
        extra["order"] = int(shuffled[0]) + 2 * int(shuffled[1])
        extra["segments"] = torch.tensor(segments)  # (2, S)
        return [(torch.stack(tuples), extra)]


def background_erasing(x, p, weight=(0.1, 0.3), generator=None):
    """Background erasing (Wang et al., CVPR 2021): with probability p per clip (N, C, T, H, W) a
    random frame r of it is mixed into every frame, x'_t = (1 - lam) x_t + lam x_r, lam ~
    U(weight): a static component, so appearance stops telling clips apart. -> (x', lam, r)."""
    n = x.shape[0]
    t = x.shape[2]
    applied = torch.rand(n, generator=generator) < p
    lam = torch.empty(n).uniform_(*weight, generator=generator) * applied  # (N,)
    lam = lam.to(x.device, x.dtype)
    r = torch.randint(0, t, (n,), generator=generator).to(x.device)  # (N,)
    static = x[torch.arange(n, device=x.device), :, r]  # (N, C, H, W)
    lam5 = lam[:, None, None, None, None]
    return (1 - lam5) * x + lam5 * static[:, :, None], lam, r


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and hands each rank its own slice (the
    reduce-scatter that the gather's adjoint is)."""

    @staticmethod
    def forward(ctx, t):
        return concat_all_gather(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(t):
    """`t` (N, D) of all processes in rank order, with gradient: every rank's loss reaches every
    rank's rows. `t` itself in a world of one."""
    if not is_distributed():
        return t
    return _GatherWithGrad.apply(t)


def nt_xent(z1, z2, tau):
    """CVRL's (SimCLR's) InfoNCE over the 2B views of the global batch: for view i with positive
    p(i), l_i = -log( exp(s_i,p(i) / tau) / sum_{j != i} exp(s_ij / tau) ), s the cosine. Returns
    (mean l_i over the 2N local views, top-1 of the positive); z1, z2 (N, dim), the same N on
    every process. Through gather_with_grad the local gradient is world x the global mean's, which
    DDP's averaging divides back: exactly the global-batch gradient. float32 under autocast."""
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
    """CVRL: two clips of a video are positives, the rest of the global batch negatives, SimCLR's
    loss (`nt_xent`, tau 0.1); no queue, no momentum encoder. CVRL's 3-layer MLP: encoder_q's `fc`
    (features -> hidden), then `head` (BN, ReLU, Linear, BN, ReLU, Linear), dropped downstream. Both
    clips are one BN batch; `global_batchnorm` makes it global under DDP on CUDA."""

    def __init__(self, base_encoder, dim=128, hidden=2048, tau=0.1):
        super().__init__()
        self.tau = tau
        self.encoder_q = base_encoder(num_classes=hidden)
        # see projection_head
        self.encoder_q.fc = projection_head(self.encoder_q.fc.in_features, hidden)
        self.head = nn.Sequential(
            nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, x1, x2):  # (N, 3, T, H, W) each, two clips of the same N videos
        n = x1.shape[0]
        z = self.head(self.encoder_q(torch.cat([x1, x2])))  # (2N, dim)
        loss, acc = nt_xent(z[:n], z[n:], self.tau)
        return forward_output(loss, acc, F.normalize(z[:n].detach().float(), dim=1))


def tuple_embedding(pooled, head):
    """VCLR's tuple embedding (Eq 4/5, the average as consensus) as the official `tsn_mode`: the
    pooled features of its clips (N, S, F) averaged, projected by `head`, normalised."""
    return F.normalize(head(pooled.mean(dim=1)).float(), dim=1)


class VCLR(VideoMoCo):
    """VCLR (Kuang et al., ICCV 2021), the 3D-CNN variant of Sec 5.3: two tuples of one clip per
    segment are a positive pair. Loss = clip_weight * L_clip + L_v + order_weight * L_o:
      L_v (Sec 3.2, Eq 4-6), MoCo form: the anchor tuple's embedding (`tuple_embedding`) from
        encoder_q against the positive tuple's from the momentum encoder, the queue's negatives.
      L_clip: the anchor's first clip against the positive's clip of the same segment, with a
        queue of its own (`clip_queue`); clip_weight 0 is the 2-D recipe.
      L_o (Sec 3.3, Eq 7-10): the per-clip embeddings of the anchor (encoder_q) and of the positive
        (the momentum encoder, no gradient, as the official code), in the order given ->
        `order_head` -> 4 classes (0 both in order, 1 the first shuffled, 2 the second, 3 both).
    As the official code, tau 0.1 and K 131072 (pretrain.py's defaults for --method vclr). One
    deviation: the paper has a head per loss; here encoder_q's `fc` serves all three, so encoder_q
    is exported as VideoMoCo's. Queries never share BN statistics with their keys."""

    def __init__(self, base_encoder, dim=128, K=131072, m=0.999, tau=0.1, segments=3,
                 order_weight=1.0, shuffle_splits=2, mlp=True, clip_weight=1.0):
        super().__init__(base_encoder, dim, K, m, tau, 1.0, shuffle_splits, mlp)
        self.segments = segments
        self.order_weight = order_weight
        self.clip_weight = clip_weight
        self.order_head = nn.Linear(2 * segments * dim, 4)
        self.add_queue("clip_queue", dim)  # L_clip's negatives

    def forward(self, anchor, positive, order, segments=None):
        """anchor, positive (N, S, 3, T, H, W) tuples as given (maybe shuffled); order (N,) their
        order class; segments (N, 2, S), each clip's segment (for L_clip). Returns
        models.forward_output's dict: loss_d the weighted sum, loss_nce L_v, and "loss_order",
        "loss_clip", "order_acc", "order_logits"; the momentum update and the enqueue only in
        training mode."""
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
        loss_nce, logits = decayed_infonce(q, k, queue, self.queue_age, self.tau, 1.0,
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
                                        self.clip_queue_age, self.tau, 1.0)
            loss = loss + self.clip_weight * loss_clip

        acc = (logits.argmax(dim=1) == 0).float().mean().detach()
        order_acc = (order_logits.argmax(dim=1) == order).float().mean().detach()
        if self.training:
            self.dequeue_and_enqueue(k)
            if self.clip_weight:
                self.dequeue_and_enqueue(k_clip, "clip_queue")
        return forward_output(loss, acc, q, k, loss_nce=loss_nce, loss_order=loss_order,
                              loss_clip=loss_clip, order_acc=order_acc, order_logits=order_logits)


def global_batchnorm(model, method, device, world, log):
    """CVRL normalises over the global batch (SyncBatchNorm, Sec 4.1), which needs CUDA: on CPU
    (gloo) each process keeps its own, and says so. MoCo-style methods need per-process BN."""
    if method != "cvrl" or world == 1:
        return model
    if device.type != "cuda":
        log(f"cvrl on {world} CPU processes: BN statistics per process (SyncBatchNorm needs CUDA)")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def chance_level(method, model, batch_size, decay):
    """The loss of collapsed features: ln(2B - 1) for CVRL, else the queue's (Eq 6; ln(K+1))."""
    if method == "cvrl":
        return math.log(2 * batch_size - 1)
    return infonce_chance(model.queue_age, model.decay if method == "vclr" else decay)
