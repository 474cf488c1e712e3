"""VideoMoCo (Pan et al., CVPR 2021): encoders, generator G, the MoCo wrapper and the losses.

Sections follow the paper: encoders (the discriminator D), the ConvLSTM generator G (Eq 3), the
VideoMoCo wrapper (Eq 2, the queue and the ages of Eq 6), the losses (Eq 1/5/6 and Eq 4).

Gradient routing in the adversarial phase (the authors' code left this ad hoc and let both losses
reach both nets; we follow the paper):
  - D (encoder_q) is trained only by the decayed contrastive loss, Eq 5/6 (`loss_d`).
  - G is trained only by Eq 4 (`loss_g`, the negated L1 distance, minimised).
  One forward of D on x_query serves both losses. G's output `x_query` is detached into
  `x_query_in` before it enters D, so `loss_d.backward()` stops at D's input; G's gradient is
  taken as an input-only gradient of `loss_g` through D (`torch.autograd.grad` w.r.t.
  `x_query_in`, which leaves D's `.grad` untouched and fires no DistributedDataParallel hooks) and
  pushed into G with `x_query.backward(grad_in)`. See `adversarial_backward`.
"""
import contextlib
import copy
import functools
import math
from collections import OrderedDict

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

ARCHS = ("tiny", "r3d_10", "r2plus1d_10", "r3d_18", "r2plus1d_18", "mc3_18", "c3d")

# Parameters without fc, measured with count_parameters (torch 2.14.1 / torchvision 0.29.1):
#   r3d_10 14.36M (the paper's Table 3: 14.4M), r2plus1d_10 12.49M (Table 3: 14.4M; torchvision's
#   (2+1)D blocks and stem are lighter than VCOP's own R(2+1)D), r3d_18 33.17M, r2plus1d_18 31.30M,
#   mc3_18 11.49M, c3d 27.66M (Table 3's 58.3M is the original C3D with fc6/fc7), tiny 0.29M.


def count_parameters(module):
    """Number of parameters of `module` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


class C3D(nn.Module):
    """C3D, the small BN variant of VCOP that VideoMoCo uses: conv1..conv5b (3x3x3, BN, ReLU),
    max-pooling (1,2,2) then (2,2,2), global average pool (VCOP's pool5) and `fc`.

    The (2,2,2) pools use ceil_mode so that clips as short as T=4 still reach conv5; for the even
    sizes VCOP uses (16x112x112) the shapes are the same as VCOP's.
    """

    def __init__(self, num_classes):
        super().__init__()
        widths = [("1", 3, 64), ("2", 64, 128), ("3a", 128, 256), ("3b", 256, 256),
                  ("4a", 256, 512), ("4b", 512, 512), ("5a", 512, 512), ("5b", 512, 512)]
        pool_after = {"1": (1, 2, 2), "2": (2, 2, 2), "3b": (2, 2, 2), "4b": (2, 2, 2)}
        layers = []
        for name, c_in, c_out in widths:
            layers += [(f"conv{name}", nn.Conv3d(c_in, c_out, kernel_size=3, padding=1)),
                       (f"bn{name}", nn.BatchNorm3d(c_out)),
                       (f"relu{name}", nn.ReLU(inplace=True))]
            if name in pool_after:
                size = pool_after[name]
                layers.append((f"pool{name[0]}", nn.MaxPool3d(size, size, ceil_mode=True)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(512, num_classes)
        _init_weights(self)

    def forward(self, x):  # (N, 3, T, H, W)
        x = self.avgpool(self.features(x)).flatten(1)  # (N, 512)
        return self.fc(x)  # (N, num_classes)


class TinyEncoder(nn.Module):
    """A small 3D CNN for the CPU demo and the tests: four strided conv3d+BN+ReLU stages
    (16-32-64-128 channels), global average pool, `fc`."""

    def __init__(self, num_classes, widths=(16, 32, 64, 128)):
        super().__init__()
        layers, c_in = [], 3
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
    """The encoder D (theta_q): (N, 3, T, H, W) -> (N, num_classes), last layer `fc`.

    r3d_18 / r2plus1d_18 / mc3_18 are torchvision's models; r3d_10 / r2plus1d_10 are torchvision's
    VideoResNet with one BasicBlock per stage (the 14.4M-parameter nets of VCOP and the paper), so
    their state dicts load strictly into torchvision's classes. input="residual" makes the encoder
    turn every clip it is given into residual frames first (a forward pre-hook: no parameters, the
    state dict and its torchvision compatibility are unchanged; the mode is recorded in
    checkpoints).
    """
    if arch in ("r3d_18", "r2plus1d_18", "mc3_18"):
        encoder = getattr(tv_video, arch)(weights=None, num_classes=num_classes)
    elif arch == "r3d_10":
        encoder = VideoResNet(BasicBlock, [Conv3DSimple] * 4, [1, 1, 1, 1], BasicStem,
                              num_classes=num_classes)
    elif arch == "r2plus1d_10":
        encoder = VideoResNet(BasicBlock, [Conv2Plus1D] * 4, [1, 1, 1, 1], R2Plus1dStem,
                              num_classes=num_classes)
    elif arch == "c3d":
        encoder = C3D(num_classes)
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
    """The projection from pooled features to the contrastive embedding: MoCo v1's linear layer, or
    MoCo v2's MLP (Linear, ReLU, Linear; --mlp). (in_features,) -> (dim,).

    Initialised with nn.Linear's own default (uniform, std 1/sqrt(3 * fan_in)), as MoCo's builder
    gets from torchvision's image ResNet, and *not* with the normal(0, 0.01) that torchvision's
    video ResNets (and `_init_weights`) give a classifier. The embedding is L2-normalised, so the
    forward ignores the head's scale, but SGD does not: the gradient w.r.t. W scales as 1/|W|, so a
    step changes W's direction in proportion to lr / |W|^2, 6x (R(2+1)D/R3D, 512 -> 128) to 25x
    (tiny, 128 -> 128) more than with the default init. Pooled post-ReLU features share a large mean
    mu, so a large step dW ~ g mu^T adds the same vector to every output: the embeddings collapse
    onto one direction, where InfoNCE's gradient (proportional to their spread) vanishes and the
    loss sits at ln(K+1). Measured in RESULTS.md, "Why the pretraining did not learn"."""
    if mlp:
        return nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(inplace=True),
                             nn.Linear(in_features, dim))
    return nn.Linear(in_features, dim)


# -----------------------------------------------------------------------------
# Generator G (Eq 3): frame importance from a ConvLSTM, and the temporal dropout it drives.

class ConvLSTMGenerator(nn.Module):
    """G of Eq 3: predicts the importance of each frame, (N, C, T, H, W) -> (N, T).

    Per-frame 2D convolutions (stride 2, BN, ReLU; `width`, 2*`width`, 4*`width`, 4*`width`
    channels), a global average pool per frame to a vector, a one-layer LSTM over time
    (`hidden` units, 256 in the paper) and a linear layer to one score per frame. Any number of
    frames and any crop size: nothing depends on T, H or W.
    """

    def __init__(self, in_channels=3, hidden=256, width=16):
        super().__init__()
        layers, c_in = [], in_channels
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
    """Eq 3, x_query = G(x) (x) x: drop the k frames of highest importance in each clip.

    x: (N, C, T, H, W); importance: (N, T) from ConvLSTMGenerator. Returns (x_query, mask) with
    x_query of x's shape and mask (N, T) float, 1 = dropped.

    The selection is discrete, so G gets a straight-through gradient: the forward value is the hard
    top-k mask, the backward is that of soft = sigmoid((importance - thr) / temperature), thr the
    midpoint between the k-th and (k+1)-th largest importance (no gradient through thr). We write
    mask = hard + (soft - soft.detach()): the bracket is exactly zero, so the forward mask is
    exactly 0 or 1 (hard + soft - soft.detach() could round 1 to 1 - 2^-24) and kept frames are
    bit-identical. Trained this way against a fixed D, G learns to drop the frames whose removal
    moves D most (see the test
    test_generator_trained_against_a_fixed_d_drops_frames_that_move_d_more_than_random); the
    estimate is only informative once D responds sensibly to clips, which is why the paper first
    trains D alone.
    """
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


def random_drop(x, k, generator=None):
    """The paper's "random dropout" ablation (Table 1): k uniformly random frames per clip are
    dropped as in `drop_frames` (zeros), no gradient.
    Returns (x_query, mask (N, T), 1 = dropped)."""
    n, t = x.shape[0], x.shape[2]
    if not 0 <= k < t:
        raise ValueError(f"random_drop needs 0 <= k < T, got k={k}, T={t}")
    device = x.device if generator is None else generator.device
    order = torch.rand(n, t, generator=generator, device=device).argsort(dim=1).to(x.device)
    mask = torch.zeros(n, t, device=x.device).scatter_(1, order[:, :k], 1.0)  # (N, T)
    return _apply_frame_mask(x, mask), mask


# -----------------------------------------------------------------------------
# The VideoMoCo wrapper: query encoder D, momentum encoder (Eq 2), the queue and its ages (Eq 6).

def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(t):
    """Concatenate `t` from all processes along dim 0 (no gradient); `t` in a world of one."""
    if not is_distributed():
        return t
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def momentum_update_(params_k, params_q, m):
    """Eq 2, in place: theta_k <- m * theta_k + (1 - m) * theta_q."""
    for param_k, param_q in zip(params_k, params_q):
        param_k.mul_(m).add_(param_q.detach(), alpha=1 - m)


class VideoMoCo(nn.Module):
    """MoCo with temporal decay (Eq 6) for video; D = encoder_q (theta_q), momentum encoder
    encoder_k (theta_k, Eq 2).

    Buffers (in state_dict, so they survive resume and move with .to(device)):
      queue     (dim, K) float: the keys, L2-normalised columns, FIFO at queue_ptr.
      queue_ptr (1,) long: the slot the next key is written to (that slot holds the oldest key).
      queue_age (K,) long: the age i of each key in t^i of Eq 6.
    decay_unit="key": the age of a key is its rank counted in keys, newest = 1, so the oldest key of
      a full queue has age K and weight t^K (0.99999^65536 = 0.52, the paper's Sec 4.3.2).
    decay_unit="step": the authors' code's counting, enqueue steps since the key was written (new
      keys have age 1), so with batch B the oldest key is about K / B steps old.
    The initial random keys are aged as if enqueued one key per step in slot order: slot j has age
    K - j, so slot 0 (where queue_ptr starts) is the oldest and the first to be overwritten.
    """

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, decay=0.99999,
                 decay_unit="key", shuffle_splits=2, mlp=True):
        super().__init__()
        if decay_unit not in ("key", "step"):
            raise ValueError(f"decay_unit must be 'key' or 'step', got {decay_unit!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay t of Eq 6 must be in (0, 1], got {decay}")
        self.K, self.m, self.T = K, m, T
        self.decay, self.decay_unit, self.shuffle_splits = decay, decay_unit, shuffle_splits

        self.encoder_q = base_encoder(num_classes=dim)  # as MoCo's builder; its last layer is `fc`
        self.encoder_q.fc = projection_head(self.encoder_q.fc.in_features, dim, mlp)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # (the input hook is copied with it)
        for param in self.encoder_k.parameters():
            param.requires_grad = False

        self.add_queue("queue", dim)

    def add_queue(self, name, dim):
        """Buffers NAME (dim, K) of random unit keys, NAME_ptr and NAME_age, as the class docstring
        describes; `dequeue_and_enqueue(keys, NAME)` updates them."""
        self.register_buffer(name, F.normalize(torch.randn(dim, self.K), dim=0))
        self.register_buffer(name + "_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer(name + "_age", torch.arange(self.K, 0, -1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        """Eq 2 on the parameters, as MoCo: encoder_k's BN running statistics are its own (keys
        are encoded in train mode, so they are never read during pretraining; only encoder_q is
        exported)."""
        momentum_update_(self.encoder_k.parameters(), self.encoder_q.parameters(), self.m)

    def encode_query(self, x_query):
        """encoder_q on the queries (N, dim), not normalised. MoCo normalises each process's queries
        with that process's BN statistics; in a world of one, `shuffle_splits` processes are
        emulated (as MoCo's single-GPU CIFAR demo does with SplitBatchNorm): the queries are
        normalised in that many contiguous sub-batches, and `encode_key` gives the keys shuffled
        sub-batches of the same size, so a query and its key share BN statistics no more than
        across S real processes."""
        if is_distributed() or not self.training or self.shuffle_splits <= 1:
            return self.encoder_q(x_query)
        chunks = torch.tensor_split(x_query, min(self.shuffle_splits, x_query.shape[0]))
        return torch.cat([self.encoder_q(chunk) for chunk in chunks])

    @torch.no_grad()
    def encode_key(self, x_key):
        """encoder_k on the keys (N, dim), not normalised, with MoCo's shuffle-BN.

        Distributed: the global batch is shuffled with a permutation from rank 0 and each process
        forwards its shard, so BN statistics never mix a query with its own key. In a world of one
        the same is emulated: shuffle, forward in `shuffle_splits` sub-batches, restore the order.
        As in MoCo, every process must pass the same batch size (drop_last in the loader).
        """
        if is_distributed():
            n_local = x_key.shape[0]
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

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys, name="queue"):
        """FIFO update of the queue with the keys of all processes (in rank order), wrapping
        around the end; any K and batch size. Equivalent to enqueueing the keys one at a time: a
        batch larger than K leaves its newest K keys. Ages as in the class docstring. `name`: the
        buffers NAME, NAME_ptr and NAME_age (VCLR keeps a second queue of clip-level keys)."""
        queue, queue_ptr, queue_age = (getattr(self, name + end) for end in ("", "_ptr", "_age"))
        keys = concat_all_gather(keys)  # (B, dim)
        if not torch.isfinite(keys).all():
            # a diverged key encoder must not poison the queue; every rank sees the same keys
            return
        batch = keys.shape[0]
        kept = min(batch, self.K)
        ptr = int(queue_ptr)
        slots = (ptr + torch.arange(batch - kept, batch, device=keys.device)) % self.K  # (kept,)
        queue[:, slots] = keys[batch - kept:].T.to(queue.dtype)
        if self.decay_unit == "key":
            queue_age += batch
            queue_age[slots] = torch.arange(kept, 0, -1, device=keys.device)
        else:
            queue_age += 1
            queue_age[slots] = 1
        queue_ptr[0] = (ptr + batch) % self.K

    @torch.no_grad()
    def random_drop_distance(self, x, q_full, k):
        """Table 1's yardstick for G: Eq 4's distance E|D(x') - D(x)|_1 with x' = x with k frames
        dropped at random, on the clips G saw (q_full = D(x), normalised). BN running statistics are
        left as they were: the BN layers update clones, swapped in and out (restoring them in
        place would break D's backward, which holds the originals)."""
        bns = [m for m in self.encoder_q.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        stats = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in bns]
        for m, (mean, var, count) in zip(bns, stats):
            m.running_mean, m.running_var = mean.clone(), var.clone()
            m.num_batches_tracked = count.clone()
        try:
            q = F.normalize(self.encode_query(random_drop(x, k)[0]), dim=1)
        finally:
            for m, (mean, var, count) in zip(bns, stats):
                m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
        return (q.float() - q_full.float()).abs().sum(dim=1).mean()

    def forward(self, x_query, x_key, x_full=None, decay=None):
        """One MoCo step. x_query: the query clip (G's output in the adversarial phase, Eq 3),
        x_key: the other view, x_full: the query clip before dropout (adversarial phase only),
        decay: t of Eq 6 for this step (default self.decay; 1 gives Eq 1).

        Returns {"loss_d": Eq 6 (Eq 5 if decay == 1), "loss_g": Eq 4 or None, "q", "k", "q_full"
        (D(x_full), or None), "acc"}.
        The momentum update and the enqueue happen only in training mode, so an eval-mode forward
        leaves encoder_k and the queue untouched.
        """
        q = F.normalize(self.encode_query(x_query), dim=1)  # (N, dim)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            k = F.normalize(self.encode_key(x_key), dim=1)  # (N, dim)
        queue = self.queue.clone().detach()  # (dim, K), the negatives before this batch enters
        age = self.queue_age.clone()  # (K,)
        decay = self.decay if decay is None else decay
        loss_d, logits = decayed_infonce(q, k, queue, age, self.T, decay, return_logits=True)
        loss_g = q_full = None
        if x_full is not None:
            with torch.no_grad():
                q_full = F.normalize(self.encode_query(x_full), dim=1)  # (N, dim)
            loss_g = generator_loss(q, q_full)
        acc = (logits.argmax(dim=1) == 0).float().mean().detach()  # a tensor: no host sync here
        if self.training:
            self.dequeue_and_enqueue(k)
        return {"loss_d": loss_d, "loss_g": loss_g, "q": q, "k": k, "q_full": q_full, "acc": acc}


# -----------------------------------------------------------------------------
# Losses

def decay_weights(age, decay):
    """t^i of Eq 6 for ages i, float64."""
    return torch.pow(torch.tensor(decay, dtype=torch.float64, device=age.device),
                     age.to(torch.float64))


def infonce_chance(age, decay):
    """The value of Eq 6 when every logit is the same (collapsed features, or a model that has
    learned nothing): ln(1 + sum_i t^age_i) over the queue's ages; ln(K + 1) for Eq 1 (decay 1)."""
    return math.log1p(decay_weights(age, decay).sum().item())


def decayed_infonce(q, k, queue, age, tau, decay, return_logits=False):
    """Eq 6 (Eq 1/5 when decay == 1), mean over the batch:
    -log( exp(q.k+/tau) / (exp(q.k+/tau) + sum_i t^age_i exp(q.k_i/tau)) ).

    q, k: (N, dim) L2-normalised; queue: (dim, K) the negatives; age: (K,) their ages.
    The weight t^age multiplies exp(), so it is added as age * log(t) to the negative logits and the
    log-sum-exp of cross-entropy stays stable; the positive is not decayed. With decay == 1 the
    addition is skipped and this is MoCo's loss op for op. Computed in float32 even under autocast.
    """
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
    """Backward of one adversarial step with the paper's routing: D gets only loss_d (Eq 5/6),
    G gets only loss_g (Eq 4). See the comment at the top of this file.

    x_query: G's output (graph to G); x_query_in = x_query.detach().requires_grad_(), what D saw.
    d_params: D's trainable parameters; loss_d's backward is restricted to them, so it skips the
    gradient w.r.t. the clip that only loss_g needs (the first conv's input gradient is not free).
    scale: a GradScaler's `scale` for float16 AMP; both losses are scaled, so step both optimizers
    through the same scaler.
    """
    if scale is None:
        scale = lambda loss: loss  # noqa: E731
    grad_in, = torch.autograd.grad(scale(loss_g), x_query_in, retain_graph=True)
    torch.autograd.backward(scale(loss_d), inputs=list(d_params))
    x_query.backward(grad_in)


def videomoco_step(model, x, x_key, opt_d, generator=None, opt_g=None, k=8, temperature=1.0,
                   decay=None,
                   random_k=False, compare_random=False, autocast=contextlib.nullcontext(),
                   scaler=None,
                   agree=None):
    """One whole VideoMoCo step. x, x_key: (N, 3, T, H, W), two augmentations of the same clips.

    With G (`generator`, the adversarial phase, Sec 3.3): G scores every frame of x, its k most
    important frames are dropped (Eq 3), D (model.encoder_q) minimises the decayed InfoNCE with
    x_query as the query (Eq 5/6) and G maximises |D(x_query) - D(x)|_1 (Eq 4); each net is updated
    by its own loss only (adversarial_backward). Without G: D alone, MoCo's step with x as the query
    (Eq 1, decayed by Eq 6); random_k drops k frames at random instead (Table 1's random-drop row).

    model: a VideoMoCo, or one wrapped in DistributedDataParallel. decay: t of Eq 6 for this step
    (default model.decay; 1 = Eq 1). compare_random (with G): also "l1_random", Eq 4's distance for
    k frames dropped at random from the same clips, with the same D. autocast: the forward's
    autocast context; scaler: a torch.amp.GradScaler (None: plain optimizer steps). The nets are
    updated only if agree(finite) is true, finite = both losses are finite (default: agree = the
    identity); a distributed caller makes every rank decide alike there.
    Returns the model's dict plus "x_query" and "updated".
    """
    with autocast:
        if generator is not None:
            x_query, _ = drop_frames(x, generator(x), k, temperature)
        elif random_k:
            x_query, _ = random_drop(x, k)
        else:
            x_query = x
        # see adversarial_backward
        x_query_in = x_query.detach().requires_grad_(generator is not None)
        out = model(x_query_in, x_key, x if generator is not None else None, decay)
        if generator is not None and compare_random:
            videomoco = getattr(model, "module", model)  # under DistributedDataParallel
            out["l1_random"] = videomoco.random_drop_distance(x, out["q_full"], k)
    loss_d, loss_g = out["loss_d"], out["loss_g"]
    finite = bool(torch.isfinite(loss_d)) and (loss_g is None or bool(torch.isfinite(loss_g)))
    out.update(x_query=x_query, updated=agree(finite) if agree is not None else finite)
    if not out["updated"]:
        return out
    scaler = scaler if scaler is not None else torch.amp.GradScaler(x.device.type, enabled=False)
    opts = (opt_d, opt_g) if generator is not None else (opt_d,)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    if generator is not None:
        adversarial_backward(loss_d, loss_g, x_query, x_query_in, opt_d.param_groups[0]["params"],
                             scale=scaler.scale)
    else:
        scaler.scale(loss_d).backward()
    for opt in opts:  # both through the one scaler under float16
        scaler.step(opt)
    scaler.update()
    return out
