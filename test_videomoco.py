"""
The paper's equations and the whole step: every equation of models.py against a naive loop, the
queue and its ages, G and its gradient routing, shuffle-BN, the encoders, and pretrain.train_step
against MoCo's Algorithm 1 plus Eq 3-6 written out. Fast: small shapes, CPU.
"""

import argparse
import contextlib
import copy
import decimal
import inspect
import itertools
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.video.resnet import (BasicBlock, BasicStem, Conv2Plus1D, Conv3DSimple,
                                             R2Plus1dStem, VideoResNet)

import methods
import models
import pretrain
from testlib import HERE, TINY, free_port, fit_batchnorm, naive_decayed_infonce, random_unit


# -----------------------------------------------------------------------------
# models.py: Eq 1, 5, 6


@pytest.mark.parametrize("decay", [0.9, 0.99, 0.99999, 1.0])
def test_decayed_infonce_matches_loop(decay):
    torch.manual_seed(0)
    q, k = random_unit(5, 8, dim=1), random_unit(5, 8, dim=1)
    queue = random_unit(8, 11, dim=0)
    age = torch.tensor([1, 2, 3, 5, 8, 13, 100, 1000, 20000, 65535, 65536])
    loss = models.decayed_infonce(q, k, queue, age, 0.07, decay)
    expected = naive_decayed_infonce(q.double(), k.double(), queue.double(), age, 0.07, decay)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_decay_changes_loss_only_through_negatives():
    torch.manual_seed(1)
    q, k, queue = random_unit(4, 8, dim=1), random_unit(4, 8, dim=1), random_unit(8, 6, dim=0)
    age = torch.arange(1, 7)
    plain = models.decayed_infonce(q, k, queue, age, 0.1, 1.0)
    decayed = models.decayed_infonce(q, k, queue, age, 0.1, 0.5)
    assert decayed < plain  # t^i < 1 shrinks the denominator, never the positive
    # the positive is not decayed: all-zero ages make Eq 6 equal Eq 1
    assert models.decayed_infonce(q, k, queue, torch.zeros(6, dtype=torch.long), 0.1, 0.5) == plain


def test_decay_one_is_moco_infonce_exactly():
    torch.manual_seed(2)
    q, k, queue = random_unit(6, 16, dim=1), random_unit(6, 16, dim=1), random_unit(16, 32, dim=0)
    age = torch.randint(1, 1000, (32,))
    loss = models.decayed_infonce(q, k, queue, age, 0.07, 1.0)
    # MoCo v1 builder + main_moco: logits = cat(l_pos, l_neg) / T, cross-entropy with label 0
    l_pos = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([l_pos, q @ queue], dim=1) / 0.07
    moco = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    assert torch.equal(loss, moco)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)
    moco_einsum = F.cross_entropy(torch.cat([l_pos, l_neg], 1) / 0.07,
                                  torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(loss, moco_einsum, atol=1e-7, rtol=0)


def test_chance_level_is_the_loss_of_equal_logits():
    age = torch.tensor([3, 1, 4, 2])
    for decay in (1.0, 0.9):
        q = F.normalize(torch.ones(2, 8), dim=1)
        # every logit 1 / tau
        loss = models.decayed_infonce(q, q, q[:1].T.expand(8, 4), age, 0.07, decay)
        assert models.infonce_chance(age, decay) == pytest.approx(loss.item(), rel=1e-5)
    assert models.infonce_chance(age, 1.0) == pytest.approx(math.log(5))


def test_decay_weights_and_oldest_key_of_full_queue():
    # t^i computed independently: the float t's exact value raised in 40-digit decimal arithmetic
    with decimal.localcontext() as exact:
        exact.prec = 40
        for t in ("0.99999", "0.999", "0.5"):
            age = torch.tensor([0, 1, 2, 7, 8000, 65535, 65536])
            weights = models.decay_weights(age, float(t))
            for a, w in zip(age.tolist(), weights.tolist()):
                exact_w = decimal.Decimal(float(t)) ** a
                assert w == pytest.approx(float(exact_w), rel=1e-13, abs=1e-300)
    assert models.decay_weights(torch.tensor([65536]), 0.99999).item() == pytest.approx(
        0.5193, abs=5e-5)  # Sec 4.3.2: t^65536 of the oldest key, about 0.52
    model = models.VideoMoCo(TINY, dim=4, K=65536)
    model.dequeue_and_enqueue(random_unit(256, 4, dim=1))
    assert int(model.queue_age.max()) == 65536
    assert sorted(model.queue_age.tolist()) == list(range(1, 65537))


# -----------------------------------------------------------------------------
# models.py: Eq 2


def test_momentum_update_matches_loop():
    torch.manual_seed(3)
    model = models.VideoMoCo(TINY, dim=8, K=16, m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
        for b in model.encoder_q.buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b))
    theta_k = [p.clone() for p in model.encoder_k.parameters()]
    theta_q = [p.clone() for p in model.encoder_q.parameters()]
    buffers_k = [b.clone() for b in model.encoder_k.buffers()]
    model.momentum_update()
    for p_k, old_k, p_q in zip(model.encoder_k.parameters(), theta_k, theta_q):
        torch.testing.assert_close(p_k, 0.9 * old_k + 0.1 * p_q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p_k, old_k)
        assert not p_k.requires_grad
    for b_k, old_b in zip(model.encoder_k.buffers(), buffers_k):  # as MoCo: parameters only
        assert torch.equal(b_k, old_b)


# -----------------------------------------------------------------------------
# models.py: queue and ages


def queue_fifo(model):
    """The keys' ids in FIFO order, oldest first (the slot at queue_ptr holds the oldest)."""
    ptr, K = int(model.queue_ptr), model.K
    slots = [(ptr + i) % K for i in range(K)]
    keys = [round(model.queue[0, j].item()) for j in slots]
    return keys, [int(model.queue_age[j]) for j in slots]


def test_queue_wraparound_and_ages():
    K, dim = 10, 3
    model = models.VideoMoCo(TINY, dim=dim, K=K)
    # initial keys: ids -K..-1 in slot order, enqueued one per step (slot 0 oldest)
    model.queue[:] = torch.arange(-K, 0, dtype=torch.float)
    fifo = [(i, -(K - 1) + j) for j, i in enumerate(range(-K, 0))]  # (id, step it was enqueued)
    assert queue_fifo(model)[1] == [K - j for j in range(K)]
    next_id, step = 0, 0
    for batch in (4, 4, 4, 4, 4, 13, 3, 7, 10):
        step += 1
        ids = list(range(next_id, next_id + batch))
        next_id += batch
        model.dequeue_and_enqueue(torch.tensor(ids, dtype=torch.float)[:, None].repeat(1, dim))
        fifo = (fifo + [(i, step) for i in ids])[-K:]
        got_ids, got_ages = queue_fifo(model)
        assert got_ids == [i for i, _ in fifo]
        assert int(model.queue_ptr) == (next_id + K) % K  # initial fill counts as K keys
        assert got_ages == list(range(K, 0, -1))  # rank, newest = 1
    # a batch of non-finite keys leaves the queue as it was (a diverged key encoder)
    before = copy.deepcopy(model.state_dict())
    model.dequeue_and_enqueue(torch.full((3, dim), float("nan")))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_queue_batch_larger_than_queue_keeps_newest():
    model = models.VideoMoCo(TINY, dim=2, K=5)
    model.dequeue_and_enqueue(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    keys = torch.arange(100, 112, dtype=torch.float)[:, None].repeat(1, 2)
    model.dequeue_and_enqueue(keys)
    ids, ages = queue_fifo(model)
    assert ids == list(range(107, 112))
    assert ages == [5, 4, 3, 2, 1]
    assert int(model.queue_ptr) == (2 + 12) % 5


def test_queue_state_is_in_state_dict():
    model = models.VideoMoCo(TINY, dim=4, K=8)
    model.dequeue_and_enqueue(random_unit(3, 4, dim=1))
    state = copy.deepcopy(model.state_dict())
    assert {"queue", "queue_ptr", "queue_age"} <= set(state)
    fresh = models.VideoMoCo(TINY, dim=4, K=8)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue, model.queue)
    assert int(fresh.queue_ptr) == 3
    assert torch.equal(fresh.queue_age, model.queue_age)


def test_eval_forward_leaves_queue_and_key_encoder():
    torch.manual_seed(4)
    model = models.VideoMoCo(TINY, dim=8, K=16).eval()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 4, 32, 32)
    model(x, x)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    model.train()
    model(x, x)
    assert int(model.queue_ptr) == 2
    assert not torch.equal(model.encoder_k.fc[0].weight, before["encoder_k.fc.0.weight"])


# -----------------------------------------------------------------------------
# models.py: Eq 3, generator


def test_drop_frames_hard_top_k():
    torch.manual_seed(5)
    n, t, k = 3, 8, 3
    x = torch.randn(n, 3, t, 6, 5)
    importance = torch.randn(n, t, requires_grad=True)
    x_query, mask = models.drop_frames(x, importance, k)
    assert x_query.shape == x.shape
    assert mask.shape == (n, t)
    for i in range(n):
        dropped = sorted(range(t), key=lambda j: -importance[i, j].item())[:k]
        for j in range(t):
            if j in dropped:
                assert mask[i, j].item() == 1.0
                assert torch.count_nonzero(x_query[i, :, j]) == 0
            else:
                assert mask[i, j].item() == 0.0
                assert torch.equal(x_query[i, :, j], x[i, :, j])
    assert torch.equal(mask.sum(1), torch.full((n,), float(k)))


def test_drop_frames_straight_through_gradient():
    torch.manual_seed(6)
    n, t, k, temperature = 2, 6, 2, 0.5
    x = torch.randn(n, 3, t, 4, 4)
    importance = torch.randn(n, t, requires_grad=True)
    weight = torch.randn_like(x)
    x_query, _ = models.drop_frames(x, importance, k, temperature)
    (x_query * weight).sum().backward()
    grad = importance.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # d/d importance_j = sum(-x_j * weight_j) * sigmoid'(z_j) / temperature,
    # z_j = (importance_j - thr) / temperature
    for i in range(n):
        values = sorted(importance[i].tolist(), reverse=True)
        thr = (values[k - 1] + values[k]) / 2
        for j in range(t):
            s = 1 / (1 + math.exp(-(importance[i, j].item() - thr) / temperature))
            expected = -(x[i, :, j] * weight[i, :, j]).sum().item() * s * (1 - s) / temperature
            assert grad[i, j].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_drop_frames_k_bounds():
    # k in 0..T-1: none dropped (the mask still (N, T)), up to all frames but one
    x = torch.randn(2, 3, 4, 8, 8)
    importance = torch.randn(2, 4)
    for drop, args in ((models.drop_frames, (x, importance)), (models.random_drop, (x,))):
        x_query, mask = drop(*args, 0)
        assert torch.equal(x_query, x) and torch.equal(mask, torch.zeros(2, 4))
        x_query, mask = drop(*args, 3)
        assert torch.equal(mask.sum(1), torch.full((2,), 3.0))
        assert (x_query.flatten(3).abs().sum((1, 3)) > 0).sum(1).tolist() == [1, 1]
        for k in (-1, 4):
            with pytest.raises(ValueError, match=f"needs 0 <= k < T, got k={k}, T=4"):
                drop(*args, k)


def test_drop_frames_keep_the_clip_dtype():
    # under autocast the clip is bfloat16 and stays so (the mask is float32)
    x = torch.randn(2, 3, 4, 8, 8).bfloat16()
    assert models.drop_frames(x, torch.randn(2, 4), 1)[0].dtype == torch.bfloat16
    assert models.random_drop(x, 1)[0].dtype == torch.bfloat16


def test_frame_motion_is_the_mean_absolute_difference_to_the_neighbours_against_a_loop():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4, 4)
    motion = models.frame_motion(x)
    for n in range(2):
        for j in range(5):
            diffs = [(x[n, :, j] - x[n, :, i]).abs().mean().item() for i in (j - 1, j + 1)
                     if 0 <= i < 5]
            assert motion[n, j].item() == pytest.approx(sum(diffs) / len(diffs), rel=1e-6)


def test_pixel_motion_is_each_pixel_s_mean_absolute_difference_to_its_neighbours_against_a_loop():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 3, 4)
    motion = models.pixel_motion(x)  # (N, T, H, W)
    assert motion.shape == (2, 5, 3, 4)
    for n in range(2):
        for j in range(5):
            for h in range(3):
                for w in range(4):
                    diffs = [sum(abs(x[n, c, j, h, w].item() - x[n, c, i, h, w].item())
                                 for c in range(3)) / 3
                             for i in (j - 1, j + 1) if 0 <= i < 5]
                    assert motion[n, j, h, w].item() == pytest.approx(sum(diffs) / len(diffs),
                                                                       rel=1e-5)


def test_motion_correlation_is_pearson_s_r_per_clip_averaged_against_a_loop():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 6, 4, 4)
    motion = models.frame_motion(x)
    assert pretrain.motion_correlation(motion, x).item() == pytest.approx(1, abs=1e-6)
    assert pretrain.motion_correlation(-2 * motion + 1, x).item() == pytest.approx(-1, abs=1e-6)
    importance = torch.randn(3, 6)
    rs = []
    for n in range(3):
        a = importance[n].tolist()
        b = motion[n].tolist()
        ma = sum(a) / 6
        mb = sum(b) / 6
        cov = sum((u - ma) * (v - mb) for u, v in zip(a, b))
        rs.append(cov / math.sqrt(sum((u - ma) ** 2 for u in a) * sum((v - mb) ** 2 for v in b)))
    assert pretrain.motion_correlation(importance, x).item() == pytest.approx(sum(rs) / 3, rel=1e-5)


def test_random_drop():
    x = torch.randn(64, 3, 8, 4, 4)
    x_query, mask = models.random_drop(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(mask.sum(1), torch.full((64,), 2.0))
    dropped = mask.bool()
    assert torch.count_nonzero(x_query.transpose(1, 2)[dropped]) == 0
    assert torch.equal(x_query.transpose(1, 2)[~dropped], x.transpose(1, 2)[~dropped])
    assert mask.sum(0).min() > 0  # every position gets dropped somewhere: not a fixed choice
    again, mask_again = models.random_drop(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(mask, mask_again)


def test_videomoco_defaults_are_the_papers_and_its_queue_starts_as_moco_s():
    # Eq 1/2/6's constants: dim 128, K = 65536, m = 0.999, tau = 0.07, t = 0.99999 (Sec 4.2);
    # 2 shuffle-BN groups in a world of one. The queue starts as MoCo's: random unit columns,
    # every key older than the last (ages K..1); t outside (0, 1] is refused
    defaults = {name: p.default for name, p in
                inspect.signature(models.VideoMoCo).parameters.items() if name != "base_encoder"}
    assert defaults == dict(dim=128, K=65536, m=0.999, tau=0.07, decay=0.99999, shuffle_splits=2,
                            mlp=True)
    model = models.VideoMoCo(TINY, dim=8, K=16)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(16))
    assert model.queue_age.dtype == torch.long
    assert model.queue_age.tolist() == list(range(16, 0, -1))
    for decay in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=re.escape("decay t of Eq 6 must be in (0, 1]")):
            models.VideoMoCo(TINY, dim=8, K=16, decay=decay)
    assert models.VideoMoCo(TINY, dim=8, K=16, decay=1.0).decay == 1.0


def test_generator_defaults_are_the_papers_convlstm():
    # Sec 3.2, 4.2: conv layers, an LSTM of 256 units, one importance score per frame of an RGB clip
    generator = models.ConvLSTMGenerator()
    assert generator.frame_features[0].in_channels == 3
    convs = [m for m in generator.frame_features if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [16, 32, 64, 64]
    assert all(m.stride == (2, 2) and m.padding == (1, 1) for m in convs)
    assert (generator.lstm.input_size, generator.lstm.hidden_size) == (64, 256)
    assert (generator.score.in_features, generator.score.out_features) == (256, 1)


@pytest.mark.parametrize("frames,crop", list(itertools.product([8, 16], [32, 48])))
def test_generator_any_length_and_crop(frames, crop):
    generator = models.ConvLSTMGenerator(hidden=32, width=8)
    importance = generator(torch.randn(2, 3, frames, crop, crop + 16))
    assert importance.shape == (2, frames)
    assert importance.dtype == torch.float32 and torch.isfinite(importance).all()


# -----------------------------------------------------------------------------
# models.py: gradient routing, and models.py alone


def adversarial_forward(model, generator, x, x_key, k):
    x_query, _ = models.drop_frames(x, generator(x), k)
    x_query_in = x_query.detach().requires_grad_()
    return model(x_query_in, x_key, adversarial=True, x_full=x), x_query, x_query_in


def docstring_step():
    """The step of models.py's module docstring (its indented code block), as a script."""
    doc = models.__doc__
    block = doc[doc.index("The step, as MoCo's paper gives"):].split("\n\n", 1)[1]
    return textwrap.dedent(block)


LIFTED_CHECKS = """
assert torch.isfinite(out_moco["loss_d"])  # the MoCo step
assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_g"])  # the adversarial step
assert int(model.queue_ptr) == 8  # two steps of 4 keys
torch.manual_seed(0)  # the initial weights again: the block's first two constructions
model0 = models.VideoMoCo(torchvision.models.video.r2plus1d_18, dim=16, K=32, m=0.99)
generator0 = models.ConvLSTMGenerator(3, 16, 8)
assert any(not torch.equal(a, b) for a, b in zip(generator0.parameters(), generator.parameters()))
assert any(not torch.equal(a, b) for a, b in zip(model0.encoder_q.parameters(),
                                                 model.encoder_q.parameters()))
print("lifted", models.__file__)
"""


def test_models_py_alone_trains_videomoco_with_a_torchvision_encoder(tmp_path):
    # models.py is the file people copy: alone in an empty folder, the step of its docstring (with
    # torchvision's r2plus1d_18 as MoCo's base_encoder, a MoCo step and an adversarial step,
    # pretrain.train_step's written out) runs and trains both players
    shutil.copy(os.path.join(HERE, "models.py"), tmp_path / "models.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = docstring_step() + LIFTED_CHECKS
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"lifted {tmp_path / 'models.py'}"


def test_adversarial_forward_needs_the_full_clip():
    # Eq 4 compares D(x_query) with D(x): the adversarial mode without x is a one-line error
    model = models.VideoMoCo(TINY, dim=8, K=16)
    x = torch.randn(2, 3, 4, 16, 16)
    with pytest.raises(ValueError, match="^the adversarial forward needs x_full, the clip before "
                                         "the drop$"):
        model(x, x, adversarial=True)


def test_adversarial_backward_routes_losses():
    torch.manual_seed(7)
    model = models.VideoMoCo(TINY, dim=8, K=16)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    x, x_key = torch.randn(4, 3, 8, 32, 32), torch.randn(4, 3, 8, 32, 32)
    start = copy.deepcopy((model.state_dict(), generator.state_dict()))

    def run(backward):
        model.load_state_dict(start[0])
        generator.load_state_dict(start[1])
        model.zero_grad(set_to_none=True)
        generator.zero_grad(set_to_none=True)
        torch.manual_seed(8)  # the same key shuffle every time
        out, x_query, x_query_in = adversarial_forward(model, generator, x, x_key, 2)
        backward(out, x_query, x_query_in)
        return ([p.grad.clone() for p in model.encoder_q.parameters()],
                [None if p.grad is None else p.grad.clone() for p in generator.parameters()])

    def routed(out, x_query, x_query_in):
        models.adversarial_backward(out["loss_d"], out["loss_g"], x_query, x_query_in,
                                    model.encoder_q.parameters())
        assert x_query_in.grad is None  # loss_d's backward stops at D: no gradient of the clip

    routed_d, routed_g = run(routed)
    only_d, no_g = run(lambda o, xq, xin: o["loss_d"].backward())
    leaked_d, _ = run(lambda o, xq, xin: (o["loss_d"] + o["loss_g"]).backward())

    for routed, reference in zip(routed_d, only_d):
        torch.testing.assert_close(routed, reference, rtol=1e-6, atol=1e-9)
    # the test would see a leak
    assert any(not torch.allclose(a, b) for a, b in zip(leaked_d, only_d))
    assert all(g is None for g in no_g)  # loss_d alone never reaches G
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(torch.isfinite(g).all() for g in routed_g)
    assert sum(g.abs().sum() for g in routed_g) > 0

    # G's gradient is that of Eq 4 through D with G attached (no detach), D's grads discarded
    model.load_state_dict(start[0])
    generator.load_state_dict(start[1])
    torch.manual_seed(8)
    x_query, _ = models.drop_frames(x, generator(x), 2)
    out = model(x_query, x_key, adversarial=True, x_full=x)
    reference_g = torch.autograd.grad(out["loss_g"], list(generator.parameters()))
    for routed, reference in zip(routed_g, reference_g):
        torch.testing.assert_close(routed, reference, rtol=1e-5, atol=1e-8)


def test_adversarial_backward_scales_both_losses():
    torch.manual_seed(9)
    model = models.VideoMoCo(TINY, dim=8, K=16).eval()
    generator = models.ConvLSTMGenerator(hidden=16, width=8).eval()
    x = torch.randn(2, 3, 8, 32, 32)
    grads = []
    for scale in (None, lambda loss: loss * 8.0):
        model.zero_grad(set_to_none=True)
        generator.zero_grad(set_to_none=True)
        out, x_query, x_query_in = adversarial_forward(model, generator, x, x, 2)
        models.adversarial_backward(out["loss_d"], out["loss_g"], x_query, x_query_in,
                                    model.encoder_q.parameters(), scale=scale)
        grads.append([p.grad.clone() for p in itertools.chain(model.encoder_q.parameters(),
                                                              generator.parameters())])
    for plain, scaled in zip(*grads):
        torch.testing.assert_close(scaled, 8.0 * plain, rtol=1e-5, atol=1e-9)


def flash_clips(gen, n, frames=16, k=4):
    """Clips that are one still image plus noise but for k random frames per clip, which are strong
    noise "flashes": removing the flashes moves D's feature most, so G has something to find."""
    still = torch.randn(n, 3, 1, 32, 32, generator=gen).expand(n, 3, frames, 32, 32) * 0.3
    x = still + 0.05 * torch.randn(n, 3, frames, 32, 32, generator=gen)
    flashes = torch.rand(n, frames, generator=gen).argsort(dim=1)[:, :k]
    mask = torch.zeros(n, frames).scatter_(1, flashes, 1.0)[:, None, :, None, None]
    return x * (1 - mask) + 2 * torch.randn(n, 3, frames, 32, 32, generator=gen) * mask


def eq4_distance(model, x, x_query):
    """E |D(x_query) - D(x)|_1 over the batch, Eq 4's distance, without gradient."""
    with torch.no_grad():
        q, q_full = (F.normalize(model.encoder_q(c), dim=1) for c in (x_query, x))
    return (q - q_full).abs().sum(dim=1).mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generator_trained_against_a_fixed_d_drops_frames_that_move_d_more_than_random(seed):
    # Table 1's claim, at the scale of a test: 15 steps of G on Eq 4 through
    # models.adversarial_backward (the straight-through drop), D fixed. On fresh clips, G's k drops
    # must move D at least 1.5x as far as k random drops (measured
    # 2.0-2.3 on seeds 0-3; 0.35-1.9 before training).
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = models.VideoMoCo(TINY, dim=16, K=32)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    fit_batchnorm(model.encoder_q, flash_clips(gen, 32))
    model.eval()
    optimizer = torch.optim.SGD(generator.parameters(), lr=0.1, momentum=0.9)
    for _ in range(15):
        x = flash_clips(gen, 8)
        optimizer.zero_grad()
        out, x_query, x_query_in = adversarial_forward(model, generator, x, x, 4)
        models.adversarial_backward(out["loss_d"], out["loss_g"], x_query, x_query_in,
                                    model.encoder_q.parameters())
        optimizer.step()
    x = flash_clips(torch.Generator().manual_seed(1000 + seed), 32)
    with torch.no_grad():
        by_g = eq4_distance(model, x, models.drop_frames(x, generator.eval()(x), 4)[0])
    at_random = eq4_distance(model, x,
                             models.random_drop(x, 4, torch.Generator().manual_seed(seed))[0])
    assert by_g > 1.5 * at_random, (by_g, at_random)


def test_generator_loss_is_eq4_negated_against_a_loop():
    gen = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(5, 7, generator=gen), dim=1)
    q_full = F.normalize(torch.randn(5, 7, generator=gen), dim=1)
    expected = sum(sum(abs(a - b) for a, b in zip(row, row_full))
                   for row, row_full in zip(q.tolist(), q_full.tolist())) / 5
    # G maximises Eq 4
    assert models.generator_loss(q, q_full).item() == pytest.approx(-expected, rel=1e-6)
    assert models.generator_loss(q, q).item() == 0


# -----------------------------------------------------------------------------
# models.py: shuffle-BN


def test_encode_key_restores_order_in_eval_mode():
    torch.manual_seed(10)
    model = models.VideoMoCo(TINY, dim=8, K=16, shuffle_splits=2).eval()
    fit_batchnorm(model.encoder_k, torch.randn(4, 3, 4, 32, 32))
    x = torch.randn(6, 3, 4, 32, 32)
    keys = F.normalize(model.encode_key(x), dim=1)
    for i in range(6):
        expected = F.normalize(model.encoder_k(x[i:i + 1]), dim=1)[0]
        torch.testing.assert_close(keys[i], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(6))


@pytest.mark.parametrize("splits", [2, 4])
def test_shuffle_bn_emulation_normalises_like_separate_processes_in_train_mode(splits):
    # With --shuffle-splits S in a world of one, the queries are normalised in S contiguous
    # sub-batches, as S processes would normalise their own shards, and the keys in S sub-batches of
    # a shuffled batch (MoCo's single-GPU demo, SplitBatchNorm).
    # Train mode: BN uses batch statistics.
    torch.manual_seed(12)
    model = models.VideoMoCo(TINY, dim=8, K=16, shuffle_splits=splits, m=0.5).train()
    x = torch.randn(8, 3, 4, 32, 32)
    with torch.no_grad():
        q = model.encode_query(x)
        size = 8 // splits
        per_process = torch.cat([model.encoder_q(x[i:i + size]) for i in range(0, 8, size)])
        whole_batch = model.encoder_q(x)
    torch.testing.assert_close(q, per_process, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(q, whole_batch, atol=1e-3)
    # the training step's queries are the per-process ones
    out = model(x, torch.randn(8, 3, 4, 32, 32))
    torch.testing.assert_close(out["q"], F.normalize(per_process, dim=1), rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():  # eval mode: running statistics, no split needed
        torch.testing.assert_close(model.encode_query(x), model.encoder_q(x), rtol=1e-5, atol=1e-6)


def test_encode_key_uses_sub_batch_statistics_in_train_mode():
    model = models.VideoMoCo(TINY, dim=8, K=16, shuffle_splits=2).train()
    x = torch.randn(6, 3, 4, 32, 32)
    torch.manual_seed(11)
    keys = F.normalize(model.encode_key(x), dim=1)
    with torch.no_grad():
        one_batch = F.normalize(model.encoder_k(x), dim=1)
        torch.manual_seed(11)
        perm = torch.randperm(6)
        halves = [model.encoder_k(x[perm[:3]]), model.encoder_k(x[perm[3:]])]
    by_halves = F.normalize(torch.cat(halves)[perm.argsort()], dim=1)
    assert not torch.allclose(keys, one_batch, atol=1e-3)
    torch.testing.assert_close(keys, by_halves, rtol=1e-5, atol=1e-6)


def test_a_process_group_of_one_is_a_world_of_one(tmp_path):
    # DDP on one GPU initialises a group of one: the shuffle-BN emulation must stay (no peer to
    # shuffle with), the same keys and queries as with no group at all
    torch.manual_seed(14)
    model = models.VideoMoCo(TINY, dim=8, K=16, shuffle_splits=2).train()
    x = torch.randn(6, 3, 4, 32, 32)
    outputs = []
    for group in (False, True):
        if group:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                    world_size=1)
        try:
            torch.manual_seed(15)  # the key shuffle's permutation
            with torch.no_grad():
                outputs.append((model.encode_key(x), model.encode_query(x)))
        finally:
            if group:
                dist.destroy_process_group()
    for alone, in_group in zip(*outputs):
        torch.testing.assert_close(in_group, alone, rtol=0, atol=0)


def _distributed_worker(rank, world_size, port, x, keys, state, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = models.VideoMoCo(TINY, dim=4, K=7).eval()
    model.load_state_dict(state)
    n = x.shape[0] // world_size
    local = slice(rank * n, (rank + 1) * n)
    torch.manual_seed(rank)  # the shuffle must come from rank 0's permutation, not the local seed
    encoded = F.normalize(model.encode_key(x[local]), dim=1)
    model.dequeue_and_enqueue(keys[local])
    torch.save({"keys": encoded, "queue": model.queue, "age": model.queue_age,
                "ptr": model.queue_ptr}, os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_shuffle_and_enqueue(tmp_path):
    torch.manual_seed(12)
    model = models.VideoMoCo(TINY, dim=4, K=7).eval()
    x, keys = torch.randn(6, 3, 4, 32, 32), torch.arange(6.0)[:, None].repeat(1, 4)
    mp.spawn(_distributed_worker,
             args=(2, free_port(), x, keys, model.state_dict(), str(tmp_path)),
             nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    with torch.no_grad():
        expected = torch.cat([F.normalize(model.encoder_k(x[i:i + 1]), dim=1) for i in range(6)])
    torch.testing.assert_close(torch.cat([r["keys"] for r in results]), expected,
                               rtol=1e-5, atol=1e-6)
    model.dequeue_and_enqueue(keys)  # one process, the global batch in rank order
    for r in results:
        assert torch.equal(r["queue"], model.queue)
        assert torch.equal(r["age"], model.queue_age)
        assert torch.equal(r["ptr"], model.queue_ptr)


def _shuffle_bn_worker(rank, world_size, port, x, state, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = models.VideoMoCo(TINY, dim=4, K=7).train()
    model.load_state_dict(state)
    n = x.shape[0] // world_size
    local = x[rank * n:(rank + 1) * n]
    torch.manual_seed(100 + rank)  # rank 0's permutation is the one drawn after manual_seed(100)
    with torch.no_grad():
        keys = model.encode_key(local)
        queries = model.encode_query(local)
    torch.save({"keys": keys, "queries": queries}, os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_shuffle_bn_matches_per_process_batches(tmp_path):
    # MoCo's shuffle-BN in train mode, 2 gloo processes of 4 clips: each process normalises a shard
    # of the globally shuffled batch (rank 0's permutation) with that shard's batch statistics, and
    # gets its own clips' keys back in order; the queries use each process's own batch
    torch.manual_seed(13)
    model = models.VideoMoCo(TINY, dim=4, K=7)
    x = torch.randn(8, 3, 4, 32, 32)
    mp.spawn(_shuffle_bn_worker, args=(2, free_port(), x, model.state_dict(), str(tmp_path)),
             nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    torch.manual_seed(100)
    perm = torch.randperm(8)
    encoder_k, encoder_q = model.encoder_k.train(), model.encoder_q.train()
    with torch.no_grad():
        shuffled = torch.cat([encoder_k(x[perm[:4]]), encoder_k(x[perm[4:]])])
        expected = shuffled[perm.argsort()]
        unshuffled = torch.cat([encoder_k(x[:4]), encoder_k(x[4:])])
        queries = torch.cat([encoder_q(x[:4]), encoder_q(x[4:])])
    assert not torch.equal(perm, torch.arange(8))
    assert not torch.allclose(expected, unshuffled, atol=1e-3)  # the shuffle changes the keys
    torch.testing.assert_close(torch.cat([r["keys"] for r in results]), expected,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["queries"] for r in results]), queries,
                               rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# models.py: encoders, residual input, the projection head


TORCHVISION_ARCHS = ("r3d_18", "r2plus1d_18", "mc3_18")


@pytest.mark.parametrize("arch", models.ARCHS)
def test_encoder_shapes(arch):
    torch.manual_seed(13)
    encoder = models.build_encoder(arch, 16).eval()
    with torch.no_grad():
        for shape in [(2, 3, 4, 32, 32), (1, 3, 5, 32, 48)]:
            assert encoder(torch.randn(shape)).shape == (shape[0], 16)
        assert isinstance(encoder.fc, nn.Linear) and encoder.fc.out_features == 16
        width = encoder.fc.in_features
        encoder.fc = nn.Identity()
        assert encoder(torch.randn(2, 3, 4, 32, 32)).shape == (2, width)
    print(arch, "parameters without fc:", models.count_parameters(encoder))


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS + ("r3d_10", "r2plus1d_10"))
def test_encoder_state_dict_loads_into_torchvision(arch):
    encoder = models.build_encoder(arch, 16)
    if arch in TORCHVISION_ARCHS:
        reference = getattr(torchvision.models.video, arch)(num_classes=16)
    elif arch == "r3d_10":
        reference = VideoResNet(BasicBlock, [Conv3DSimple] * 4, [1, 1, 1, 1], BasicStem,
                                num_classes=16)
    else:
        reference = VideoResNet(BasicBlock, [Conv2Plus1D] * 4, [1, 1, 1, 1], R2Plus1dStem,
                                num_classes=16)
    reference.load_state_dict(encoder.state_dict(), strict=True)
    assert models.count_parameters(reference) == models.count_parameters(encoder)


def test_parameter_counts():
    counts = {}
    for arch in ("r3d_10", "r2plus1d_10"):
        encoder = models.build_encoder(arch, 128)
        counts[arch] = models.count_parameters(encoder) - models.count_parameters(encoder.fc)
    print("parameters without fc:", counts)
    assert counts == {"r3d_10": 14_361_792, "r2plus1d_10": 12_487_005}


def test_residual_frames_are_differences_of_the_augmented_frames():
    x = torch.randn(2, 3, 5, 4, 4)
    d = models.residual_frames(x)
    assert d.shape == x.shape
    for n in range(2):
        for t in range(5):
            # last: repeated
            expected = x[n, :, t + 1] - x[n, :, t] if t < 4 else x[n, :, 4] - x[n, :, 3]
            assert torch.equal(d[n, :, t], expected)
    torch.manual_seed(0)
    rgb = models.build_encoder("tiny", 8).eval()
    residual = models.encoder_builder("tiny", input="residual")(num_classes=8).eval()
    assert residual.input_mode == "residual"
    residual.load_state_dict(rgb.state_dict())  # same parameters, same keys: the mode is no weight
    clip = torch.randn(2, 3, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(residual(clip), rgb(models.residual_frames(clip)))
        # static appearance is invisible to it: two motionless clips of different content look alike
        still_a = torch.randn(2, 3, 1, 32, 32).expand(-1, -1, 6, -1, -1)
        still_b = torch.randn(2, 3, 1, 32, 32).expand(-1, -1, 6, -1, -1)
        assert torch.equal(residual(still_a), residual(still_b))
        assert not torch.allclose(rgb(still_a), rgb(still_b))


def test_linear_head_learns_noise_patterns_where_the_classifier_init_collapses():
    # The cause of the pretraining that did not learn, isolated (issue 10's 30-line MoCo loop): 64
    # noise patterns, two noisy views each, K 128. The same linear head memorises them with
    # nn.Linear's init and collapses to ln(K+1) with the normal(0, 0.01) init of 385ac2d.
    def loss_over_chance(classifier_init):
        torch.manual_seed(0)
        model = models.VideoMoCo(TINY, dim=128, K=128, m=0.99, tau=0.07, decay=1.0, mlp=False)
        if classifier_init:
            for enc in (model.encoder_q, model.encoder_k):
                nn.init.normal_(enc.fc.weight, 0, 0.01)
                nn.init.zeros_(enc.fc.bias)
        patterns = torch.randn(64, 3, 8, 32, 32)
        opt = torch.optim.SGD(model.encoder_q.parameters(), 0.05, momentum=0.9, weight_decay=1e-4)
        losses = []
        for _ in range(48):
            x = patterns[torch.randperm(64)[:16]]
            out = model(x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x))
            opt.zero_grad()
            out["loss_d"].backward()
            opt.step()
            losses.append(out["loss_d"].item())
        return sum(losses[-12:]) / 12 / math.log(129)

    assert loss_over_chance(classifier_init=False) < 0.5  # measured 0.16
    assert loss_over_chance(classifier_init=True) > 0.95  # measured 1.00: collapsed


def test_projection_head_has_nn_linear_default_init_not_the_classifier_init():
    # A head with torchvision's video classifier init, normal(0, 0.01), has 6-25x the effective
    # learning rate of nn.Linear's default on an L2-normalised
    # output, and collapses (projection_head)
    torch.manual_seed(0)
    for mlp in (False, True):
        model = models.VideoMoCo(TINY, dim=128, K=16, mlp=mlp)
        linears = [m for m in model.encoder_q.fc.modules() if isinstance(m, nn.Linear)]
        assert len(linears) == (2 if mlp else 1)
        for layer in linears:
            # std of U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            expected = 1 / math.sqrt(3 * layer.in_features)
            assert layer.weight.std().item() == pytest.approx(expected, rel=0.1)
    cvrl_fc = methods.CVRL(TINY, dim=8, hidden=32).encoder_q.fc
    default_std = 1 / math.sqrt(3 * cvrl_fc.in_features)
    assert cvrl_fc.weight.std().item() == pytest.approx(default_std, rel=0.1)


def test_mlp_head_is_linear_relu_linear():
    # MoCo v2's head: without its ReLU the two layers are one linear map (mutmut: the ReLU removed)
    torch.manual_seed(0)
    head = models.projection_head(12, 5, mlp=True)
    x = torch.randn(7, 12)
    first, last = head[0], head[-1]
    expected = F.linear(F.linear(x, first.weight, first.bias).clamp(min=0), last.weight, last.bias)
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_encoders_are_built_as_torchvision_builds_and_initialises_them():
    # the 18-layer archs are torchvision's own, with the given classes; the tiny encoder has no
    # conv bias and VideoResNet's init: kaiming normal (fan_out, relu) convs, normal(0, 0.01) fc
    for arch in ("r3d_18", "r2plus1d_18", "mc3_18"):
        encoder = models.build_encoder(arch, 7)
        reference = getattr(torchvision.models.video, arch)(weights=None, num_classes=7)
        assert type(encoder) is type(reference) and encoder.fc.out_features == 7
        assert [n for n, _ in encoder.named_parameters()] == [
            n for n, _ in reference.named_parameters()]
    torch.manual_seed(0)
    encoder = models.build_encoder("tiny", 9)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(m.bias is None for m in convs)
    # its docstring's four stages, the stem keeping the time axis at full length
    assert [(m.out_channels, m.kernel_size, m.stride, m.padding) for m in convs] == [
        (16, (3, 3, 3), (1, 2, 2), (1, 1, 1))] + [
        (c, (3, 3, 3), (2, 2, 2), (1, 1, 1)) for c in (32, 64, 128)]
    for m in convs[1:]:  # enough weights for a std within 10 %
        fan_out = m.out_channels * math.prod(m.kernel_size)
        assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
        assert abs(m.weight.mean().item()) < 0.1 * math.sqrt(2 / fan_out)
    assert encoder.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert abs(encoder.fc.weight.mean().item()) < 0.002
    assert torch.equal(encoder.fc.bias, torch.zeros(9))


def test_unknown_arch_or_input_is_a_one_line_error():
    with pytest.raises(ValueError) as error:
        models.build_encoder("r4d", 8)
    assert str(error.value) == ("unknown arch 'r4d'; expected one of "
                                "tiny, r3d_10, r2plus1d_10, r3d_18, r2plus1d_18, mc3_18")
    with pytest.raises(ValueError) as error:
        models.build_encoder("tiny", 8, input="RGB")
    assert str(error.value) == "unknown input 'RGB'; expected one of rgb, residual"


# -----------------------------------------------------------------------------
# models.py: mixed precision


def test_autocast_bfloat16_forward():
    torch.manual_seed(14)
    model = models.VideoMoCo(TINY, dim=8, K=16)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    x = torch.randn(4, 3, 8, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, x_query, x_query_in = adversarial_forward(model, generator, x, x, 2)
    assert out["loss_d"].dtype == torch.float32 and torch.isfinite(out["loss_d"])
    assert out["loss_g"].dtype == torch.float32 and torch.isfinite(out["loss_g"])
    assert model.queue.dtype == torch.float32 and int(model.queue_ptr) == 4
    models.adversarial_backward(out["loss_d"], out["loss_g"], x_query, x_query_in,
                                model.encoder_q.parameters())
    assert all(torch.isfinite(p.grad).all() for p in generator.parameters())


# -----------------------------------------------------------------------------
# pretrain.py: the whole step against MoCo's Algorithm 1 plus Eq 3-6, written out here


class NaiveVideoMoCo:
    """The step from the papers alone, one key and one term at a time: its own copies of
    theta_q, theta_k and G; Eq 3's hard top-k with the straight-through mask; Eq 2 before the key
    forward (MoCo's Algorithm 1); Eq 6 against the queue as it was, float64; Eq 4; each loss
    differentiated for its own player only (D by Eq 6, G by Eq 4); SGD written out; the keys
    enqueued one at a time, every age + 1, the new key's 1."""

    def __init__(self, model, generator, m, tau, K, lr, k_drop):
        self.enc_q = copy.deepcopy(model.encoder_q)
        self.enc_k = copy.deepcopy(model.encoder_k)
        self.gen = copy.deepcopy(generator)
        self.m = m
        self.tau = tau
        self.K = K
        self.lr = lr
        self.k_drop = k_drop
        self.queue = model.queue.clone()  # (dim, K) in slot order
        self.age = [int(a) for a in model.queue_age]
        self.ptr = int(model.queue_ptr)
        self.buf_d = [None] * len(list(self.enc_q.parameters()))
        self.buf_g = [None] * len(list(self.gen.parameters()))

    def drop(self, x, importance):
        n, t = importance.shape
        rows = []
        for i in range(n):
            order = sorted(range(t), key=lambda j: -importance[i, j].item())
            thr = (importance[i, order[self.k_drop - 1]].item()
                   + importance[i, order[self.k_drop]].item()) / 2
            row = []
            for j in range(t):
                hard = 1.0 if j in order[:self.k_drop] else 0.0
                soft = torch.sigmoid(importance[i, j] - thr)
                row.append(hard + soft - soft.detach())
            rows.append(torch.stack(row))
        mask = torch.stack(rows)  # (N, T)
        return x * (1 - mask)[:, None, :, None, None]

    def loss_d(self, q, k, decay):
        q, k, queue = q.double(), k.double(), self.queue.double()
        losses, hits = [], 0
        for n in range(q.shape[0]):
            pos = torch.exp(torch.dot(q[n], k[n]) / self.tau)
            negs = [decay ** self.age[j] * torch.exp(torch.dot(q[n], queue[:, j]) / self.tau)
                    for j in range(self.K)]
            losses.append(-torch.log(pos / (pos + sum(negs))))
            hits += int(all(pos > neg for neg in negs))  # the positive is the largest term
        return sum(losses) / len(losses), hits / len(losses)

    def sgd(self, params, grads, buffers, weight_decay):
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                d = g + weight_decay * p
                buffers[i] = d.clone() if buffers[i] is None else 0.9 * buffers[i] + d
                p -= self.lr * buffers[i]

    def step(self, x, x_key, adversarial, decay):
        x_query = self.drop(x, self.gen(x)) if adversarial else x
        q = F.normalize(self.enc_q(x_query), dim=1)
        with torch.no_grad():
            for p_k, p_q in zip(self.enc_k.parameters(), self.enc_q.parameters()):  # Eq 2
                p_k.copy_(self.m * p_k + (1 - self.m) * p_q)
            k = F.normalize(self.enc_k(x_key), dim=1)
        loss_d, acc = self.loss_d(q, k, decay)
        result = {"loss_d": loss_d.item(), "acc": acc, "loss_g": None, "grad_g": None}
        if adversarial:
            with torch.no_grad():
                q_full = F.normalize(self.enc_q(x), dim=1)
            loss_g = -sum((q[n] - q_full[n]).abs().sum() for n in range(len(q))) / len(q)
            grad_g = torch.autograd.grad(loss_g, list(self.gen.parameters()), retain_graph=True)
            result.update(loss_g=loss_g.item(), grad_g=grad_g)
        grad_d = torch.autograd.grad(loss_d, list(self.enc_q.parameters()))
        self.sgd(list(self.enc_q.parameters()), grad_d, self.buf_d, 1e-4)
        if adversarial:
            self.sgd(list(self.gen.parameters()), grad_g, self.buf_g, 0.0)
        for key in k:  # enqueue after the loss, one key at a time
            self.queue[:, self.ptr] = key
            self.age = [a + 1 for a in self.age]
            self.age[self.ptr] = 1
            self.ptr = (self.ptr + 1) % self.K
        return result


def test_whole_step_matches_moco_algorithm_1_and_eq3_to_6_written_out():
    # pretrain.train_step through VideoMoCo.forward and adversarial_backward, two MoCo steps
    # (Eq 1) then three adversarial ones (Eq 3-6), against NaiveVideoMoCo: the losses, G's
    # gradient, both encoders' weights and BN statistics, G's, the queue, its ages and pointer.
    # K = 12 against 4 keys a step: the queue wraps. t = 0.8 passed by the step; the model's own
    # default (0.5) would be a different loss. One process (shuffle_splits=1: shuffle-BN is its
    # own test)
    torch.manual_seed(0)
    model = models.VideoMoCo(TINY, dim=8, K=12, m=0.9, tau=0.2, decay=0.5, shuffle_splits=1)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    lr = 0.5
    k_drop = 3
    naive = NaiveVideoMoCo(model, generator, m=0.9, tau=0.2, K=12, lr=lr, k_drop=k_drop)
    opt_d = torch.optim.SGD(model.encoder_q.parameters(), lr, momentum=0.9, weight_decay=1e-4)
    opt_g = torch.optim.SGD(generator.parameters(), lr, momentum=0.9)
    args = argparse.Namespace(method="videomoco", background_erasing=0, drop_frames=k_drop)
    guard = types.SimpleNamespace(agree=lambda finite: bool(finite))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(1)
    accs = []  # (the step's, the naive one's)
    for step, (adversarial, decay) in enumerate([(False, 1.0)] * 2 + [(True, 0.8)] * 3):
        x = torch.randn(4, 3, 8, 32, 32, generator=gen)
        x_key = x + 0.3 * torch.randn(x.shape, generator=gen)
        run = pretrain.Run(args, model, generator, opt_d, opt_g, contextlib.nullcontext(), scaler,
                           guard)
        phase = "adversarial" if adversarial else "moco"
        out = pretrain.train_step(run, torch.stack([x, x_key], dim=1), [], phase, decay,
                                  measure_random=adversarial)
        expected = naive.step(x, x_key, adversarial, decay)
        if adversarial:  # Table 1's yardstick, on a copy: the comparisons below see no trace of it
            assert 0 < out["l1_random"].item() < 2 * math.sqrt(8)  # unit vectors, 8 dimensions
        assert out["updated"]
        assert out["loss_d"].item() == pytest.approx(expected["loss_d"], rel=1e-5), step
        accs.append((out["acc"].item(), expected["acc"]))
        if adversarial:
            # -Eq 4 is a small difference of unit vectors (3e-3 to 6e-3 here), and both sides
            # are float32 forwards summed in different orders: they differ by up to 1.1e-7
            # (Intel Xeon, 2026-12-04), 2e-5 of the value. abs=3e-7 is 3x that; Eq 4 with the
            # squared L2 norm for L1 reads -8e-6 for -6e-3
            expected_g = pytest.approx(expected["loss_g"], rel=1e-5, abs=3e-7)
            assert out["loss_g"].item() == expected_g, step
            for p, g in zip(generator.parameters(), expected["grad_g"]):
                torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
        else:
            assert out["loss_g"] is None
        for mine, ref in ((model.encoder_q, naive.enc_q), (model.encoder_k, naive.enc_k),
                          (generator, naive.gen)):
            for (name, a), b in zip(mine.state_dict().items(), ref.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")
        torch.testing.assert_close(model.queue, naive.queue, rtol=1e-5, atol=1e-6)
        assert model.queue_age.tolist() == naive.age, step
        assert int(model.queue_ptr) == naive.ptr, step
    assert naive.ptr == 20 % 12  # 20 keys through a queue of 12: it wrapped
    mine, theirs = zip(*accs)
    assert mine == pytest.approx(theirs)  # (all 1 here: test_forward_acc_counts_... has misses)


def test_forward_acc_counts_the_queries_whose_positive_beats_every_weighted_negative():
    # the logged top-1 of Eq 6's logits: a query scores when exp(q.k+ / tau) exceeds every
    # t^age exp(q.k_j / tau) of the queue as it was; unrelated keys, so that some queries miss
    torch.manual_seed(3)
    model = models.VideoMoCo(TINY, dim=8, K=12, tau=0.2, decay=0.9, shuffle_splits=1)
    queue, age = model.queue.clone(), model.queue_age.clone()
    out = model(torch.randn(16, 3, 4, 16, 16), torch.randn(16, 3, 4, 16, 16))
    hits = 0
    for n in range(16):
        q = out["q"][n].detach()
        pos = math.exp(float(q @ out["k"][n]) / 0.2)
        hits += all(pos > 0.9 ** int(age[j]) * math.exp(float(q @ queue[:, j]) / 0.2)
                    for j in range(12))
    assert 0 < hits < 16
    assert out["acc"].item() == pytest.approx(hits / 16)


@pytest.mark.parametrize("method", ["cvrl", "vclr", "random-drop"])
def test_train_step_erases_the_query_view_and_feeds_each_method_its_inputs(method):
    # pretrain.train_step with --background-erasing 0.5 for CVRL, VCLR (the erasing reaches every
    # clip of the anchor tuple) and Table 1's random-drop row, against the same step written out:
    # the query view erased (and k random frames dropped), the key view as it was, one SGD step
    # of the method's loss. The same seed before both: the erasing and the drop draw from it
    torch.manual_seed(40)
    n, s, k_drop, p = 6, 3, 2, 0.5
    extra = []
    if method == "cvrl":
        model = methods.CVRL(TINY, dim=8, hidden=16)
        video = torch.randn(n, 2, 3, 6, 16, 16)
    elif method == "vclr":
        model = methods.VCLR(TINY, dim=8, K=16, segments=s, m=0.9)
        video = torch.randn(n, 2, s, 3, 6, 16, 16)
        extra = [torch.zeros(n, dtype=torch.long), torch.arange(s).repeat(n, 2, 1)]
    else:
        model = models.VideoMoCo(TINY, dim=8, K=16, m=0.9, tau=0.2, decay=1.0, shuffle_splits=1)
        video = torch.randn(n, 2, 3, 6, 16, 16)
    model.train()
    reference = copy.deepcopy(model)
    lr = 0.5
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr)
    args = argparse.Namespace(method="videomoco" if method == "random-drop" else method,
                              background_erasing=p, drop_frames=k_drop)
    guard = types.SimpleNamespace(agree=lambda finite: bool(finite))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs, kwargs: seen.append((inputs, kwargs)),
                                    with_kwargs=True)
    torch.manual_seed(41)
    run = pretrain.Run(args, model, None, opt, None, contextlib.nullcontext(), scaler, guard)
    out = pretrain.train_step(run, video, extra, method, 1.0)  # the phase: the method's own
    torch.manual_seed(41)
    x = video[:, 0].clone()
    clips = x.view(-1, *x.shape[-4:])  # (N*S, 3, T, H, W) for VCLR: every clip of the tuple
    erased, lam, _ = methods.background_erasing(clips, p)
    for c in range(clips.shape[0]):
        clips[c] = erased[c]
    if method == "random-drop":
        x, mask = models.random_drop(x, k_drop)
        assert (mask.sum(dim=1) == k_drop).all()
    (query, key, *rest), kwargs = seen[0]
    assert 0 < int((lam > 0).sum()) < clips.shape[0]  # some clips erased, some not
    if method == "vclr":
        assert (lam.view(n, s)[:, 1:] > 0).any()  # beyond the first clip of a tuple
    torch.testing.assert_close(query, x, rtol=0, atol=0)
    assert torch.equal(key, video[:, 1])  # the key view is never erased
    assert len(seen) == 1 and len(rest) == len(extra)
    assert all(torch.equal(a, b) for a, b in zip(rest, extra))
    if method == "random-drop":
        assert kwargs["adversarial"] is False and kwargs["decay"] == 1.0  # D alone, Eq 1
    assert "l1_random" not in out  # measured in the adversarial phase only
    if method == "random-drop":
        expected = reference(x, video[:, 1], decay=1.0)
    else:
        expected = reference(x, video[:, 1], *extra)
    loss = expected["loss_d"]
    loss.backward()
    assert out["updated"] and out["loss_g"] is None
    assert out["loss_d"].item() == pytest.approx(loss.item(), rel=1e-6)
    moved = 0
    for (name, mine), ref in zip(model.named_parameters(), reference.parameters()):
        if ref.grad is not None:
            moved += int(ref.grad.abs().sum() > 0)
            with torch.no_grad():
                ref -= lr * ref.grad
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6, msg=name)
    assert moved > 0
