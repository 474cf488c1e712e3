"""VideoMoCo (Pan et al., CVPR 2021): the encoders (the discriminator D), the ConvLSTM generator G
and its frame dropping (Eq 3), the VideoMoCo wrapper (Eq 2, the queue and the ages of Eq 6), the
losses (Eq 1/5/6 and Eq 4) and the routed backward. It imports only torch and torchvision, so it can
be copied alone; pretrain.py's train_step is the whole step, in the paper's order.

Gradient routing in the adversarial phase, as Eq 4-6 say (the authors' code differs, see README):
  - D (encoder_q) is trained only by the decayed contrastive loss, Eq 5/6 (`loss_d`).
  - G is trained only by Eq 4 (`loss_g`, the negated L1 distance, minimised).
  One forward of D on x_query serves both losses. G's output `x_query` is detached into
  `x_query_in` before it enters D, so `loss_d.backward()` stops at D's input; G's gradient is
  taken as an input-only gradient of `loss_g` through D (`torch.autograd.grad` w.r.t.
  `x_query_in`, which leaves D's `.grad` untouched and fires no DistributedDataParallel hooks) and
  pushed into G with `x_query.backward(grad_in)`. See `adversarial_backward`.

The step, as MoCo's paper gives its Algorithm 1 (pretrain.train_step is this, with AMP, DDP and the
non-finite guard; a test runs this block with models.py alone in a folder):

    import torch, torchvision
    import models
    torch.manual_seed(0)
    model = models.VideoMoCo(torchvision.models.video.r2plus1d_18, dim=16, K=32, m=0.99)
    generator = models.ConvLSTMGenerator(3, 16, 8)
    opt_d = torch.optim.SGD(model.encoder_q.parameters(), 0.02, momentum=0.9, weight_decay=1e-4)
    opt_g = torch.optim.SGD(generator.parameters(), 0.02, momentum=0.9)
    x = torch.randn(4, 3, 8, 32, 32)  # a clip; x_key: another augmentation of it
    x_key = x + 0.1 * torch.randn_like(x)
    # D alone, MoCo's step (Eq 1; Eq 2, the keys, the queue inside forward)
    out_moco = model(x, x_key)
    opt_d.zero_grad()
    out_moco["loss_d"].backward()
    opt_d.step()
    # the adversarial step: G drops the k most important frames (Eq 3), D minimises Eq 5/6 with
    # x_query as the query, G maximises Eq 4; each player is updated by its own loss
    x_query, _ = models.drop_frames(x, generator(x), 2)
    x_query_in = x_query.detach().requires_grad_()  # D's input: loss_d's backward stops here
    out = model(x_query_in, x_key, adversarial=True, x_full=x, decay=0.99999)
    opt_d.zero_grad()
    opt_g.zero_grad()
    models.adversarial_backward(out["loss_d"], out["loss_g"], x_query, x_query_in,
                                model.encoder_q.parameters())
    opt_d.step()
    opt_g.step()
"""
import contextlib
import copy
import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import video as tv_video
from torchvision.models.video.resnet import (BasicBlock, BasicStem, Conv2Plus1D, Conv3DSimple,
                                             R2Plus1dStem, VideoResNet)

# -----------------------------------------------------------------------------
# Encoders (D). Convention of MoCo v1's builder: `build_encoder(arch, num_classes=dim)` maps
# (N, 3, T, H, W) to (N, dim) and its last layer is the nn.Linear `fc` (the projection head), so
# `enc.fc.in_features` is the feature width and `enc.fc = nn.Identity()` gives pooled features.

ARCHS = ("tiny", "r3d_10", "r2plus1d_10", "r3d_18", "r2plus1d_18", "mc3_18")

# Parameters without fc (count_parameters): r3d_10 14.36M (Table 3: 14.4M), r2plus1d_10 12.49M
# (Table 3: 14.4M; torchvision's (2+1)D blocks are lighter than VCOP's), r3d_18 33.17M, r2plus1d_18
# 31.30M, mc3_18 11.49M, tiny 0.29M.


def count_parameters(module):
    """Number of parameters of `module` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


class TinyEncoder(nn.Module):
    """A small 3D CNN for the CPU demo and the tests: four strided conv3d+BN+ReLU stages
    (16-32-64-128 channels), global average pool, `fc`."""

    def __init__(self, num_classes, widths=(16, 32, 64, 128)):
        super().__init__()
        layers = []
        c_in = 3
        for i, c_out in enumerate(widths):
            stride = (1, 2, 2) if i == 0 else 2  # keep the time axis at full length in the stem
            layers += [nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x):  # (N, 3, T, H, W)
        x = self.avgpool(self.features(x)).flatten(1)  # (N, 128)
        return self.fc(x)  # (N, num_classes)


def _init_weights(model):
    # the same initialisation torchvision's VideoResNet uses
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


INPUTS = ("rgb", "residual")


def residual_frames(x):
    """Residual frames (Tao et al. 2020, "Rethinking motion representation: residual frames with
    3D ConvNets"): d_t = x_{t+1} - x_t of the augmented, normalised clip (N, C, T, H, W). The clip
    keeps its T frames: the last one repeats the last difference. Static appearance (background,
    colours) cancels; what moves remains."""
    d = x[:, :, 1:] - x[:, :, :-1]  # (N, C, T-1, H, W)
    return torch.cat([d, d[:, :, -1:]], dim=2)


def _residual_input(module, args):
    return (residual_frames(args[0]),) + tuple(args[1:])


def build_encoder(arch, num_classes, input="rgb"):
    """The encoder D (theta_q): (N, 3, T, H, W) -> (N, num_classes), last layer `fc`. r3d_10 and
    r2plus1d_10 are torchvision's VideoResNet with one block per stage, so state dicts load into
    torchvision's classes: the nets of Table 3's 14.4M rows as we read them (r3d_10 has 14.36M
    parameters, r2plus1d_10 12.49M; see the counts above). input="residual": a parameter-free
    forward pre-hook turns every clip into residual frames (the mode is recorded in checkpoints)."""
    if arch in ("r3d_18", "r2plus1d_18", "mc3_18"):
        encoder = getattr(tv_video, arch)(weights=None, num_classes=num_classes)
    elif arch == "r3d_10":
        encoder = VideoResNet(BasicBlock, [Conv3DSimple] * 4, [1, 1, 1, 1], BasicStem,
                              num_classes=num_classes)
    elif arch == "r2plus1d_10":
        encoder = VideoResNet(BasicBlock, [Conv2Plus1D] * 4, [1, 1, 1, 1], R2Plus1dStem,
                              num_classes=num_classes)
    elif arch == "tiny":
        encoder = TinyEncoder(num_classes)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if input not in INPUTS:
        raise ValueError(f"unknown input {input!r}; expected one of {', '.join(INPUTS)}")
    if input == "residual":
        encoder.register_forward_pre_hook(_residual_input)
    encoder.input_mode = input
    return encoder


@contextlib.contextmanager
def pooled_features(encoder):
    """Inside the block encoder(x) gives the pooled backbone features, the input of the head `fc`
    (N, fc.in_features), rather than the head's output."""
    head, encoder.fc = encoder.fc, nn.Identity()
    try:
        yield encoder
    finally:
        encoder.fc = head


def encoder_builder(arch, input="rgb"):
    """MoCo's `base_encoder` for an arch of ARCHS: a callable num_classes -> encoder, e.g.
    VideoMoCo(encoder_builder("r2plus1d_10"), ...). Any torchvision video model class
    (torchvision.models.video.r2plus1d_18) is one too."""
    return functools.partial(build_encoder, arch, input=input)


def projection_head(in_features, dim, mlp=False):
    """Pooled features -> the embedding: MoCo v1's linear layer or MoCo v2's MLP (--mlp).
    nn.Linear's default init, not the normal(0, 0.01) of torchvision's video classifiers: on an
    L2-normalised output a step turns W by lr / |W|^2, 6-25x more with the small init, and the
    shared mean of pooled post-ReLU features then collapses the embeddings (RESULTS.md, "Why the
    pretraining did not learn")."""
    if mlp:
        return nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(inplace=True),
                             nn.Linear(in_features, dim))
    return nn.Linear(in_features, dim)


# -----------------------------------------------------------------------------
# Generator G (Eq 3): frame importance from a ConvLSTM, and the temporal dropout it drives.

class ConvLSTMGenerator(nn.Module):
    """G of Eq 3, the importance of each frame, (N, C, T, H, W) -> (N, T): per-frame 2D convs
    (stride 2, BN, ReLU; width, 2, 4, 4 x width channels), pooled to a vector per frame, an LSTM
    over time (`hidden` units, the paper's 256), a linear score per frame. Any T, H, W."""

    def __init__(self, in_channels=3, hidden=256, width=16):
        super().__init__()
        layers = []
        c_in = in_channels
        for c_out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.frame_features = nn.Sequential(*layers)
        self.lstm = nn.LSTM(input_size=c_in, hidden_size=hidden, batch_first=True)
        self.score = nn.Linear(hidden, 1)

    def forward(self, x):  # (N, C, T, H, W)
        n, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)  # (N*T, C, H, W)
        features = self.frame_features(frames).mean(dim=(2, 3))  # (N*T, 4*width)
        hidden, _ = self.lstm(features.view(n, t, -1))  # (N, T, hidden)
        return self.score(hidden).squeeze(-1)  # (N, T) importance


def _apply_frame_mask(x, mask):
    # Dropped frames become zeros. The clips are normalised (mean subtracted, divided by std), so
    # zero is the dataset's mean colour: the frame's content is removed while the clip keeps its
    # shape (N, C, T, H, W), as Eq 3 asks ("the feature map size of x_query is the same as x").
    return x * (1 - mask.to(x.dtype))[:, None, :, None, None]


def drop_frames(x, importance, k, temperature=1.0):
    """Eq 3, x_query = G(x) (x) x: the k frames of highest importance (N, T) of each clip x
    (N, C, T, H, W) dropped. Returns (x_query, mask (N, T), 1 = dropped).

    The selection is discrete, so G's gradient is straight-through: the forward is the hard top-k
    mask, the backward that of sigmoid((importance - thr) / temperature), thr midway between the
    k-th and (k+1)-th importance. mask = hard + (soft - soft.detach()) keeps the forward exactly 0
    or 1. Against a fixed D, G so learns to drop the frames that move D most (a test checks it)."""
    n, t = importance.shape
    if not 0 <= k < t:
        raise ValueError(f"drop_frames needs 0 <= k < T, got k={k}, T={t}")
    if k == 0:
        return x, torch.zeros(n, t, device=x.device)
    importance = importance.float()
    top_values, top_index = importance.topk(k + 1, dim=1)  # (N, k+1), descending
    thr = (top_values[:, k - 1] + top_values[:, k]).detach()[:, None] / 2  # (N, 1)
    hard = torch.zeros_like(importance).scatter_(1, top_index[:, :k], 1.0)  # (N, T)
    soft = torch.sigmoid((importance - thr) / temperature)  # (N, T)
    mask = hard + (soft - soft.detach())
    return _apply_frame_mask(x, mask), mask


def pixel_motion(x):
    """Each pixel's motion (N, T, H, W): its mean absolute difference, over channels, to the same
    pixel in the neighbouring frames (one neighbour at either end of the clip); x
    (N, C, T, H, W)."""
    diff = (x[:, :, 1:].float() - x[:, :, :-1].float()).abs().mean(dim=1)  # (N, T-1, H, W)
    pad = torch.zeros_like(diff[:, :1])
    total = torch.cat([pad, diff], dim=1) + torch.cat([diff, pad], dim=1)  # (N, T, H, W)
    neighbours = torch.full((x.shape[2],), 2.0, device=x.device)
    neighbours[0] = neighbours[-1] = 1
    return total / neighbours[:, None, None]


def frame_motion(x):
    """Each frame's motion (N, T): pixel_motion averaged over the frame's pixels, i.e. its mean
    absolute difference to its neighbours over channels and pixels; x (N, C, T, H, W)."""
    return pixel_motion(x).mean(dim=(2, 3))


def random_drop(x, k, generator=None):
    """Table 1's "random dropout": k random frames per clip dropped as in `drop_frames`."""
    n = x.shape[0]
    t = x.shape[2]
    if not 0 <= k < t:
        raise ValueError(f"random_drop needs 0 <= k < T, got k={k}, T={t}")
    device = x.device if generator is None else generator.device
    order = torch.rand(n, t, generator=generator, device=device).argsort(dim=1).to(x.device)
    mask = torch.zeros(n, t, device=x.device).scatter_(1, order[:, :k], 1.0)  # (N, T)
    return _apply_frame_mask(x, mask), mask


# -----------------------------------------------------------------------------
# The VideoMoCo wrapper: query encoder D, momentum encoder (Eq 2), the queue and its ages (Eq 6).

def is_distributed():
    """The project's one answer to "am I distributed?": a process group of more than one process
    (a group of one, as DDP on one GPU forms, is a world of one). Every file asks it here but
    data.py, which is copied alone and reads its rank and world itself (data._rank_world)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def concat_all_gather(t):
    """Concatenate `t` from all processes along dim 0 (no gradient); `t` in a world of one."""
    if not is_distributed():
        return t
    with torch.no_grad():
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, t.contiguous())
        return torch.cat(gathered, dim=0)


def momentum_update_(params_k, params_q, m):
    """Eq 2, in place: theta_k <- m * theta_k + (1 - m) * theta_q (two fused multi-tensor ops)."""
    params_k = list(params_k)
    with torch.no_grad():
        torch._foreach_mul_(params_k, m)
        torch._foreach_add_(params_k, [p.detach() for p in params_q], alpha=1 - m)


class VideoMoCo(nn.Module):
    """MoCo with temporal decay (Eq 6) for video: D = encoder_q (theta_q), encoder_k (Eq 2).
    Buffers (in the state dict): queue (dim, K), unit keys, FIFO at queue_ptr (1,), the slot of the
    oldest; queue_age (K,), the age i of t^i in Eq 6 counted in keys, newest 1, the oldest of a
    full queue K (0.99999^65536 = 0.52, Sec 4.3.2). The initial keys are aged K - j by slot."""

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, tau=0.07, decay=0.99999,
                 shuffle_splits=2, mlp=True):
        super().__init__()
        if not 0 < decay <= 1:
            raise ValueError(f"decay t of Eq 6 must be in (0, 1], got {decay}")
        self.K = K
        self.m = m
        self.tau = tau
        self.decay = decay
        self.shuffle_splits = shuffle_splits

        self.encoder_q = base_encoder(num_classes=dim)  # as MoCo's builder; its last layer is `fc`
        self.encoder_q.fc = projection_head(self.encoder_q.fc.in_features, dim, mlp)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # (the input hook is copied with it)
        for param in self.encoder_k.parameters():
            param.requires_grad = False

        self.add_queue("queue", dim)

    def add_queue(self, name, dim):
        """Buffers NAME, NAME_ptr, NAME_age as the class docstring says (VCLR has two queues)."""
        self.register_buffer(name, F.normalize(torch.randn(dim, self.K), dim=0))
        self.register_buffer(name + "_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer(name + "_age", torch.arange(self.K, 0, -1, dtype=torch.long))

    def momentum_update(self):
        """Eq 2 on the parameters, as MoCo (encoder_k's BN statistics are its own, never read)."""
        momentum_update_(self.encoder_k.parameters(), self.encoder_q.parameters(), self.m)

    def encode_query(self, x_query):
        """encoder_q on the queries (N, dim). MoCo normalises each process's queries with that
        process's BN statistics; in a world of one `shuffle_splits` processes are emulated (MoCo's
        SplitBatchNorm demo): contiguous sub-batches here, shuffled ones in `encode_key`."""
        if is_distributed() or not self.training or self.shuffle_splits <= 1:
            return self.encoder_q(x_query)
        chunks = torch.tensor_split(x_query, min(self.shuffle_splits, x_query.shape[0]))
        return torch.cat([self.encoder_q(chunk) for chunk in chunks])

    def encode_key(self, x_key):
        """encoder_k on the keys (N, dim) with MoCo's shuffle-BN: the global batch shuffled by rank
        0's permutation, each process forwarding a shard (emulated in `shuffle_splits` sub-batches
        in a world of one), the order restored; every process passes the same N."""
        with torch.no_grad():
            if is_distributed():
                n_local = x_key.shape[0]
                device = x_key.device.type
                if torch.is_autocast_enabled(device) and getattr(self.encoder_k, "input_mode",
                                                                 "rgb") == "rgb":
                    # the clips travel in the dtype the first conv casts them to anyway: half the
                    # bytes
                    x_key = x_key.to(torch.get_autocast_dtype(device))
                x_all = concat_all_gather(x_key)  # (N_global, C, T, H, W)
                perm = torch.randperm(x_all.shape[0], device=x_key.device)
                dist.broadcast(perm, src=0)
                rank = dist.get_rank()
                local = perm.view(-1, n_local)[rank]
                k_all = concat_all_gather(self.encoder_k(x_all[local]))  # (N_global, dim), shuffled
                unshuffle = perm.argsort()
                return k_all[unshuffle.view(-1, n_local)[rank]]
            n = x_key.shape[0]
            perm = torch.randperm(n, device=x_key.device)
            chunks = torch.tensor_split(x_key[perm], min(self.shuffle_splits, n))
            k = torch.cat([self.encoder_k(chunk) for chunk in chunks])  # (N, dim), shuffled
            return k[perm.argsort()]

    def dequeue_and_enqueue(self, keys, name="queue"):
        """FIFO update with the keys of all processes in rank order, as if enqueued one at a time
        (any K and batch); ages as in the class docstring."""
        with torch.no_grad():
            queue = getattr(self, name)
            queue_ptr = getattr(self, name + "_ptr")
            queue_age = getattr(self, name + "_age")
            keys = concat_all_gather(keys)  # (B, dim)
            batch = keys.shape[0]
            kept = min(batch, self.K)
            slots = (queue_ptr + torch.arange(batch - kept, batch, device=keys.device)) % self.K
            # a diverged key encoder must not poison the queue: non-finite keys leave it as it was
            # (the same on every rank; decided on the device, without a host sync)
            finite = torch.isfinite(keys).all()
            new = keys[batch - kept:].T.to(queue.dtype)  # (dim, kept)
            queue[:, slots] = torch.where(finite, new, queue[:, slots])
            queue_age += batch * finite
            queue_age[slots] = torch.where(finite, torch.arange(kept, 0, -1, device=keys.device),
                                           queue_age[slots])
            queue_ptr.add_(batch * finite).remainder_(self.K)

    def forward(self, x_query, x_key, *, decay=None, adversarial=False, x_full=None):
        """One step's forward, in MoCo's order: the queries, Eq 2, the keys, the scores against the
        queue as it was (Eq 5/6; decay is t, default self.decay, 1 gives Eq 1), Eq 4 when
        adversarial (x_full: the clip before G's drop), then the enqueue. x_query: the query clip
        (G's output in the adversarial phase, Eq 3), x_key: the other view. Returns
        `forward_output`'s dict. Eq 2 and the enqueue only in training mode."""
        if adversarial and x_full is None:
            raise ValueError("the adversarial forward needs x_full, the clip before the drop")
        q = F.normalize(self.encode_query(x_query), dim=1)  # (N, dim)
        with torch.no_grad():
            if self.training:
                self.momentum_update()  # Eq 2, before the key forward
            k = F.normalize(self.encode_key(x_key), dim=1)  # (N, dim)
        loss_d, acc = self.contrast(q, k, self.decay if decay is None else decay)
        loss_g = q_full = None
        if adversarial:
            loss_g, q_full = self.adversary_loss(q, x_full)
        if self.training:
            self.dequeue_and_enqueue(k)  # after the scores: they saw the queue as it was
        return forward_output(loss_d, acc, q, k, loss_g=loss_g, q_full=q_full)

    def contrast(self, q, k, decay):
        """Eq 5/6 (Eq 1 for decay 1) of the queries against their keys and the queue as it is
        now, before this batch enters; returns (loss, top-1 of the positive, a tensor)."""
        queue = self.queue.clone().detach()  # (dim, K)
        age = self.queue_age.clone()  # (K,)
        loss, logits = decayed_infonce(q, k, queue, age, self.tau, decay, return_logits=True)
        acc = (logits.argmax(dim=1) == 0).float().mean().detach()  # a tensor: no host sync here
        return loss, acc

    def adversary_loss(self, q, x_full):
        """Eq 4 as G's loss, -|D(x_query) - D(x)|_1, with D(x) = q_full from the same encoder
        (no gradient: G's gradient flows through q). Returns (loss_g, q_full)."""
        with torch.no_grad():
            q_full = F.normalize(self.encode_query(x_full), dim=1)  # (N, dim)
        return generator_loss(q, q_full), q_full


def forward_output(loss_d, acc, q, k=None, *, loss_g=None, q_full=None, loss_nce=None, **terms):
    """The dict every method's forward returns (VideoMoCo, CVRL, VCLR), which pretrain.train_step
    reads:
      loss_d    what D minimises (Eq 5/6 for VideoMoCo; CVRL's NT-Xent; VCLR's weighted sum)
      loss_nce  the contrastive term the log compares with its chance level (loss_d unless given:
                VCLR's L_v)
      loss_g    G's loss, Eq 4 negated (adversarial VideoMoCo), else None
      acc       top-1 of the positive among the contrasted keys (a tensor)
      q, k      the normalised queries and keys (N, dim); k None for CVRL
      q_full    D(x), the full clip's query, where loss_g is
      **terms   a method's own terms, logged beside (VCLR: loss_order, order_acc, loss_clip, ...)"""
    return {"loss_d": loss_d, "loss_nce": loss_d if loss_nce is None else loss_nce,
            "loss_g": loss_g, "acc": acc, "q": q, "k": k, "q_full": q_full, **terms}


# -----------------------------------------------------------------------------
# Losses

def decay_weights(age, decay):
    """t^i of Eq 6 for ages i, float64."""
    return torch.pow(torch.tensor(decay, dtype=torch.float64, device=age.device),
                     age.to(torch.float64))


def infonce_chance(age, decay):
    """Eq 6 when every logit is the same: ln(1 + sum_i t^age_i); ln(K + 1) for Eq 1."""
    return math.log1p(decay_weights(age, decay).sum().item())


def decayed_infonce(q, k, queue, age, tau, decay, return_logits=False):
    """Eq 6 (Eq 1/5 when decay == 1), mean over the batch:
    -log( exp(q.k+/tau) / (exp(q.k+/tau) + sum_i t^age_i exp(q.k_i/tau)) ), q, k (N, dim)
    normalised, queue (dim, K), age (K,). t^age is added as age * log t to the negative logits (a
    stable log-sum-exp; the positive is not decayed); decay 1 is MoCo's loss op for op. float32."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        if decay == 1:
            l_neg = q @ queue  # (N, K)
            logits = torch.cat([l_pos, l_neg], dim=1) / tau  # (N, 1 + K), MoCo's ops
        else:
            log_weight = age.to(q.dtype) * math.log(decay)  # (K,)
            # q.queue / tau + age * log t in one GEMM (the bias rides in addmm's epilogue), so the
            # decay costs no extra pass over the (N, K) logits
            # (N, K)
            l_neg = torch.addmm(log_weight.expand(q.shape[0], -1), q, queue, alpha=1 / tau)
            logits = torch.cat([l_pos / tau, l_neg], dim=1)  # (N, 1 + K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, labels)
    return (loss, logits) if return_logits else loss


def generator_loss(q_query, q_full):
    """Eq 4 as a loss for G to minimise: -E |D(x_query) - D(x)|_1 over the batch.
    q_query, q_full: (N, dim) normalised features of the dropped and of the full clip."""
    return -(q_query.float() - q_full.float()).abs().sum(dim=1).mean()


def adversarial_backward(loss_d, loss_g, x_query, x_query_in, d_params, scale=None):
    """The adversarial backward with the paper's routing (top of this file): D gets only loss_d
    (Eq 5/6), G only loss_g (Eq 4). x_query: G's output; x_query_in: its detached copy D saw;
    d_params: D's parameters (loss_d's backward stops there, skipping the clip's gradient);
    scale: a GradScaler's, for both losses (step both optimizers through it)."""
    if scale is None:
        scale = lambda loss: loss  # noqa: E731
    grad_in, = torch.autograd.grad(scale(loss_g), x_query_in, retain_graph=True)
    torch.autograd.backward(scale(loss_d), inputs=list(d_params))
    x_query.backward(grad_in)
