"""
methods.py: the methods compared on the same code, CVRL and VCLR (their positive pairs, losses and
models, each against a loop), and background erasing.
"""

import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import data
import methods
import models
from testlib import (TINY, free_port, clip_embedding, fit_batchnorm, frame_index,
                     naive_cross_entropy, naive_decayed_infonce, naive_nt_xent, unit,
                     write_index_video)


# -----------------------------------------------------------------------------
# methods.py: the positive pairs of CVRL and VCLR


@pytest.mark.parametrize("shape", methods.INTERVALS)
def test_cvrl_interval_distribution_matches_its_definition(shape):
    rng = np.random.default_rng(0)
    n, span, draws = 60, 11, 20000
    last = n - span
    d = []
    for _ in range(draws):
        a, b = methods.cvrl_starts(rng, n, span, shape)
        assert 0 <= a <= last and 0 <= b <= last
        d.append(abs(b - a))
    counts = np.bincount(d, minlength=last + 1)
    # the definition, written out: weight of distance d
    weight = np.array([{"linear": last + 1 - k, "quadratic": (last + 1 - k) ** 2,
                        "uniform": 1}[shape]
                       for k in range(last + 1)], dtype=float)
    expected = draws * weight / weight.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 100  # df = 49: p ~ 3e-5 under the null; a wrong shape gives thousands
    if shape != "uniform":
        wrong = draws * np.ones(last + 1) / (last + 1)
    else:
        wrong = draws * weight[::-1] / weight.sum()
    assert shape == "uniform" or ((counts - wrong) ** 2 / wrong).sum() > 1000
    if shape != "uniform":
        assert np.all(np.diff(methods.interval_probs(last, shape)) < 0)  # monotonically decreasing


def naive_tuple_candidates(n, span, segments):
    """The start frames a clip of segment j of VCLR's tuple may take, by a loop over the frames: a
    frame f is in segment j when j n / S <= f < (j + 1) n / S; the starts whose clip ends inside
    the segment where two or more do, else the segment's starts whose clip ends in the video (or
    its first frame if none)."""
    out = []
    for j in range(segments):
        frames = [f for f in range(n) if j * n / segments <= f < (j + 1) * n / segments]
        inside = [f for f in frames if f + span - 1 <= frames[-1]]
        out.append(inside if len(inside) >= 2 else
                   [f for f in frames if f + span <= n] or frames[:1])
    return out


@pytest.mark.parametrize("n,span,segments", [(90, 8, 3), (100, 16, 4), (31, 4, 3), (48, 16, 3),
                                             (7, 4, 3)])
def test_tuple_starts_are_distinct_uniform_draws_of_each_segment(n, span, segments):
    # (48, 16, 3): no segment holds two clips, so they run on; (7, 4, 3): the last segment offers
    # one start only, which anchor and positive then share
    rng = np.random.default_rng(1)
    candidates = naive_tuple_candidates(n, span, segments)
    counts = [dict.fromkeys(c, 0) for c in candidates]
    for _ in range(3000):
        anchor, positive, distinct = methods.tuple_starts(rng, n, span, segments)
        assert distinct == all(len(c) >= 2 for c in candidates)
        for j, (a, p) in enumerate(zip(anchor, positive)):
            assert a in candidates[j] and p in candidates[j]
            assert a != p or len(candidates[j]) == 1  # two distinct positions where there are two
            counts[j][a] += 1
            counts[j][p] += 1
    for c in counts:  # each start as likely as the others: chi-square against uniform
        observed = np.array(list(c.values()), float)
        expected = observed.sum() / len(observed)
        assert ((observed - expected) ** 2 / expected).sum() < 3 * len(observed) + 30


def test_order_shuffle_is_never_the_order_or_its_reverse():
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(400):
        perm, shuffled = methods.order_shuffle(rng, 3)
        assert shuffled == (perm != [0, 1, 2]) and perm != [2, 1, 0]
        seen.add(tuple(perm))
    assert seen == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1)}
    with pytest.raises(ValueError, match="at least 3 segments"):
        methods.order_shuffle(rng, 2)


class _NoAugment:
    """Frames to a normalised tensor untouched, so the test can read the frame indices back."""
    crop = 48

    def __call__(self, frames, rng):
        return data.to_tensor(frames)


def test_vclr_tuples_have_one_clip_per_segment_and_order_labels_match_the_shuffle(tmp_path):
    path = write_index_video(str(tmp_path / "v.avi"), 120)
    dataset = data.VideoClips([(path, 0)], frames=4, stride=1, transform=_NoAugment(),
                              pair=methods.VCLRTuples(3))
    labels = set()
    for seed in range(40):
        sample, = dataset[(0, seed)]
        video = sample["video"]  # (2, S, 3, T, H, W)
        assert video.shape[:4] == (2, 3, 3, 4)
        shuffled, by_segment = [], []
        for tuple_, segments in zip(video, sample["segments"].tolist()):
            starts = []
            for clip in tuple_:
                frames = (data.denormalize(clip).clamp(0, 1) * 255).round().byte()
                frames = frames.permute(1, 2, 3, 0).numpy()
                idx = [frame_index(f) for f in frames]
                assert idx == list(range(idx[0], idx[0] + 4))  # a clip of consecutive frames
                starts.append(idx[0])
            assert sorted(s // 40 for s in starts) == [0, 1, 2]  # one clip in each segment
            assert [s // 40 for s in starts] == segments  # and "segments" says which
            shuffled.append(starts != sorted(starts))
            by_segment.append(sorted(starts))
        # the anchor's and the positive's clip of a segment start at distinct frames
        assert all(a != p for a, p in zip(*by_segment))
        assert sample["order"] == int(shuffled[0]) + 2 * int(shuffled[1])
        labels.add(sample["order"])
    assert labels == {0, 1, 2, 3}


def test_cvrl_pair_clips_come_from_two_positions(tmp_path):
    path = write_index_video(str(tmp_path / "v.avi"), 100)
    dataset = data.VideoClips([(path, 0)], frames=4, stride=1, transform=_NoAugment(),
                              pair=methods.CVRLPair())
    distances = []
    for seed in range(30):
        video = dataset[(0, seed)][0]["video"]  # (2, 3, T, H, W)
        firsts = [(data.denormalize(v[:, 0]).clamp(0, 1) * 255).round().byte() for v in video]
        first = [frame_index(f.permute(1, 2, 0).numpy()) for f in firsts]
        distances.append(abs(first[0] - first[1]))
    # decreasing: short distances dominate
    assert max(distances) > 0 and np.mean(distances) < (100 - 4) / 2


# -----------------------------------------------------------------------------
# methods.py: nt_xent (CVRL / SimCLR)


@pytest.mark.parametrize("n", [1, 3, 6])
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop(n, tau):
    torch.manual_seed(20 + n)
    z1, z2 = torch.randn(n, 8) * 3, torch.randn(n, 8)  # not normalised: nt_xent normalises
    loss, acc = methods.nt_xent(z1, z2, tau)
    expected_loss, expected_acc = naive_nt_xent(z1, z2, tau)
    assert loss.dtype == torch.float32 and not acc.requires_grad
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    assert acc.item() == pytest.approx(expected_acc)
    if n == 1:
        assert loss.item() == pytest.approx(0.0, abs=1e-6)  # the positive is the only other view


def test_nt_xent_accuracy_matches_loop():
    torch.manual_seed(21)
    z1 = torch.randn(8, 4)
    # half of the second views are near their first view, half
    # random: accuracy strictly inside (0, 1)
    z2 = torch.cat([z1[:4] + 0.05 * torch.randn(4, 4), torch.randn(4, 4)])
    loss, acc = methods.nt_xent(z1, z2, 0.2)
    expected_loss, expected_acc = naive_nt_xent(z1, z2, 0.2)
    assert 0 < expected_acc < 1
    assert acc.item() == pytest.approx(expected_acc)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)


def test_nt_xent_swapping_views_or_clips_keeps_the_loss():
    torch.manual_seed(22)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    loss, _ = methods.nt_xent(z1, z2, 0.1)
    perm = torch.randperm(5)
    torch.testing.assert_close(methods.nt_xent(z2, z1, 0.1)[0], loss)
    torch.testing.assert_close(methods.nt_xent(z1[perm], z2[perm], 0.1)[0], loss)
    # pairing matters: shifting the second views pairs every clip with another clip's view
    assert not torch.allclose(methods.nt_xent(z1, z2.roll(1, 0), 0.1)[0], loss)


def reference_rows_loss(z1, z2, tau, clips):
    """The loss of nt_xent averaged over the views of `clips` only, against the whole batch, in
    torch ops (differentiable), float64."""
    b = z1.shape[0]
    views = F.normalize(torch.cat([z1, z2]).double(), dim=1)  # (2B, dim)
    anchors = torch.tensor(list(clips) + [c + b for c in clips])
    logits = views[anchors] @ views.T / tau
    logits[torch.arange(len(anchors)), anchors] = float("-inf")
    return F.cross_entropy(logits, (anchors + b) % (2 * b))


def _nt_xent_worker(rank, world_size, port, z1, z2, tau, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    n = z1.shape[0] // world_size
    local = slice(rank * n, (rank + 1) * n)
    z1_local = z1[local].clone().requires_grad_()
    z2_local = z2[local].clone().requires_grad_()
    loss, acc = methods.nt_xent(z1_local, z2_local, tau)
    loss.backward()
    torch.save({"loss": loss.detach(), "acc": acc, "grad1": z1_local.grad, "grad2": z2_local.grad},
               os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_nt_xent_distributed_matches_global_batch(tmp_path):
    torch.manual_seed(23)
    world, n, tau = 2, 3, 0.2
    z1 = torch.randn(world * n, 8)
    # some easy, some hard pairs
    z2 = torch.cat([z1[:2] + 0.1 * torch.randn(2, 8), torch.randn(4, 8)])
    mp.spawn(_nt_xent_worker, args=(world, free_port(), z1, z2, tau, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]

    # each rank's loss: its own views against all 2B - 1 other views of the global batch
    for rank, r in enumerate(results):
        clips = range(rank * n, (rank + 1) * n)
        expected_loss, expected_acc = naive_nt_xent(z1, z2, tau, clips)
        assert r["loss"].item() == pytest.approx(expected_loss, rel=1e-5)
        assert r["acc"].item() == pytest.approx(expected_acc)
    global_loss = methods.nt_xent(z1, z2, tau)[0]
    mean_loss = (sum(r["loss"] for r in results) / world).item()
    assert mean_loss == pytest.approx(global_loss.item(), rel=1e-5)

    # Gradient: each rank backpropagates its own loss L_r, and gather_with_grad sums the gradients
    # of all ranks' losses into the owner's rows, so grad_r = d(sum_r L_r)/dz_r = world * dL/dz_r
    # with L the global mean. DDP then averages the parameter
    # gradients over ranks: the result is dL/dtheta.
    g1, g2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    methods.nt_xent(g1, g2, tau)[0].backward()
    for rank, r in enumerate(results):
        local = slice(rank * n, (rank + 1) * n)
        torch.testing.assert_close(r["grad1"], world * g1.grad[local], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["grad2"], world * g2.grad[local], rtol=1e-4, atol=1e-6)
        # a gather whose backward keeps only the local loss's gradient (the frequent SimCLR bug)
        # would give this instead, which differs: the other rank's negatives push on our rows too
        l1, l2 = z1.clone().double().requires_grad_(), z2.clone().double().requires_grad_()
        keep = torch.zeros(world * n, 1, dtype=torch.double)
        keep[local] = 1
        only_local = reference_rows_loss(l1 * keep + (l1 * (1 - keep)).detach(),
                                         l2 * keep + (l2 * (1 - keep)).detach(), tau,
                                         range(rank * n, (rank + 1) * n))
        only_local.backward()
        assert not torch.allclose(r["grad1"].double(), l1.grad[local], rtol=1e-3, atol=1e-5)


# -----------------------------------------------------------------------------
# methods.py: CVRL


def test_cvrl_structure_and_gradients():
    torch.manual_seed(24)
    model = methods.CVRL(TINY, dim=8, hidden=32)
    assert isinstance(model.encoder_q.fc, nn.Linear) and model.encoder_q.fc.out_features == 32
    assert [type(m) for m in model.head] == [nn.BatchNorm1d, nn.ReLU, nn.Linear,
                                             nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert model.head[-1].out_features == 8 and model.tau == 0.1
    assert not hasattr(model, "queue") and not hasattr(model, "encoder_k")
    out = model(torch.randn(4, 3, 4, 16, 16), torch.randn(4, 3, 4, 16, 16))
    assert torch.isfinite(out["loss_d"]) and not out["acc"].requires_grad
    out["loss_d"].backward()
    for name, param in [("conv", model.encoder_q.features[0].weight),
                        ("fc", model.encoder_q.fc.weight),
                        ("hidden", model.head[2].weight), ("last", model.head[5].weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert_exports_a_plain_backbone(model.encoder_q)  # as VideoMoCo's


def test_cvrl_forward_is_nt_xent_of_the_two_clips():
    torch.manual_seed(25)
    model = methods.CVRL(TINY, dim=8, hidden=32, tau=0.2)
    projector = nn.Sequential(model.encoder_q, model.head)
    fit_batchnorm(projector, torch.randn(8, 3, 4, 16, 16))
    x1, x2 = torch.randn(4, 3, 4, 16, 16), torch.randn(4, 3, 4, 16, 16)
    out = model(x1, x2)
    with torch.no_grad():
        z1 = torch.cat([projector(x1[i:i + 1]) for i in range(4)])
        z2 = torch.cat([projector(x2[i:i + 1]) for i in range(4)])
    expected_loss, expected_acc = naive_nt_xent(z1, z2, 0.2)
    assert out["loss_d"].item() == pytest.approx(expected_loss, rel=1e-4)
    assert out["acc"].item() == pytest.approx(expected_acc)


def test_cvrl_identical_clips_give_a_lower_loss():
    torch.manual_seed(26)
    model = methods.CVRL(TINY, dim=8, hidden=32)
    fit_batchnorm(nn.Sequential(model.encoder_q, model.head), torch.randn(8, 3, 4, 16, 16))
    x = torch.randn(6, 3, 4, 16, 16)
    with torch.no_grad():
        same = model(x, x.clone())
        independent = model(x, torch.randn(6, 3, 4, 16, 16))
    assert same["loss_d"] < independent["loss_d"]
    assert same["acc"].item() == 1.0


def test_cvrl_normalises_over_the_global_batch_under_ddp_on_cuda_only():
    lines = []
    bn = lambda m: [type(x) for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
    cvrl = methods.global_batchnorm(methods.CVRL(TINY, dim=8, hidden=16), "cvrl",
                                    torch.device("cuda"), 2, lines.append)
    assert set(bn(cvrl)) == {nn.SyncBatchNorm}
    for method, device, world in (("cvrl", "cpu", 2), ("cvrl", "cuda", 1),
                                  ("videomoco", "cuda", 2)):
        if method == "cvrl":
            model = methods.CVRL(TINY, dim=8, hidden=16)
        else:
            model = models.VideoMoCo(TINY, dim=8, K=16)
        device = torch.device(device)
        converted = methods.global_batchnorm(model, method, device, world, lines.append)
        assert nn.SyncBatchNorm not in bn(converted)
    assert lines == ["cvrl on 2 CPU processes: BN statistics per process "
                     "(SyncBatchNorm needs CUDA)"]


# -----------------------------------------------------------------------------
# methods.py: VCLR


def assert_exports_a_plain_backbone(encoder_q):
    """Without its projection head, a method's encoder_q loads into a plain encoder of its arch."""
    backbone = {k: v for k, v in encoder_q.state_dict().items() if not k.startswith("fc.")}
    result = models.build_encoder("tiny", 8).load_state_dict(backbone, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and not result.unexpected_keys


def test_tuple_embedding_matches_loop():
    torch.manual_seed(27)
    pooled, head = torch.randn(4, 3, 6), nn.Linear(6, 5)
    embedding = methods.tuple_embedding(pooled, head)
    for n in range(4):
        mean = [sum(pooled[n, s, d].item() for s in range(3)) / 3 for d in range(6)]
        projected = [sum(w * m for w, m in zip(row, mean)) + b
                     for row, b in zip(head.weight.tolist(), head.bias.tolist())]
        torch.testing.assert_close(embedding[n], torch.tensor(unit(projected)), rtol=1e-5,
                                   atol=1e-6)


def make_vclr(seed, **kw):
    """A VCLR on the tiny encoder with fitted BN and an encoder_k that differs from encoder_q."""
    torch.manual_seed(seed)
    model = methods.VCLR(TINY, dim=8, K=16, segments=3, **kw)
    fit_batchnorm(model.encoder_q, torch.randn(8, 3, 4, 16, 16))
    model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_vclr_eval_forward_matches_loops():
    model = make_vclr(28, order_weight=0.5, clip_weight=0.7)
    n, s = 2, 3
    anchor, positive = torch.randn(n, s, 3, 4, 16, 16), torch.randn(n, s, 3, 4, 16, 16)
    order = torch.tensor([1, 3])
    segments = torch.tensor([[[2, 0, 1], [0, 1, 2]], [[1, 2, 0], [2, 1, 0]]])  # as order says
    before = copy.deepcopy(model.state_dict())
    out = model(anchor, positive, order, segments)
    for name, value in model.state_dict().items():  # eval: no momentum update, no enqueue
        assert torch.equal(value, before[name]), name

    def tuple_embedding(encoder, clips):  # the official tsn_mode: mean of pooled features, head
        with models.pooled_features(encoder):
            pooled = [encoder(clip[None])[0] for clip in clips]
        return F.normalize(encoder.fc(sum(pooled) / len(pooled)), dim=0)

    with torch.no_grad():
        q, k, order_logits = [], [], []
        for i in range(n):
            emb_a = [clip_embedding(model.encoder_q, anchor[i, j]) for j in range(s)]
            key_p = [clip_embedding(model.encoder_k, positive[i, j]) for j in range(s)]
            q.append(tuple_embedding(model.encoder_q, anchor[i]))
            k.append(tuple_embedding(model.encoder_k, positive[i]))
            # the anchor's clips (encoder_q), then the positive's (the momentum encoder)
            order_logits.append(model.order_head(torch.cat(emb_a + key_p)))
    q, k, order_logits = torch.stack(q), torch.stack(k), torch.stack(order_logits)
    torch.testing.assert_close(out["q"], q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["k"], k, rtol=1e-4, atol=1e-5)
    assert out["order_logits"].shape == (n, 4)
    torch.testing.assert_close(out["order_logits"], order_logits, rtol=1e-4, atol=1e-5)

    expected = naive_decayed_infonce(q, k, model.queue, model.queue_age, model.tau, 1.0)
    assert out["loss_nce"].item() == pytest.approx(expected, rel=1e-4)
    expected = naive_cross_entropy(order_logits, order)
    assert out["loss_order"].item() == pytest.approx(expected, rel=1e-4)
    # L_clip: the anchor's first clip (segment 2, then 1) against
    # the positive's clip of that segment
    with torch.no_grad():
        q_clip = torch.stack([clip_embedding(model.encoder_q, anchor[0, 0]),
                              clip_embedding(model.encoder_q, anchor[1, 0])])
        k_clip = torch.stack([clip_embedding(model.encoder_k, positive[0, 2]),
                              clip_embedding(model.encoder_k, positive[1, 1])])
    expected = naive_decayed_infonce(q_clip, k_clip, model.clip_queue, model.clip_queue_age,
                                     model.tau, 1.0)
    assert out["loss_clip"].item() == pytest.approx(expected, rel=1e-4)
    expected = (0.7 * out["loss_clip"].item() + out["loss_nce"].item()
                + 0.5 * out["loss_order"].item())
    assert out["loss_d"].item() == pytest.approx(expected, rel=1e-6)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue], dim=1)
    assert out["acc"].item() == pytest.approx((logits.argmax(1) == 0).float().mean().item())
    expected = (order_logits.argmax(1) == order).float().mean().item()
    assert out["order_acc"].item() == pytest.approx(expected)
    assert not out["acc"].requires_grad and not out["order_acc"].requires_grad


def test_vclr_order_head_sees_clip_order_the_contrastive_loss_does_not():
    model = make_vclr(29, clip_weight=0)
    anchor, positive = torch.randn(2, 3, 3, 4, 16, 16), torch.randn(2, 3, 3, 4, 16, 16)
    order = torch.tensor([0, 2])
    with torch.no_grad():
        out = model(anchor, positive, order)
        shuffled_anchor = model(anchor[:, [2, 0, 1]], positive, order)
        shuffled_positive = model(anchor, positive[:, [1, 2, 0]], order)
    torch.testing.assert_close(shuffled_anchor["q"], out["q"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled_positive["k"], out["k"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled_anchor["loss_nce"], out["loss_nce"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(shuffled_anchor["order_logits"], out["order_logits"], atol=1e-4)
    assert not torch.allclose(shuffled_positive["order_logits"], out["order_logits"], atol=1e-4)


def test_vclr_positive_tuple_never_reaches_encoder_q():
    # as the official code: the positive tuple is encoded by the momentum encoder only, also for
    # the order head, so no loss has a gradient w.r.t. it; the anchor reaches every loss
    model = make_vclr(30)
    anchor = torch.randn(2, 3, 3, 4, 16, 16, requires_grad=True)
    positive = torch.randn(2, 3, 3, 4, 16, 16, requires_grad=True)
    for train in (False, True):  # train mode: BN batch statistics, where a shared batch would leak
        model.train(train)
        segments = torch.tensor([[[0, 1, 2], [0, 1, 2]], [[0, 1, 2], [1, 0, 2]]])
        out = model(anchor, positive, torch.tensor([0, 2]), segments)
        for loss in ("loss_nce", "loss_clip", "loss_order"):
            grad_a, grad_p = torch.autograd.grad(out[loss], [anchor, positive], allow_unused=True,
                                                 materialize_grads=True, retain_graph=True)
            assert grad_a.abs().sum() > 0 and grad_p.abs().sum() == 0, (loss, train)


def test_vclr_training_step_enqueues_and_routes_gradients():
    torch.manual_seed(31)
    model = methods.VCLR(TINY, dim=8, K=16, segments=3, m=0.9).train()
    assert model.decay == 1.0 and model.order_head.in_features == 2 * 3 * 8
    key_before = model.encoder_k.fc[0].weight.clone()
    with torch.no_grad():
        model.encoder_q.fc[0].weight.add_(0.1)  # so that the momentum update moves encoder_k
    n = 3
    segments = torch.tensor([[0, 1, 2], [0, 1, 2]]).repeat(n, 1, 1)
    out = model(torch.randn(n, 3, 3, 4, 16, 16), torch.randn(n, 3, 3, 4, 16, 16),
                torch.tensor([0, 0, 0]), segments)
    assert int(model.queue_ptr) == n and int(model.clip_queue_ptr) == n
    torch.testing.assert_close(model.queue[:, :n], out["k"].T)
    # clip-level keys, not video-level
    assert not torch.allclose(model.clip_queue[:, :n], out["k"].T)
    assert not torch.equal(model.encoder_k.fc[0].weight, key_before)
    out["loss_d"].backward()
    for name, param in [("order_head", model.order_head.weight),
                        ("conv", model.encoder_q.features[0].weight),
                        ("fc", model.encoder_q.fc[0].weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.encoder_k.parameters())
    model(torch.randn(n, 3, 3, 4, 16, 16), torch.randn(n, 3, 3, 4, 16, 16),
          torch.tensor([0, 0, 0]), segments)
    assert int(model.queue_ptr) == 2 * n
    with pytest.raises(ValueError, match="segments"):
        model(torch.randn(n, 3, 3, 4, 16, 16), torch.randn(n, 3, 3, 4, 16, 16),
              torch.tensor([0, 0, 0]))
    assert_exports_a_plain_backbone(model.encoder_q)


def test_vclr_rejects_a_wrong_number_of_segments():
    model = methods.VCLR(TINY, dim=4, K=8, segments=3)
    with pytest.raises(ValueError, match="3"):
        model(torch.randn(2, 2, 3, 4, 16, 16), torch.randn(2, 2, 3, 4, 16, 16),
              torch.tensor([0, 1]))


# -----------------------------------------------------------------------------
# methods.py: mixed precision, background erasing


def test_nt_xent_computes_in_float32_under_autocast():
    torch.manual_seed(33)
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    loss, acc = methods.nt_xent(z1, z2, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_autocast, acc_autocast = methods.nt_xent(z1, z2, 0.1)
    assert loss_autocast.dtype == torch.float32
    # bfloat16 similarities would be off by ~1e-2 relative
    assert loss_autocast.item() == pytest.approx(loss.item(), rel=1e-6)
    assert acc_autocast.item() == acc.item()


def test_cvrl_and_vclr_autocast_bfloat16():
    torch.manual_seed(32)
    cvrl = methods.CVRL(TINY, dim=8, hidden=32)
    vclr = methods.VCLR(TINY, dim=8, K=16, segments=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_cvrl = cvrl(torch.randn(4, 3, 4, 16, 16), torch.randn(4, 3, 4, 16, 16))
        out_vclr = vclr(torch.randn(2, 2, 3, 4, 16, 16), torch.randn(2, 2, 3, 4, 16, 16),
                        torch.tensor([0, 3]),
                        torch.tensor([[[0, 1], [0, 1]], [[1, 0], [1, 0]]]))
    assert out_cvrl["loss_d"].dtype == torch.float32 and torch.isfinite(out_cvrl["loss_d"])
    for key in ("loss_d", "loss_nce", "loss_order", "loss_clip"):
        assert out_vclr[key].dtype == torch.float32 and torch.isfinite(out_vclr[key]), key
    assert vclr.queue.dtype == torch.float32 and int(vclr.queue_ptr) == 2
    out_cvrl["loss_d"].backward()
    out_vclr["loss_d"].backward()
    assert torch.isfinite(vclr.encoder_q.fc[0].weight.grad).all()
    assert torch.isfinite(cvrl.head[5].weight.grad).all()


def test_background_erasing_adds_a_static_frame_with_the_drawn_weight():
    x = torch.randn(64, 3, 6, 8, 8)
    out, lam, r = methods.background_erasing(x, 0.5, (0.1, 0.3), torch.Generator().manual_seed(0))
    applied = lam > 0
    assert 10 < int(applied.sum()) < 54  # about half of the clips
    assert ((lam[applied] >= 0.1) & (lam[applied] <= 0.3)).all()
    for n in range(64):
        added = out[n] - (1 - lam[n]) * x[n]  # (C, T, H, W): what erasing added
        for t in range(6):
            # constant in t
            torch.testing.assert_close(added[:, t], lam[n] * x[n, :, r[n]], rtol=1e-5, atol=1e-6)
        if not applied[n]:
            assert torch.equal(out[n], x[n])
