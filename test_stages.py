"""
The stages end to end: utils.py's plumbing, pretrain.py (its step and schedule, checkpoints and
resume, signals, non-finite losses, DDP as gloo processes, the real torchrun launcher and the faults
of a cluster, whether it learns), finetune.py and evaluate.py.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import curves
import data
import evaluate
import finetune
import models
import pretrain
import utils
from testlib import (HERE, TINY, free_port, centre_clip, dot, naive_bn_estimate, read_log,
                     small_args, unit)


# -----------------------------------------------------------------------------
# utils.py: checkpoints and RNG, BN statistics, weight transfer


def test_rng_state_round_trip_is_complete(tmp_path):
    random.random(), np.random.standard_normal(), torch.rand(1)  # numpy caches a gaussian: keep it
    state = utils.rng_state()
    a = (random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(2).tolist())
    torch.save(state, tmp_path / "rng.pt")
    utils.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(2).tolist()) == a


def test_resume_restores_parts_and_rng_and_reads_the_older_single_rng_state(tmp_path):
    path, lines = str(tmp_path / "ckpt.pt"), []
    args = argparse.Namespace(arch="tiny", lr=0.1)
    for older in (False, True):
        model = nn.Linear(3, 2)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        utils.save_checkpoint(path, "finetune", {"model": model}, scaler, 0, epoch=2, step=9,
                              args={"arch": "tiny", "lr": 0.2})
        if older:  # finetune checkpoints written before utils.save_checkpoint kept one dict
            ckpt = torch.load(path, weights_only=True)
            utils.save_atomic(dict(ckpt, rng=ckpt["rng"][0]), path)
        expected = torch.rand(4)
        restored = nn.Linear(3, 2)
        ckpt = utils.resume(path, "finetune", {"model": restored}, scaler, 0, lines.append, args,
                            must_match=(("arch", None),), may_change=("lr",))
        assert torch.equal(torch.rand(4), expected)  # the RNG continues from the save
        assert torch.equal(restored.weight, model.weight) and ckpt["step"] == 9
    assert lines[0] == "warning: resuming with changed flags --lr 0.2 -> 0.1"
    with pytest.raises(SystemExit, match="is a --arch tiny run"):
        utils.resume(path, "finetune", {}, scaler, 0, lines.append,
                     argparse.Namespace(arch="r3d_10"), must_match=(("arch", None),))


def test_bn_statistics_are_the_mean_of_batch_statistics_over_training_clips(small_tree):
    # estimate_bn_statistics against a loop: the first BN layer's running mean and variance are the
    # averages over the batches of its input's per-channel mean and unbiased variance, whatever
    # statistics the encoder had before (a pretrained encoder and a random init alike)
    torch.manual_seed(1)
    encoder = models.build_encoder("tiny", 8)
    bn = encoder.features[1]
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
    samples, _, _ = data.list_videos("folder", small_tree)
    clips = torch.cat([centre_clip(p, 4, 1, 32) for p, _ in samples])  # (8, 3, 4, 32, 32)
    loader = [{"video": clips[i:i + 3, None], "valid": torch.ones(len(clips[i:i + 3]), dtype=bool)}
              for i in range(0, 8, 3)]  # batches of 3, 3 and 2 clips
    all_bad = {"video": clips[:2, None], "valid": torch.zeros(2, dtype=bool)}  # counts for nothing
    utils.estimate_bn_statistics(encoder, [all_bad] + loader, torch.device("cpu"),
                                 contextlib.nullcontext())
    assert not encoder.training and bn.momentum == 0.1  # the momentum is given back
    with torch.no_grad():
        inputs = [encoder.features[0](b["video"][:, 0]) for b in loader]
    for c in range(bn.num_features):
        means = [x[:, c].mean().item() for x in inputs]
        variances = [x[:, c].var(unbiased=True).item() for x in inputs]
        assert bn.running_mean[c].item() == pytest.approx(sum(means) / 3, rel=1e-4, abs=1e-6)
        assert bn.running_var[c].item() == pytest.approx(sum(variances) / 3, rel=1e-4)
    # with one batch, the same as the independent one-batch estimate used by the kNN reference
    one = naive_bn_estimate(encoder, clips)
    utils.estimate_bn_statistics(encoder, [{"video": clips[:, None],
                                            "valid": torch.ones(8, dtype=bool)}],
                                 torch.device("cpu"), contextlib.nullcontext())
    torch.testing.assert_close(encoder.features[1].running_var, one.features[1].running_var)


def test_weight_transfer_changes_backbone_and_leaves_head_fresh(small_tree, tmp_path):
    pre = tmp_path / "pre"
    pretrain.main(small_args(small_tree, pre, "--epochs", "1"))
    arch, state, source = utils.backbone_from_checkpoint(str(pre / "ckpt.pt"))
    assert arch == "tiny"
    assert source["kind"] == "pretrain"
    assert not any(k.startswith("fc.") for k in state)
    torch.manual_seed(0)
    fresh = models.build_encoder("tiny", 2)
    torch.manual_seed(0)
    model = models.build_encoder("tiny", 2)
    n = utils.transfer_weights(model, state, "x")
    assert n == len(state)
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            assert torch.equal(value, fresh.state_dict()[key])  # head: new
        elif key in state:
            assert torch.equal(value, state[key])  # backbone: pretrained
    with pytest.raises(SystemExit, match="does not fit|does not match"):
        utils.transfer_weights(models.build_encoder("r3d_10", 2), state, "tiny.pt")


# -----------------------------------------------------------------------------
# pretrain.py: the step, the schedule, the flags


def moco_step(model, opt, video):
    """pretrain.train_step in its MoCo phase (D alone), in a world of one; video (N, 2, ...)."""
    args = argparse.Namespace(method="videomoco", background_erasing=0, drop_frames=1)
    guard = types.SimpleNamespace(agree=lambda finite: bool(finite))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = pretrain.Run(args, model, None, opt, None, contextlib.nullcontext(), scaler, guard)
    return pretrain.train_step(run, video, [], "moco", model.decay)


def test_channels_last_step_matches_the_default_layout_and_compile_keeps_the_keys():
    # inputs of their own seed: two SGD steps at lr 0.1 amplify the two layouts' rounding
    # differences to 3e-5 here, but to 2e-4 for some other inputs
    torch.manual_seed(0)
    video = torch.randn(4, 2, 3, 4, 16, 16)  # x and x_key
    outs = []
    for memory_format in (torch.contiguous_format, torch.channels_last_3d):
        torch.manual_seed(0)
        model = models.VideoMoCo(models.encoder_builder("r3d_10"), 16, 32, 0.99, 0.07, 0.99,
                                 shuffle_splits=1).to(memory_format=memory_format)
        opt = torch.optim.SGD(model.encoder_q.parameters(), 0.1, momentum=0.9)
        losses = [moco_step(model, opt, video)["loss_d"].item() for _ in range(2)]
        outs.append((losses, next(model.encoder_q.parameters()).detach().clone()))
    assert outs[0][0] == pytest.approx(outs[1][0], abs=1e-4)  # the second loss is after a step
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-4)
    # as pretrain.py --compile: in place, so the keys stay; the compiled encoder then runs and
    # agrees with itself uncompiled (dynamo with its eager backend: the wrapping, not inductor's
    # minute of code generation on CPU)
    keys, encoder = list(model.state_dict()), model.encoder_q.eval()
    with torch.no_grad():
        eager = encoder(video[:, 0])
        encoder.compile(backend="eager")
        compiled = encoder(video[:, 0])
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(compiled, eager)


def test_method_moco_is_videomoco_without_generator_and_decay(small_tree, tmp_path):
    no_decay = [a for a in small_args(small_tree, tmp_path / "a") if a not in ("--decay", "0.99")]
    pretrain.main(no_decay + ["--method", "moco"])
    pretrain.main(small_args(small_tree, tmp_path / "b", "--generator", "none", "--decay", "1"))
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["loss_d"] for r in a] == [r["loss_d"] for r in b]
    assert {r["phase"] for r in a} == {"moco"}
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ckpt["method"] == "moco" and ckpt["generator"] is None
    with pytest.raises(SystemExit, match="means --generator none --decay 1"):
        pretrain.main(small_args(small_tree, tmp_path / "c", "--method", "moco", "--decay", "0.9"))


def test_bad_drop_frames_fails_at_start_not_mid_run():
    for k in ("0", "4"):
        with pytest.raises(SystemExit, match="--drop-frames must be in 1..3"):
            pretrain.main(["--frames", "4", "--drop-frames", k, "--out",
                           "/nonexistent/never-written"])


def test_drop_frames_defaults_to_a_quarter_of_the_clip(small_tree, tmp_path):
    # the paper drops 8 of 32 frames; given only --frames, k scales with it
    argv = small_args(small_tree, tmp_path, "--frames", "8", "--epochs", "1")
    i = argv.index("--drop-frames")
    pretrain.main(argv[:i] + argv[i + 2:])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["args"]["drop_frames"] == 2


def test_epoch_schedule_matches_the_cosines_and_phases_written_out():
    # D: lr * (1 + cos(pi e / E)) / 2 over the run (MoCo v2); G: 0 before the adversarial phase,
    # then the same half-cosine over its own epochs; the phase and t of Eq 6 per epoch
    d_params = [nn.Parameter(torch.zeros(1))]
    g_params = [nn.Parameter(torch.zeros(1))]
    for method, generator, phases in (
            ("videomoco", "convlstm", ["moco"] * 4 + ["adversarial"] * 6),
            ("videomoco", "random", ["moco"] * 4 + ["random-drop"] * 6),
            ("moco", "none", ["moco"] * 10), ("cvrl", "none", ["cvrl"] * 10),
            ("vclr", "none", ["vclr"] * 10)):
        args = argparse.Namespace(method=method, generator=generator, lr=0.3, epochs=10,
                                  adv_start=4, decay_start=6, decay=0.9)
        opt_d = torch.optim.SGD(d_params, 1.0)
        opt_g = torch.optim.SGD(g_params, 1.0) if generator == "convlstm" else None
        for epoch in range(10):
            phase, decay = pretrain.epoch_schedule(args, epoch, opt_d, opt_g)
            assert phase == phases[epoch], (method, generator, epoch)
            assert decay == (0.9 if epoch >= 6 else 1.0)
            d_lr = 0.3 * (1 + math.cos(math.pi * epoch / 10)) / 2
            assert opt_d.param_groups[0]["lr"] == pytest.approx(d_lr, abs=1e-12)
            if opt_g is not None:
                g_lr = 0.0 if epoch < 4 else 0.3 * (1 + math.cos(math.pi * (epoch - 4) / 6)) / 2
                assert opt_g.param_groups[0]["lr"] == pytest.approx(g_lr, abs=1e-12)


def test_two_phase_schedule_g_idle_then_trained_from_its_full_lr(small_tree, tmp_path, monkeypatch):
    # D alone before --adv-start (G takes no step), then G from D's initial lr (the paper: 0.02
    # for both), cosine over its own phase
    saved, real_save = {}, utils.save_atomic

    def keep(obj, path):
        real_save(obj, path)
        if isinstance(obj, dict) and obj.get("kind") == "pretrain":
            saved[obj["epoch"]] = copy.deepcopy(obj)

    monkeypatch.setattr(utils, "save_atomic", keep)
    pretrain.main(small_args(small_tree, tmp_path, "--epochs", "3", "--adv-start", "1",
                             "--lr", "0.02"))
    assert saved[1]["opt_g"]["state"] == {} and saved[1]["opt_g"]["param_groups"][0]["lr"] == 0
    assert saved[2]["opt_g"]["state"]
    assert saved[2]["opt_g"]["param_groups"][0]["lr"] == pytest.approx(0.02)
    # half-way through its phase
    assert saved[3]["opt_g"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert any(not torch.equal(a, b) for a, b in zip(saved[1]["generator"].values(),
                                                     saved[2]["generator"].values()))
    epochs = [r for r in read_log(tmp_path, "epoch") if "loss" in r]
    assert epochs[0]["g_vs_random"] is None and all(r["g_vs_random"] > 0 for r in epochs[1:])
    assert utils.cosine(5, 5, 10) == 1 and utils.cosine(4, 5, 10) == 0
    assert utils.cosine(7, 5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5)))


def test_decay_start_uses_eq1_before_and_eq6_after(small_tree, tmp_path):
    eq1, eq6 = math.log(13), math.log(1 + sum(0.99 ** i for i in range(1, 13)))
    pretrain.main(small_args(small_tree, tmp_path / "a", "--decay-start", "1", "--adv-start", "2"))
    chance = [r["chance"] for r in read_log(tmp_path / "a", "epoch") if "loss" in r]
    assert chance == pytest.approx([eq1, eq6])
    # by default Eq 6 starts with the adversarial phase (Sec 3.2: D alone with Eq 1 first), also
    # without G (Table 2's "decay without adversarial" row)
    for generator in ("convlstm", "none"):
        out = tmp_path / generator
        pretrain.main(small_args(small_tree, out, "--epochs", "3", "--adv-start", "2",
                                 "--generator", generator))
        chance = [r["chance"] for r in read_log(out, "epoch") if "loss" in r]
        assert chance == pytest.approx([eq1, eq1, eq6])


def test_demo_preset_fills_only_flags_not_given(tmp_path, capsys):
    args, preset = pretrain.parse_args(["--epochs", "3", "--moco-k=4096", "--out", str(tmp_path)])
    assert data.is_demo(args)
    assert args.epochs == 3
    assert args.moco_k == 4096
    assert args.arch == "tiny"
    utils.start_run(args, 0, torch.device("cpu"), preset)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("preset: arch=tiny") and "epochs" not in line and "moco_k" not in line
    args, _ = pretrain.parse_args(["--data-root", "/x", "--dataset", "folder"])
    assert not data.is_demo(args) and args.arch == "r2plus1d_10" and args.moco_k == 65536
    # a method's own defaults (VCLR's official tau and K), under the demo preset's K
    args, _ = pretrain.parse_args(["--method", "vclr", "--data-root", "/x", "--dataset", "folder"])
    assert (args.moco_t, args.moco_k) == (0.1, 131072)
    args, _ = pretrain.parse_args(["--method", "vclr"])
    assert (args.moco_t, args.moco_k, args.frames) == (0.1, 64, 8)


def test_pretrain_bf16_autocast_on_cpu(small_tree, tmp_path):
    # --amp bf16 computes the step in bfloat16 (its losses are not float32's) and still the same
    # step (within bfloat16's rounding of the first, adversarial steps)
    losses = {}
    for amp in ("bf16", "none"):
        pretrain.main(small_args(small_tree, tmp_path / amp, "--amp", amp, "--adv-start", "0",
                                 "--epochs", "1"))
        log = read_log(tmp_path / amp)
        losses[amp] = [(r["loss_d"], r["loss_g"]) for r in log]
    assert len(losses["bf16"]) == 2
    for (d16, g16), (d32, g32) in zip(losses["bf16"], losses["none"]):
        assert np.isfinite(d16) and np.isfinite(g16)
        assert d16 == pytest.approx(d32, rel=0.02, abs=0.01) and g16 == pytest.approx(g32, rel=0.02)
    assert losses["bf16"] != losses["none"]


# -----------------------------------------------------------------------------
# pretrain.py: checkpoints, resume, signals, non-finite losses, DDP


def test_pretrain_resume_is_exact_mid_epoch(small_tree, tmp_path, monkeypatch):
    # a checkpoint after every step (as a signal or the 30-minute save would write one); the run
    # resumed from the one after the first step of epoch 1 (adversarial, G measured against random
    # drops at each of its 2 steps) ends as the straight run: the same step records, the same
    # epoch record (its averages include the step before the save), the same weights and queue
    monkeypatch.setattr(pretrain, "SAVE_EVERY_MIN", 0)
    kept = {}
    real_save = utils.save_atomic

    def save_and_keep(obj, path):
        real_save(obj, path)
        if isinstance(obj, dict) and (obj.get("epoch"), obj.get("epoch_step")) == (1, 1):
            kept["ckpt"] = path + ".mid"
            shutil.copy(path, kept["ckpt"])

    monkeypatch.setattr(utils, "save_atomic", save_and_keep)
    straight = tmp_path / "straight"
    model = pretrain.main(small_args(small_tree, straight))
    monkeypatch.setattr(utils, "save_atomic", real_save)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(kept["ckpt"], resumed / "ckpt.pt")
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["epoch_sums"][0]["steps"] == 1
    model2 = pretrain.main(small_args(small_tree, resumed))
    a = [r for r in read_log(straight) if r["step"] > 3]
    b = read_log(resumed)
    assert len(a) == len(b) == 1 and a[0]["phase"] == "adversarial"
    for ra, rb in zip(a, b):
        assert (ra["step"], ra["loss_d"], ra["loss_g"]) == (rb["step"], rb["loss_d"], rb["loss_g"])
    fields = ("loss", "acc", "spread", "chance", "probe_loss", "probe_top1", "g_vs_random")
    epoch_a = [r for r in read_log(straight, "epoch") if r["epoch"] == 2 and "loss" in r]
    epoch_b = [r for r in read_log(resumed, "epoch") if r["epoch"] == 2 and "loss" in r]
    assert [{k: r[k] for k in fields} for r in epoch_a] == [{k: r[k] for k in fields}
                                                            for r in epoch_b]
    for (name, x), y in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(x, y), name  # queue, ages, pointer, both encoders


def test_checkpoint_loads_weights_only_and_backbone_into_torchvision(small_tree, tmp_path):
    import torchvision
    out = tmp_path / "r3d"
    pretrain.main(small_args(small_tree, out, "--arch", "r3d_18", "--epochs", "1",
                             ))
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "pretrain" and ckpt["epoch"] == 1 and ckpt["args"]["arch"] == "r3d_18"
    assert {"queue", "queue_ptr", "queue_age"} <= {k.split(".")[-1] for k in ckpt["model"]}
    backbone = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    net = torchvision.models.video.r3d_18(num_classes=16)
    result = net.load_state_dict(backbone, strict=False)  # the projection head stays out
    assert result.missing_keys == ["fc.weight", "fc.bias"] and not result.unexpected_keys
    q = {k[len("encoder_q."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder_q.")}
    assert all(torch.equal(q[k], v) for k, v in backbone.items())
    assert not os.path.exists(str(out / "ckpt.pt") + ".tmp")


def test_sigterm_to_the_process_group_saves_and_resumes(small_tree, tmp_path):
    # as SLURM pre-empts a job: SIGTERM to the whole process group, the loader worker included
    # (--workers 1). One checkpoint mid-epoch, and the rerun goes on from its step
    out = tmp_path / "pre"
    cmd = [sys.executable, os.path.join(HERE, "pretrain.py"),
           *small_args(small_tree, out, "--epochs", "400", "--workers", "1")]
    run = Watched(cmd, start_new_session=True, env=os.environ)
    try:
        run.read_until("epoch 1 step 3/")
        os.killpg(run.proc.pid, signal.SIGTERM)
        code, rest = run.rest()
    finally:
        run.kill()
    assert code == 0, rest
    assert "signal received" in rest and "killed by signal" not in rest, rest
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 3
    r = subprocess.run(cmd[:-4] + ["--epochs", str(ckpt["epoch"] + 1), "--workers", "1"],
                       capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr
    resumed = f"resuming from {out / 'ckpt.pt'}: epoch {ckpt['epoch']}, step {ckpt['step']}"
    assert resumed in r.stdout
    steps = [r["step"] for r in read_log(out)]
    assert steps == list(range(1, steps[-1] + 1))  # no step repeated or lost across the restart


def test_nonfinite_step_leaves_weights_and_optimizers():
    # README: a non-finite loss skips the step. D's and G's weights, their optimizers' state and
    # their BN statistics stay as they were (the forward wrote NaN into the BN statistics); Eq 2
    # and the enqueue of the step's finite keys, which ran in the forward, stay
    model, generator, opt_d, opt_g, step = adversarial_setup(0)
    video = torch.randn(4, 2, 3, 8, 32, 32)
    assert step(video)["updated"]  # the optimizers now hold momentum buffers
    before = copy.deepcopy([model.encoder_q.state_dict(), generator.state_dict(),
                            opt_d.state_dict(), opt_g.state_dict()])
    theta_k = [p.clone() for p in model.encoder_k.parameters()]
    theta_q = [p.clone() for p in model.encoder_q.parameters()]
    ptr = int(model.queue_ptr)
    video = torch.randn(4, 2, 3, 8, 32, 32)
    video[1, 0] = float("nan")  # one query clip: the losses are NaN, the keys finite
    out = step(video)
    assert not out["updated"] and not torch.isfinite(out["loss_d"])
    after = [model.encoder_q.state_dict(), generator.state_dict(), opt_d.state_dict(),
             opt_g.state_dict()]
    for old, new in zip(before[:2], after[:2]):
        assert old.keys() == new.keys()
        assert all(torch.equal(old[k], new[k]) for k in old), [k for k in old
                                                                if not torch.equal(old[k], new[k])]
    for old, new in zip(before[2:], after[2:]):
        assert old["param_groups"] == new["param_groups"]
        assert all(torch.equal(old["state"][i]["momentum_buffer"],
                               new["state"][i]["momentum_buffer"]) for i in old["state"])
    for p_k, old_k, p_q in zip(model.encoder_k.parameters(), theta_k, theta_q):
        torch.testing.assert_close(p_k, 0.9 * old_k + 0.1 * p_q, rtol=1e-6, atol=1e-7)
    assert int(model.queue_ptr) == (ptr + 4) % 12
    slots = [(ptr + i) % 12 for i in range(4)]
    torch.testing.assert_close(model.queue[:, slots], out["k"].T)


def adversarial_setup(seed=0):
    """(model, G, opt_d, opt_g, step) for pretrain.train_step's adversarial steps on CPU in a world
    of one; step(video, scaler=disabled)."""
    torch.manual_seed(seed)
    model = models.VideoMoCo(TINY, dim=8, K=12, m=0.9, shuffle_splits=1)
    generator = models.ConvLSTMGenerator(hidden=16, width=8)
    opt_d = torch.optim.SGD(model.encoder_q.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    opt_g = torch.optim.SGD(generator.parameters(), 0.1, momentum=0.9)
    args = argparse.Namespace(method="videomoco", background_erasing=0, drop_frames=2)
    guard = types.SimpleNamespace(agree=lambda finite: bool(finite))

    def step(video, scaler=None):
        scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        run = pretrain.Run(args, model, generator, opt_d, opt_g, contextlib.nullcontext(), scaler,
                           guard)
        return pretrain.train_step(run, video, [], "adversarial", 0.9)

    return model, generator, opt_d, opt_g, step


@pytest.mark.parametrize("loss", ["loss_d", "loss_g"])
def test_either_nonfinite_loss_alone_skips_the_adversarial_step(loss):
    # D's loss finite and G's not, or the reverse: neither player steps
    model, generator, opt_d, opt_g, step = adversarial_setup()
    before = copy.deepcopy([model.encoder_q.state_dict(), generator.state_dict()])
    model.register_forward_hook(lambda module, inputs, out: {**out, loss: out[loss] * math.nan})
    out = step(torch.randn(4, 2, 3, 8, 32, 32))
    other = "loss_g" if loss == "loss_d" else "loss_d"
    assert not out["updated"] and torch.isfinite(out[other])
    for old, new in zip(before, [model.encoder_q.state_dict(), generator.state_dict()]):
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert all(p.grad is None for p in generator.parameters())


def test_adversarial_step_under_a_loss_scale_equals_the_unscaled_step():
    # --amp fp16's GradScaler scales both losses (D's Eq 6 and G's Eq 4) and unscales both
    # optimizers' gradients: at a finite scale the step is the unscaled one (exact: powers of 2)
    video = torch.randn(4, 2, 3, 8, 32, 32)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        model, generator, opt_d, opt_g, step = adversarial_setup()
        assert step(video, scaler)["updated"]
        results.append([model.encoder_q.state_dict(), generator.state_dict()])
    for plain, scaled in zip(*results):
        for name in plain:
            torch.testing.assert_close(scaled[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_nonfinite_losses_skip_steps_then_abort(small_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pretrain, "MAX_NONFINITE", 2)
    with pytest.raises(SystemExit, match="2 non-finite losses in a row"):
        pretrain.main(small_args(small_tree, tmp_path / "nan", "--lr", "1e30", "--epochs", "20"))
    assert "non-finite loss" in capsys.readouterr().out


def _ddp_worker(rank, world, port, argv, out):
    # gloo on CPU also on a machine with GPUs (there, two ranks would ask for nccl and a GPU each)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    model = pretrain.main(argv)
    torch.save({k: v for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("method,extra", [
    ("videomoco", []), ("cvrl", []), ("vclr", []),
    ("videomoco", ["--augment-on", "device", "--repeat-sample", "2"]),
    ("videomoco", ["--amp", "bf16"])])  # shuffle-BN gathers the keys' clips in bf16
def test_ddp_two_gloo_processes_keep_identical_queues_and_weights(small_tree, tmp_path, method,
                                                                  extra):
    port = free_port()
    argv = small_args(small_tree, tmp_path, "--adv-start", "0", "--epochs", "1", "--method", method,
                      *extra)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, argv, str(tmp_path)),
                                nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # two steps of a global batch of 4 (2 per process); with --repeat-sample 2 two samples of one
    # video per process, so four steps: 16 keys through a queue of 12
    steps = 4 if "--repeat-sample" in extra else 2
    assert method == "cvrl" or int(s0["queue_ptr"]) == 4 * steps % 12
    for key in s0:
        if "running_" in key or "num_batches" in key:
            continue  # BN statistics are per process (DDP broadcast_buffers=False)
        assert torch.equal(s0[key], s1[key]), key
    log = read_log(tmp_path)
    assert len(log) == steps and all(np.isfinite(r["loss_d"]) for r in log)
    assert log[0]["phase"] == ("adversarial" if method == "videomoco" else method)


def _evaluate_worker(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    evaluate.main(argv)


def test_ddp_occlusion_gathers_every_video_once_and_each_rank_draws_its_own_drops(small_tree,
                                                                                   tmp_path):
    # two gloo processes, each half of the test videos: the gathered rows are one process's on the
    # modes that draw nothing at random (none, G's); the random drops are each rank's own stream,
    # not one sequence repeated on both halves
    pre = tmp_path / "pre"
    pretrain.main(small_args(small_tree, pre, "--epochs", "1", "--adv-start", "0"))
    finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--out", str(tmp_path / "ft"), "--epochs", "1",
                   "--batch-size", "4", "--workers", "0"])
    argv = ["--ckpt", str(tmp_path / "ft" / "ckpt.pt"), "--occlusion", "--clips", "1",
            "--workers", "0", "--batch-size", "2"]
    one = evaluate.main(argv)
    torch.multiprocessing.spawn(_evaluate_worker, nprocs=2, join=True, args=(
        2, free_port(), argv + ["--json", str(tmp_path / "two.json")]))
    two = json.load(open(tmp_path / "two.json"))
    assert two["occlusion"]["videos"] == one["occlusion"]["videos"] == list(range(8))
    for key in ("top1", "top5", "top1_none", "entropy_adversarial"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    for mode in ("none", "adversarial"):
        assert two["per_video"][mode]["pred"] == one["per_video"][mode]["pred"]
        assert two["per_video"][mode]["entropy"] == pytest.approx(
            one["per_video"][mode]["entropy"], abs=1e-4)
    # rank r reads videos r, r + 2, ...: with one seed for both, videos 2i and 2i + 1 would be
    # dropped alike; 1 of 4 frames, so 4 pairs alike by chance is 1 in 256
    random = two["occlusion"]["dropped_first_clip"]["random"]
    assert [random[2 * i] for i in range(4)] != [random[2 * i + 1] for i in range(4)]


# -----------------------------------------------------------------------------
# the real launcher (torchrun, as the README's commands), on CPU with gloo, and the faults of a


RUN_AND_SAVE_RANK = """
import os, sys
sys.path.insert(0, {here!r})
import torch
import pretrain
model = pretrain.main(sys.argv[1:])
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


LAUNCH_TIMEOUT = 240  # seconds for one launch on 2 loaded cores (each takes 15-40)


def torchrun(launcher, script, argv):
    return [sys.executable, "-m", "torch.distributed.run", *launcher, script, *argv]


def launcher_env():
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def ddp_args(root, out, *extra):
    # 48 videos, a global batch of 4: 12 steps an epoch; K = 20 against 48 keys an epoch
    return small_args(root, out, "--moco-k", "20", "--workers", "1", *extra)


def children(pid):
    """The pids of `pid`'s processes and theirs, read from /proc."""
    parents = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
        except OSError:
            continue
    found = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


class Watched:
    """A command's process (a torchrun agent, or pretrain.py), its output read line by line on a
    thread, so that every wait has a deadline; kill() ends it and every process under it
    (torchrun starts each worker in a session of its own, which the agent's death leaves
    running)."""

    def __init__(self, cmd, **popen):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, **{"env": launcher_env(), **popen})
        self.lines = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read_until(self, prefix, timeout=LAUNCH_TIMEOUT):
        """The lines up to the first that starts with `prefix`."""
        seen = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=max(deadline - time.time(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if line.startswith(prefix):
                return seen
        raise AssertionError(f"no line {prefix!r} within {timeout} s:\n" + "".join(seen)[-3000:])

    def rest(self, timeout=LAUNCH_TIMEOUT):
        """Everything it prints until it exits; (exit code, output)."""
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=30)
        seen = []
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                seen.append(line)
        return self.proc.returncode, "".join(seen)

    def kill(self):
        for pid in children(self.proc.pid) + [self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def launched(*cmds):
    agents = [Watched(cmd) for cmd in cmds]
    try:
        yield agents
    finally:
        for agent in agents:
            agent.kill()


def run_to_the_end(cmds):
    """Start every command at once (one per agent), wait for all; their joined output."""
    with launched(*cmds) as agents:
        results = [agent.rest() for agent in agents]
    for code, output in results:
        assert code == 0, output[-3000:]
    return "".join(output for _, output in results)


@pytest.mark.parametrize("nodes", [1, 2])
def test_torchrun_ranks_keep_identical_queues_and_weights_and_a_rerun_resumes(distinct_tree,
                                                                              tmp_path, nodes):
    # one agent of 2 processes (--standalone), or 2 agents of 1 process each, 2 "nodes" on
    # localhost meeting through the c10d rendezvous (the README's multi-node command)
    script = tmp_path / "run.py"
    script.write_text(RUN_AND_SAVE_RANK.format(here=HERE, out=str(tmp_path)))
    argv = ddp_args(distinct_tree, tmp_path / "out", "--epochs", "1", "--adv-start", "0")
    if nodes == 1:
        launchers = [["--standalone", "--nproc_per_node=2"]]
    else:
        rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=videomoco-test"]
        launchers = [rendezvous, rendezvous]
    cmds = [torchrun(launcher, str(script), argv) for launcher in launchers]
    run_to_the_end(cmds)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert int(states[0]["queue_ptr"]) == 48 % 20
    for key in states[0]:
        if "running_" in key or "num_batches" in key:
            continue  # BN statistics are per process (DDP broadcast_buffers=False)
        assert torch.equal(states[0][key], states[1][key]), key
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log] == list(range(1, 13))
    # the same command again: every rank resumes from the end of the run (rank 0's checkpoint)
    # and stops there
    output = run_to_the_end(cmds)
    assert f"resuming from {tmp_path / 'out' / 'ckpt.pt'}: epoch 1, step 12" in output
    for r in (0, 1):
        after = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert all(torch.equal(after[k], states[0][k]) for k in states[0])


def test_torchrun_sigterm_to_the_agent_saves_and_the_rerun_resumes_exactly(distinct_tree,
                                                                           tmp_path):
    # what a scheduler's pre-emption does: SIGTERM to torchrun's agent, which forwards it to its
    # workers' process groups (their loader workers included), at the first step of epoch 1.
    # One checkpoint, and the rerun of the same command ends as the run that was never
    # interrupted: the same steps, the same epoch records, the same weights, queue, G, optimizers
    def cmd(out):
        return torchrun(["--standalone", "--nproc_per_node=2"], os.path.join(HERE, "pretrain.py"),
                        ddp_args(distinct_tree, out, "--epochs", "2", "--adv-start", "1"))

    run_to_the_end([cmd(tmp_path / "straight")])
    cut = tmp_path / "cut"
    with launched(cmd(cut)) as (agent,):
        agent.read_until("epoch 1 step 13/")
        agent.proc.send_signal(signal.SIGTERM)
        _, rest = agent.rest()
    assert "signal received: saved a checkpoint at epoch 1" in rest, rest[-3000:]
    assert "killed by signal" not in rest, rest[-3000:]
    ckpt = torch.load(cut / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["epoch_step"] < 12, (ckpt["epoch"], ckpt["epoch_step"])
    output = run_to_the_end([cmd(cut)])
    assert f"resuming from {cut / 'ckpt.pt'}: epoch 1, step {ckpt['step']} (mid-epoch" in output
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(cut / "ckpt.pt", weights_only=True)
    for part in ("model", "generator"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for part in ("opt_d", "opt_g"):
        assert all(torch.equal(a[part]["state"][i]["momentum_buffer"],
                               b[part]["state"][i]["momentum_buffer"]) for i in a[part]["state"])
    straight_steps = read_log(tmp_path / "straight")
    cut_steps = read_log(cut)
    assert [r["step"] for r in cut_steps] == list(range(1, 25))  # none lost, none repeated
    assert [r["loss_d"] for r in straight_steps] == [r["loss_d"] for r in cut_steps]
    fields = ("loss", "acc", "spread", "chance", "probe_loss", "probe_top1", "g_vs_random")
    epochs = [[{k: r[k] for k in fields} for r in read_log(out, "epoch") if "loss" in r]
              for out in (tmp_path / "straight", cut)]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 2


def rank_process(agent_pid, rank):
    """The pid of the worker process of `rank` that torchrun's agent started (read from /proc)."""
    for pid in children(agent_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} among the processes of {agent_pid}")


def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(distinct_tree, tmp_path):
    # kill -9 of one rank under --max-restarts 1: the agent restarts both, and they resume from the
    # checkpoint of the end of epoch 0 and say so
    out = tmp_path / "out"
    cmd = torchrun(["--standalone", "--nproc_per_node=2", "--max-restarts=1"],
                   os.path.join(HERE, "pretrain.py"),
                   ddp_args(distinct_tree, out, "--epochs", "2", "--workers", "0"))
    with launched(cmd) as (agent,):
        agent.read_until("epoch 0 done")
        os.kill(rank_process(agent.proc.pid, 1), signal.SIGKILL)
        code, rest = agent.rest()
    assert code == 0, rest[-3000:]
    assert f"resuming from {out / 'ckpt.pt'}: epoch 1, step 12" in rest, rest[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 2
    assert [r["step"] for r in read_log(out)][-12:] == list(range(13, 25))


# -----------------------------------------------------------------------------
# pretrain.py: does it learn? Every method memorises a small set of distinct clips through the


def learning_args(root, out, method, arch, epochs=30):
    """30 epochs of 3 steps: 90 steps of a batch of 16 against a queue of 16 keys (ln 17 = 2.83), or
    31 in-batch negatives for CVRL (ln 31 = 3.43). No colour jitter: the clips differ by colour. One
    BN batch (--shuffle-splits 1): this test is about the losses, heads and optimisation; BN over
    sub-batches of 8 is noisy enough to hold instance accuracy at 0.4-0.8 here (measured), and the
    emulation itself is tested in train mode below. Paper-size encoders at a smaller input."""
    small = ["--frames", "4", "--crop", "16"] if arch != "tiny" else ["--frames", "8",
                                                                      "--crop", "32"]
    return ["--dataset", "folder", "--data-root", root, "--out", str(out), "--method", method,
            "--arch", arch,
            *small, "--batch-size", "16", "--moco-k", "16", "--moco-m", "0.99",
            "--shuffle-splits", "1",
            "--lr", "0.05", "--jitter", "0", "--grayscale", "0", "--epochs", str(epochs),
            "--workers", "0",
            "--print-freq", "1000", "--drop-frames", "2"]


@pytest.mark.parametrize("method,arch,extra", [
    ("videomoco", "tiny", []), ("moco", "tiny", []), ("cvrl", "tiny", []), ("vclr", "tiny", []),
    ("videomoco", "r3d_10", []),
    ("videomoco", "tiny", ["--augment-on", "device", "--repeat-sample", "2", "--epochs", "15"])])
def test_pretext_task_memorises_a_small_set(distinct_tree, tmp_path, method, arch, extra):
    # Every method and a paper-size encoder, through pretrain.main; and VideoMoCo with uint8 batches
    # augmented on the training device and two samples per decoded video, in as many steps.
    # (The head's collapse itself is isolated by
    # test_linear_head_learns_noise_patterns_where_the_classifier_init_collapses.)
    pretrain.main(learning_args(distinct_tree, tmp_path, method, arch) + extra)
    epochs = [r for r in read_log(tmp_path, "epoch") if "loss" in r]
    last = epochs[-1]
    assert len(epochs) == (15 if extra else 30)
    assert last["chance"] == pytest.approx(math.log(31 if method == "cvrl" else 17), rel=1e-3)
    assert last["loss"] < 0.5 * last["chance"], [round(r["loss"], 2) for r in epochs]
    assert last["acc"] >= 0.8, [round(r["acc"], 2) for r in epochs]
    assert last["spread"] > 0.3
    # and without a queue to fool it: 48 probe clips against their fresh keys (chance ln 48, 1/48;
    # measured 0.98-1.54 and 0.52-0.73)
    assert last["probe_chance"] == pytest.approx(math.log(48))
    assert last["probe_loss"] < 0.5 * last["probe_chance"], [round(r["probe_loss"], 2)
                                                             for r in epochs]
    assert last["probe_top1"] > 0.4, [round(r["probe_top1"], 2) for r in epochs]


def test_feature_spread_matches_loop_and_reads_one_when_isotropic_zero_when_collapsed():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 16, generator=gen) + 0.5
    unit = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in z.tolist()]
    stds = []
    for j in range(16):
        col = [row[j] for row in unit]
        mean = sum(col) / len(col)
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in col) / (len(col) - 1)))
    expected = sum(stds) / 16 * math.sqrt(16)
    assert pretrain.feature_spread(z).item() == pytest.approx(expected, rel=1e-5)
    isotropic = torch.randn(4096, 32, generator=gen)
    assert pretrain.feature_spread(isotropic).item() == pytest.approx(1.0, abs=0.05)
    collapsed = torch.randn(1, 32, generator=gen).expand(8, 32)
    assert pretrain.feature_spread(collapsed).item() == pytest.approx(0, abs=1e-6)


def test_queue_free_metric_matches_a_loop():
    # two views of 6 clips through copies of encoder_q and encoder_k in train mode (queries in
    # contiguous sub-batches of 3, keys in shuffled ones), then InfoNCE of each query against all 6
    # keys written out; the model itself is untouched
    torch.manual_seed(3)
    model = models.VideoMoCo(TINY, dim=8, K=16, m=0.5, tau=0.2)
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(0.1 * torch.randn_like(p))
    video = torch.randn(6, 2, 3, 4, 16, 16)
    before = copy.deepcopy(model.state_dict())
    loss, top1, chance = pretrain.queue_free_metric(model, [{"video": video}], 3,
                                                    torch.device("cpu"), contextlib.nullcontext())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q = torch.cat([model.encoder_q(video[:3, 0]), model.encoder_q(video[3:, 0])])
        shuffled = torch.cat([model.encoder_k(video[perm[:3], 1]),
                              model.encoder_k(video[perm[3:], 1])])
    k = torch.empty_like(shuffled)
    k[perm] = shuffled
    q, k = F.normalize(q, dim=1).tolist(), F.normalize(k, dim=1).tolist()
    losses, hits = [], 0
    for i in range(6):
        logits = [dot(q[i], k[j]) / 0.2 for j in range(6)]
        losses.append(-logits[i] + math.log(sum(math.exp(v) for v in logits)))
        hits += max(range(6), key=lambda j: logits[j]) == i
    assert loss == pytest.approx(sum(losses) / 6, rel=1e-5)
    assert top1 == pytest.approx(hits / 6) and chance == pytest.approx(math.log(6))


class DriftingCollapse(nn.Module):
    """Every clip maps onto one direction that turns by 0.5 rad per step, plus a 1e-3 part of its
    own: a collapsed embedding, with no instance information to speak of, that drifts with the
    steps as a collapsed encoder does with the lr."""

    def __init__(self):
        super().__init__()
        self.step = 0

    def forward(self, x):  # (N, 3, T, H, W) -> (N, 8)
        v = torch.zeros(8)
        v[0], v[1] = math.cos(0.5 * self.step), math.sin(0.5 * self.step)
        return v + 1e-3 * x.flatten(1)[:, :8]


def test_a_drifting_collapse_fools_the_training_loss_and_not_the_queue_free_metric():
    # (learning-evidence.md) Each step, a batch of 4 clips against a queue of the 16 keys written
    # in the 4 steps before: the positive is the only key of the current direction, so the
    # training loss sits far below its chance level and the old collapse rule (the training loss
    # within 2 % of chance) sees nothing. The queue-free metric scores against fresh keys of other
    # clips, which share the direction: its loss sits at ln P, and the guard fires.
    gen = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.encoder_q = model.encoder_k = DriftingCollapse()
    model.tau = 0.07
    queue, losses = [], []
    for step in range(12):
        model.encoder_q.step = step
        x = torch.randn(4, 3, 2, 4, 4, generator=gen)
        q = F.normalize(model.encoder_q(x + 0.01 * torch.randn(x.shape, generator=gen)), dim=1)
        k = F.normalize(model.encoder_k(x), dim=1)
        if len(queue) == 16:
            ages = torch.arange(1, 17).flip(0)
            losses.append(models.decayed_infonce(q, k, torch.stack(queue).T, ages, 0.07, 1.0))
        queue = (queue + list(k))[-16:]
    chance = math.log(17)
    training = sum(losses).item() / len(losses)
    assert training < 0.5 * chance  # "learning", by the training loss
    # (its feature spread, ~0, trips the spread rule too; 0.5 isolates the two loss rules)
    assert pretrain.collapse_warning(training, 0.5, chance) is None
    probe = [{"video": torch.randn(16, 2, 3, 2, 4, 4, generator=gen)}]
    loss, top1, probe_chance = pretrain.queue_free_metric(model, probe, 4, torch.device("cpu"),
                                                          contextlib.nullcontext())
    assert loss > 0.98 * probe_chance and probe_chance == pytest.approx(math.log(16))
    assert "queue-free loss" in pretrain.collapse_warning(loss, 0.5, probe_chance)


def test_collapse_guard_warns_once_when_the_loss_sits_at_chance(small_tree, tmp_path, capsys):
    # tau = 100 makes every logit ~0, so the training loss is ln(K+1) and the queue-free loss ln P
    # to within 1 %: the guard must say so, once
    pretrain.main(small_args(small_tree, tmp_path, "--moco-t", "100", "--epochs", "3",
                             "--adv-start", "3"))
    out = capsys.readouterr().out
    epochs = [r for r in read_log(tmp_path, "epoch") if "loss" in r]
    assert len(epochs) == 3 and all(r["loss"] > 0.98 * r["chance"] for r in epochs)
    assert all(r["probe_loss"] > 0.98 * r["probe_chance"] for r in epochs)
    assert epochs[0]["chance"] == pytest.approx(math.log(13))  # Eq 1 before --adv-start
    assert epochs[0]["probe_chance"] == pytest.approx(math.log(8))  # the 8 videos of small_tree
    assert out.count("warning: the queue-free loss") == 1
    assert pretrain.collapse_warning(loss=2.0, spread=0.8, chance=math.log(13)) is None
    assert "spread" in pretrain.collapse_warning(loss=2.0, spread=0.01, chance=math.log(13))


def naive_knn_top1(encoder, train, test, frames, stride, crop, k=20, temperature=0.07):
    """kNN top-1 by hand: BN statistics of the training videos' centre clips (one batch), pooled
    features one clip at a time, cosine, a Python loop for the weighted vote."""
    encoder = naive_bn_estimate(encoder, torch.cat([centre_clip(p, frames, stride, crop)
                                                    for p, _ in train]))

    def feature(path):
        with torch.no_grad(), models.pooled_features(encoder):
            f = encoder(centre_clip(path, frames, stride, crop))[0]
        return f / f.norm()

    gallery = [(feature(p), y) for p, y in train]
    correct = 0
    for p, y in test:
        f = feature(p)
        nearest = sorted(gallery, key=lambda g: -float(f @ g[0]))[:k]
        votes = {}
        for g, label in nearest:
            votes[label] = votes.get(label, 0.0) + math.exp(float(f @ g) / temperature)
        correct += max(votes, key=votes.get) == y
    return correct / len(test)


def test_knn_monitor_matches_a_naive_loop(small_tree):
    torch.manual_seed(0)
    encoder = models.build_encoder("tiny", 8).eval()
    before = copy.deepcopy(encoder.state_dict())
    args = pretrain.get_args_parser().parse_args(["--dataset", "folder", "--data-root", small_tree,
                                                  "--frames", "4",
                                                  "--crop", "32"])
    monitor = pretrain.KNNMonitor(args, workers=0, k=3)
    samples, _, _ = data.list_videos("folder", small_tree)
    expected = naive_knn_top1(encoder, samples, samples, 4, 1, 32, k=3)
    assert monitor(encoder, torch.device("cpu"),
                   contextlib.nullcontext()) == pytest.approx(expected)
    assert not encoder.training  # the monitor leaves the mode it found, and the statistics
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


def test_pretrain_monitor_measures_random_init_first_then_logs(
        small_tree, tmp_path, capsys):
    pretrain.main(small_args(small_tree, tmp_path, "--knn-every", "1", "--epochs", "2"))
    out = capsys.readouterr().out
    with open(tmp_path / "log.jsonl") as f:
        first = [json.loads(f.readline()) for _ in range(2)]
    # before any step: the queue-free metric, then kNN
    assert all(r["curve"] and r["epoch"] == 0 and "loss" not in r for r in first)
    assert "probe_loss" in first[0] and "knn_top1" in first[1]
    epochs = read_log(tmp_path, "epoch")
    assert [r["epoch"] for r in epochs if "knn_top1" in r] == [0, 1, 2]
    assert [r["epoch"] for r in epochs if "probe_loss" in r] == [0, 1, 2]
    assert [r["epoch"] for r in epochs if "loss" in r] == [1, 2]
    knn = [r for r in epochs if "knn_top1" in r]
    assert all(0 <= r["knn_top1"] <= 1 and r["knn_chance"] == 0.5 for r in knn)
    assert "kNN top-1 on the test split went from" in out
    assert "queue-free loss went from" in out


def test_pretrain_draws_its_curves_and_says_how_where_matplotlib_is_missing(small_tree, tmp_path,
                                                                            monkeypatch, capsys):
    # curves.png at the end of the run, one panel per quantity, from log.jsonl; without matplotlib
    # the run ends as it would, with one line that says how to draw it, and curves.py draws the
    # same picture from the log afterwards
    import cv2
    import curves
    out = tmp_path / "run"
    pretrain.main(small_args(small_tree, out))
    image = cv2.imread(str(out / "curves.png"))
    assert image is not None and image.shape[1] > image.shape[0]  # 2 x 4 panels
    assert f"learning curves: {out / 'curves.png'}" in capsys.readouterr().out
    epochs = curves.read_curves(str(out / "log.jsonl"))
    assert list(epochs) == [0, 1, 2]  # random init, then the two epochs
    torn = tmp_path / "torn.jsonl"  # a run stopped while writing its last line
    torn.write_text(open(out / "log.jsonl").read() + '{"curve": true, "epoch": 3, "lo')
    assert curves.read_curves(str(torn)) == epochs
    assert curves.series(epochs, "loss", "chance")[0] == [1, 2]
    assert "g_vs_random" in epochs[2] and "g_vs_random" not in epochs[1]  # adversarial from 1
    # what G dropped in its epoch: the share of its drops at each of the 4 positions (at the
    # measured steps), and its importance's correlation with motion
    drops = epochs[2]["drops"]
    assert len(drops) == 4 and sum(drops) == pytest.approx(1)
    assert -1 <= epochs[2]["motion_corr"] <= 1 and "drops" not in epochs[1]
    gap = {1: {"drops": [0.5, 0.5]}, 2: {}, 4: {"drops": [1.0, 0.0]}}  # a resumed run's blank
    columns = curves.drop_columns(gap, [1, 4])
    assert len(columns) == 4 and columns[0] == [0.5, 0.5] and columns[3] == [1.0, 0.0]
    assert all(math.isnan(v) for v in columns[1] + columns[2])
    (out / "curves.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    bare = tmp_path / "bare"
    pretrain.main(small_args(small_tree, bare))
    lines = capsys.readouterr().out.splitlines()
    missing = [line for line in lines if "curves.png not drawn" in line]
    assert missing == [curves.MISSING.format(log=bare / "log.jsonl")]
    assert (bare / "ckpt.pt").exists() and not (bare / "curves.png").exists()
    with pytest.raises(SystemExit, match="matplotlib is not installed"):
        curves.main([str(out / "log.jsonl")])
    monkeypatch.undo()  # matplotlib back
    curves.main([str(out / "log.jsonl")])
    assert cv2.imread(str(out / "curves.png")).shape == image.shape


def test_pretrain_logs_what_g_drops_from_its_scores_and_the_clip_it_scored(small_tree, tmp_path,
                                                                          monkeypatch):
    # a G whose importance is each frame's motion: its epoch record must say r(importance,
    # motion) = 1, and its drop histogram must be the top-k of the scores it returned, counted
    # per clip position (every step of the small epoch is a measured one)
    seen = []

    class MotionG(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            importance = models.frame_motion(x) + 0 * self.w
            seen.append(importance.detach().clone())
            return importance

    monkeypatch.setattr(models, "ConvLSTMGenerator", MotionG)
    out = tmp_path / "run"
    pretrain.main(small_args(small_tree, out, "--epochs", "1", "--adv-start", "0"))
    record = curves.read_curves(str(out / "log.jsonl"))[1]
    assert record["motion_corr"] == pytest.approx(1, abs=1e-4)
    top = torch.cat([s.topk(1, dim=1).indices[:, 0] for s in seen])  # --drop-frames 1
    counts = torch.bincount(top, minlength=4).float()
    assert record["drops"] == pytest.approx((counts / counts.sum()).tolist(), abs=1e-6)
    assert counts.max() < counts.sum()  # not one position only: the histogram has to be per clip


def test_curves_refuses_what_is_not_a_pretraining_log_in_one_line(tmp_path):
    binary = tmp_path / "video.avi"
    binary.write_bytes(bytes(range(256)) * 4)
    steps = tmp_path / "steps.jsonl"  # JSON, but not one per-epoch record among them
    steps.write_text('[1, 2]\n3\n"curve"\n{"epoch": 0, "step": 1, "loss_d": 9.0}\n'
                     '{"curve": true}\n')
    log = tmp_path / "log.jsonl"
    log.write_text('[1, 2]\n{"curve": true, "epoch": 0, "knn_top1": 0.2}\n')
    for argv, message in (([str(binary)], "not a readable log.jsonl"),
                          ([str(tmp_path)], "is not a file"),
                          ([str(steps)], "no per-epoch record"),
                          ([str(log), "--png", str(tmp_path / "no" / "c.png")],
                           "folder of .* does not exist")):
        with pytest.raises(SystemExit, match=message) as e:
            curves.main(argv)
        assert "\n" not in str(e.value)
    assert list(curves.read_curves(str(log))) == [0]  # the list line skipped, the record kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "steps.jsonl", "video.avi"]


def test_learning_summary_reads_the_first_and_last_measurements(tmp_path, capsys):
    log = utils.Logger(str(tmp_path), 0)
    with open(log.path, "w") as f:
        f.write(json.dumps({"curve": True, "epoch": 0, "knn_top1": 0.2, "knn_chance": 1 / 6,
                            "probe_loss": 4.0, "probe_top1": 0.1, "probe_chance": math.log(64)})
                + "\n")
        f.write(json.dumps({"epoch": 0, "step": 1, "loss_d": 9.0}) + "\n")  # a step record
        for e in range(1, 11):
            f.write(json.dumps({"curve": True, "epoch": e, "probe_loss": 4.0 - 0.3 * e,
                                "probe_top1": 0.1 + 0.05 * e, "probe_chance": math.log(64),
                                "knn_top1": 0.2 + 0.04 * e, "knn_chance": 1 / 6}) + "\n")
        # a resumed run's later value replaces the earlier one
        f.write(json.dumps({"curve": True, "epoch": 10, "knn_top1": 0.7}) + "\n")
    pretrain.learning_summary(log, 10)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["queue-free loss went from 4.000 at epoch 0 to 1.000 after 10 epochs (chance "
                     "4.159), its top-1 from 0.100 to 0.600 (chance 0.016)",
                     "kNN top-1 on the test split went from 0.200 at epoch 0 to 0.700 after 10 "
                     "epochs (chance 0.167)"]


# -----------------------------------------------------------------------------
# pretrain.py with the other methods and switches, into finetune.py and evaluate.py


@pytest.mark.parametrize("method", ["cvrl", "vclr"])
def test_other_methods_pretrain_and_feed_finetune_and_evaluate_unchanged(small_tree,
                                                                         tmp_path, method):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    pretrain.main(small_args(small_tree, pre, "--method", method,
                             "--epochs", "1"))
    log = read_log(pre)
    assert {r["phase"] for r in log} == {method} and all(np.isfinite(r["loss_d"]) for r in log)
    assert method != "vclr" or all(0 <= r["order_acc"] <= 1 and r["loss_order"] > 0 for r in log)
    ckpt = torch.load(pre / "ckpt.pt", weights_only=True)
    assert ckpt["method"] == method and ckpt["generator"] is None
    backbone = torch.load(pre / "backbone.pt", weights_only=True)
    missing = models.build_encoder("tiny", 16).load_state_dict(backbone, strict=False).missing_keys
    assert missing == ["fc.weight", "fc.bias"]  # every head is left out
    finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--dataset", "folder", "--data-root", small_tree,
                   "--out", str(ft),
                   "--epochs", "1", "--batch-size", "4", "--workers", "0"])
    out = evaluate.main(["--ckpt", str(ft / "ckpt.pt"), "--clips", "2", "--workers", "0"])
    assert out["n_videos"] == 8 and 0 <= out["top1"] <= 1
    knn = evaluate.main(["--ckpt", str(pre / "ckpt.pt"), "--clips", "2", "--workers", "0"])
    assert 0 <= knn["R@1"] <= 1


def test_input_mode_is_recorded_and_a_mismatching_override_refused(small_tree, tmp_path):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    pretrain.main(small_args(small_tree, pre, "--input", "residual", "--background-erasing", "0.5",
                             "--epochs", "1",
                             "--adv-start", "0"))
    assert all(np.isfinite(r["loss_d"]) and np.isfinite(r["loss_g"]) for r in read_log(pre))
    with pytest.raises(SystemExit, match="pretrained on residual input"):
        finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--input", "rgb", "--out", str(ft)])
    model = finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--dataset", "folder", "--data-root",
                           small_tree, "--out", str(ft), "--epochs", "1", "--batch-size", "4",
                           "--workers", "0"])
    assert model.input_mode == "residual"
    assert torch.load(ft / "ckpt.pt", weights_only=True)["input"] == "residual"
    out = evaluate.main(["--ckpt", str(ft / "ckpt.pt"), "--clips", "2", "--workers", "0"])
    assert out["input"] == "residual"
    with pytest.raises(SystemExit, match="trained on residual input"):
        evaluate.main(["--ckpt", str(pre / "ckpt.pt"), "--input", "rgb"])
    with pytest.raises(SystemExit, match="--input residual run"):
        pretrain.main(small_args(small_tree, pre, "--epochs", "2"))  # resuming with another input


# -----------------------------------------------------------------------------
# finetune.py


def test_finetune_keeps_the_pretext_augmentation_but_the_demo_and_the_probe_do_not():
    # Sec 4.2: finetuning keeps the pretext stage's pre-processing (pretrain.py's defaults); the
    # demo preset and the linear probe (MAE's) use crop and flip only
    args = finetune.parse_args(["--data-root", "/x", "--dataset", "folder"])[0]
    pretext = pretrain.parse_args(["--data-root", "/x", "--dataset", "folder"])[0]
    assert (args.jitter, args.grayscale) == (pretext.jitter, pretext.grayscale) == (0.8, 0.2)
    for argv in ([], ["--data-root", "/x", "--dataset", "folder", "--linear"]):
        args = finetune.parse_args(argv)[0]
        assert (args.jitter, args.grayscale) == (0.0, 0.0)


def test_linear_probe_trains_only_the_head_and_finetune_resumes(small_tree, tmp_path, capsys):
    pre, lin = tmp_path / "pre", tmp_path / "lin"
    pretrain.main(small_args(small_tree, pre, "--epochs", "1"))
    argv = ["--ckpt", str(pre / "backbone.pt"), "--arch", "tiny", "--linear", "--dataset", "folder",
            "--data-root", small_tree, "--frames", "4", "--crop", "32", "--out", str(lin),
            "--epochs", "1",
            "--batch-size", "4", "--workers", "0"]
    model = finetune.main(argv)
    backbone = torch.load(pre / "backbone.pt", weights_only=True)
    samples, _, _ = data.list_videos("folder", small_tree)
    reference = models.build_encoder("tiny", 2)
    reference.load_state_dict(backbone, strict=False)
    # the frozen backbone's BN statistics, re-estimated on the training videos' centre clips
    reference = naive_bn_estimate(reference, torch.cat([centre_clip(p, 4, 1, 32)
                                                        for p, _ in samples]))
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            continue
        if "running_" in key:
            torch.testing.assert_close(value, reference.state_dict()[key], rtol=1e-4, atol=1e-6)
        elif "num_batches" in key:
            assert value == 1  # reset, then one batch of the 8 videos
        else:
            assert torch.equal(value, backbone[key]), key  # frozen
    assert torch.load(lin / "ckpt.pt",
                      weights_only=True)["args"]["lr"] == finetune.LINEAR_DEFAULTS["lr"]
    norm, fc = model.fc  # the probe: standardised features, then a linear layer
    assert not norm.affine and norm.num_batches_tracked > 0 and norm.running_mean.abs().sum() > 0
    assert isinstance(fc, torch.nn.Linear)
    out = evaluate.main(["--ckpt", str(lin / "ckpt.pt"), "--clips", "2", "--workers", "0"])
    assert out["kind"] == "finetune" and out["n_videos"] == 8
    capsys.readouterr()
    finetune.main(argv[:-6] + ["--epochs", "2", "--batch-size", "4", "--workers", "0"])
    assert f"resuming from {lin / 'ckpt.pt'}: epoch 1" in capsys.readouterr().out


def test_finetune_and_evaluate_take_the_dataset_from_the_checkpoint(small_tree, tmp_path, capsys):
    # the pretraining's dataset and root are the downstream default; a given dataset that differs
    # is said in one line
    pre = tmp_path / "pre"
    pretrain.main(small_args(small_tree, pre, "--epochs", "1"))
    run = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--linear"]
    capsys.readouterr()
    finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--out", str(tmp_path / "same"), *run])
    data_settings = torch.load(tmp_path / "same" / "ckpt.pt", weights_only=True)["data"]
    assert data_settings["dataset"] == "folder" and data_settings["data_root"] == small_tree
    assert "note:" not in capsys.readouterr().out
    kinetics = tmp_path / "k400"  # the same videos in the Kinetics layout
    for split in ("train", "val"):
        shutil.copytree(os.path.join(small_tree, "c0"), kinetics / split / "c0")
        shutil.copytree(os.path.join(small_tree, "c1"), kinetics / split / "c1")
    other = ["--dataset", "kinetics", "--data-root", str(kinetics)]
    finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--out", str(tmp_path / "other"), *run, *other])
    data_settings = torch.load(tmp_path / "other" / "ckpt.pt", weights_only=True)["data"]
    assert data_settings["dataset"] == "kinetics" and data_settings["frames"] == 4
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert notes == [f"note: finetuning on --dataset kinetics; {pre / 'ckpt.pt'} was pretrained "
                     "on folder"]
    evaluate.main(["--ckpt", str(pre / "ckpt.pt"), "--clips", "1", "--workers", "0", *other])
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert notes == [f"note: evaluating on --dataset kinetics; {pre / 'ckpt.pt'} was trained on "
                     "folder"]


# -----------------------------------------------------------------------------
# evaluate.py


def test_retrieval_recall_matches_brute_force_loop():
    gen = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(30, 8, generator=gen), dim=1)
    gallery = F.normalize(torch.randn(50, 8, generator=gen), dim=1)
    ql, gl = torch.randint(0, 4, (30,), generator=gen), torch.randint(0, 4, (50,), generator=gen)
    got = evaluate.retrieval_recall(query, gallery, ql, gl, ks=(1, 5, 10, 20))
    for k in (1, 5, 10, 20):
        hits = 0
        for i in range(30):
            dist_ = [(-sum(query[i][d].item() * gallery[j][d].item() for d in range(8)), j)
                     for j in range(50)]
            nearest = [j for _, j in sorted(dist_)[:k]]
            hits += any(gl[j] == ql[i] for j in nearest)
        assert got[f"R@{k}"] == pytest.approx(hits / 30)


def test_knn_vote_and_entropy_match_loops():
    gen = torch.Generator().manual_seed(1)
    query = F.normalize(torch.randn(12, 6, generator=gen), dim=1)
    gallery = F.normalize(torch.randn(40, 6, generator=gen), dim=1)
    gl = torch.randint(0, 3, (40,), generator=gen)
    pred = utils.knn_predict(query, gallery, gl, 3, k=7, temperature=0.1)
    for i in range(12):
        sims = sorted(((query[i] @ gallery[j]).item(), j) for j in range(40))[-7:]
        votes = [0.0] * 3
        for s, j in sims:
            votes[int(gl[j])] += math.exp(s / 0.1)
        assert int(pred[i]) == max(range(3), key=lambda c: votes[c])
    probs = torch.softmax(torch.randn(5, 4, generator=gen), dim=1)
    for row, h in zip(probs, evaluate.entropy(probs)):
        assert h.item() == pytest.approx(-sum(p * math.log(p) for p in row.tolist()), rel=1e-5)


def test_grad_cam_matches_a_naive_gradient_weighted_sum_and_the_cam_of_a_pooled_linear_head():
    torch.manual_seed(0)
    tiny = models.build_encoder("tiny", 3).eval()
    x = torch.randn(2, 3, 16, 16, 16)
    target = torch.tensor([2, 0])
    assert evaluate.last_conv_block(tiny) is tiny.features
    # the last block, and one inside the net (stage 2 of 4), where the gradient varies over
    # (t, h, w)
    for cut, shape in ((len(tiny.features), (2, 2, 1, 1)), (6, (2, 8, 4, 4))):
        layer = tiny.features if cut == len(tiny.features) else tiny.features[cut - 1]
        got = evaluate.grad_cam(tiny, x, target, layer)  # (N, t, h, w)
        assert got.shape == shape
        for n in range(2):  # each clip on its own: its own forward and backward
            a = tiny.features[:cut](x[n:n + 1])  # (1, K, t, h, w)
            score = tiny.fc(tiny.avgpool(tiny.features[cut:](a)).flatten(1))[0, target[n]]
            grad, = torch.autograd.grad(score, a)
            cam = torch.zeros(a.shape[2:])
            for k in range(a.shape[1]):
                cam += grad[0, k].mean() * a[0, k].detach()
            assert torch.allclose(got[n], cam.clamp(min=0), atol=1e-6)
    # a head of global average pooling then fc: d score / d A_k = w[target, k] / (t h w), so
    # Grad-CAM is the CAM of Zhou et al. 2016, relu(sum_k w_k A_k) / (t h w), with no autograd
    net = models.build_encoder("r2plus1d_10", 4).eval()
    x = torch.randn(2, 3, 16, 32, 32)
    target = torch.tensor([1, 3])
    got = evaluate.grad_cam(net, x, target, evaluate.last_conv_block(net))
    store = {}
    net.layer4.register_forward_hook(lambda m, i, out: store.update(a=out.detach()))
    with torch.no_grad():
        net(x)
    a = store["a"]  # (N, 512, t, h, w)
    for n in range(2):
        w = net.fc.weight[target[n]].detach()
        cam = sum(w[k] * a[n, k] for k in range(a.shape[1])) / a[n, 0].numel()
        assert torch.allclose(got[n], cam.clamp(min=0), atol=1e-6)
    per_frame = evaluate.cam_per_frame(got, x.shape[2:])
    assert got.shape == (2, 2, 2, 2) and per_frame.shape == (2, 16, 32, 32)
    assert per_frame.min() >= 0
    assert torch.allclose(per_frame.flatten(1).amax(dim=1), torch.ones(2))


def test_the_figures_are_written_and_decode_as_images_of_the_expected_size(tmp_path):
    import cv2
    import visualize
    gen = torch.Generator().manual_seed(0)
    v, t, h, w, height = 2, 6, 24, 32, 20
    clips = [torch.rand(3, t, h, w, generator=gen) for _ in range(v)]
    titles = ["a: c0", "b: c1"]
    masks = {"none": torch.zeros(v, t), "random": torch.zeros(v, t)}
    masks["random"][:, 2] = 1
    captions = {m: [[("A: c0 H=0.10", visualize.GREEN)]] * v for m in masks}
    path = str(tmp_path / "fig4.png")
    visualize.occlusion_figure(path, clips, titles, masks, captions, height=height)
    image = cv2.imread(path)
    pad = visualize.PAD
    tile = round(w * height / h)
    strip_w = t * tile + (t + 1) * pad
    block = 16 + pad + len(masks) * (height + 2 * pad + pad)
    assert image.shape == (v * (block + 10), strip_w + 300, 3)
    # the dropped frame is crossed in red at its centre; the frame beside it is the frame
    row = 16 + pad + (height + 3 * pad) + pad  # the first video's "random" strip, top
    centre = image[row + height // 2, pad + 2 * (tile + pad) + tile // 2].astype(int)
    assert centre[2] > 150 and centre[0] < 90 and centre[1] < 90  # BGR red
    frame = visualize.to_bgr(clips[0], height)[3]
    beside = image[row:row + height, pad + 3 * (tile + pad):pad + 3 * (tile + pad) + tile]
    assert np.abs(beside.astype(int) - frame.astype(int)).max() <= 8  # the 5-bit colours
    # Fig 5: a CAM of 1 (red in JET) at the top left, 0 (blue) elsewhere, over a grey clip
    grey = [torch.full((3, t, h, w), 0.5)] * v
    cam = torch.zeros(t, h, w)
    cam[:, : h // 2, : w // 2] = 1
    path = str(tmp_path / "fig5.png")
    visualize.cam_figure(path, grey, titles, {"A": [cam] * v, "B": [cam] * v},
                         {"A": [[]] * v, "B": [[]] * v}, height=height, max_frames=4)
    image = cv2.imread(path)
    block = 16 + pad + 3 * (height + 3 * pad)
    assert image.shape == (v * (block + 10), 4 * tile + 5 * pad + 300, 3)
    top = 16 + pad + (height + 3 * pad) + pad  # A's overlay strip
    hot = image[top + 2, pad + 2].astype(int)
    cold = image[top + height - 3, pad + tile - 3].astype(int)
    assert hot[2] > hot[0] + 40 and cold[0] > cold[2] + 40


def test_evaluate_compares_checkpoints_on_the_same_clips_and_drops_and_draws_both_figures(
        small_tree, tmp_path, monkeypatch):
    import cv2
    titles = {}  # what each figure's rows show
    for name in ("occlusion_figure", "cam_figure"):
        def record(path, clips, rows, *rest, draw=getattr(evaluate.visualize, name), name=name):
            titles[name] = rows
            return draw(path, clips, rows, *rest)
        monkeypatch.setattr(evaluate.visualize, name, record)
    passes = []  # over the test set
    monkeypatch.setattr(evaluate, "per_video", lambda *a: passes.append(1) or utils.per_video(*a))
    pre = tmp_path / "pre"
    pretrain.main(small_args(small_tree, pre, "--epochs", "1", "--adv-start", "0"))
    fine = []
    for name, extra in (("a", []), ("b", ["--linear"])):
        finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--out", str(tmp_path / name), "--epochs",
                       "1", "--batch-size", "4", "--workers", "0", *extra])
        fine.append(str(tmp_path / name / "ckpt.pt"))
    run = ["--clips", "2", "--workers", "0", "--batch-size", "3", "--occlusion"]
    # A twice under two labels: each batch is dropped once per mode and given to every checkpoint,
    # so A's rows agree with A2's in every mode, the random drops included
    both = evaluate.main(["--ckpt", fine[0], "--ckpt", fine[1], "--ckpt", fine[0], "--label", "A",
                          "--label", "B", "--label", "A2", *run, "--figure",
                          str(tmp_path / "f4.png"), "--cam", str(tmp_path / "f5.png"),
                          "--figure-videos", "2"])
    first, second, again = both["checkpoints"]
    assert len(passes) == 1  # one pass: the "none" mode is the test, top-1/5 come from it
    # B alone, without --occlusion (its own test pass): the same top-1/5, and its own Grad-CAM
    alone = evaluate.main(["--ckpt", fine[1], "--clips", "2", "--workers", "0", "--batch-size",
                           "3", "--cam", str(tmp_path / "b.png"), "--figure-videos", "2"])
    assert len(passes) == 2 and "top1_none" not in alone
    for key in ("top1", "top5", "n_videos", "n_skipped", "cam_motion_r"):
        assert second[key] == pytest.approx(alone[key], abs=1e-6), key
    assert (first["label"], second["label"], again["label"]) == ("A", "B", "A2")
    for key in ("top1", "entropy_none", "entropy_random", "top1_random", "entropy_adversarial",
                "top1_adversarial", "per_video", "cam_motion_r"):
        assert first[key] == again[key], key
    assert [t + " (Grad-CAM of this class)" for t in titles["occlusion_figure"]] == \
        titles["cam_figure"] and len(titles["cam_figure"]) == 2  # the same videos in both
    occl = both["occlusion"]
    assert occl["generator"] == fine[0] and occl["drop_frames"] == 1  # A's G: its pretraining's
    for mode in ("random", "adversarial"):  # k = 1 frame of each of the 8 videos' first clips
        assert [len(d) for d in occl["dropped_first_clip"][mode]] == [1] * 8
    assert occl["dropped_first_clip"]["none"] == [[]] * 8
    for r in (first, second):
        for mode in ("none", "random", "adversarial"):
            per = r["per_video"][mode]
            assert len(per["pred"]) == len(per["entropy"]) == 8
            assert sum(per["entropy"]) / 8 == pytest.approx(r[f"entropy_{mode}"], abs=1e-4)
            hits = [p == y for p, y in zip(per["pred"], occl["labels"])]
            assert sum(hits) / 8 == pytest.approx(r[f"top1_{mode}"])
        assert r["top1_lost_random"] == pytest.approx(r["top1_none"] - r["top1_random"])
        assert -1 <= r["cam_motion_r"] <= 1
    for name in ("f4.png", "f5.png"):
        image = cv2.imread(str(tmp_path / name))
        assert image is not None and image.ndim == 3 and image.shape[0] > 100
    with pytest.raises(SystemExit, match="2 --label for 1 --ckpt"):
        evaluate.main(["--ckpt", fine[0], "--label", "A", "--label", "B"])
    with pytest.raises(SystemExit, match="need finetuned checkpoints"):
        evaluate.main(["--ckpt", fine[0], "--ckpt", str(pre / "ckpt.pt"), "--cam", "x.png"])
    with pytest.raises(SystemExit, match="share a label"):
        evaluate.main(["--ckpt", fine[0], "--ckpt", fine[1], "--label", "A", "--label", "A"])
    with pytest.raises(SystemExit, match="at least 1 video"):
        evaluate.main(["--ckpt", fine[0], "--cam", str(tmp_path / "x.png"), "--figure-videos", "0"])
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main(["--ckpt", fine[0], "--figure", str(tmp_path / "no" / "x.png")])
    other = torch.load(fine[0], weights_only=True)
    other["classes"] = ["x", "y"]
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="classifies 2 classes"):
        evaluate.main(["--ckpt", str(tmp_path / "other.pt")])


def test_occlusion_entropy_and_top1_are_those_of_the_clip_averaged_softmax():
    # evaluate.occlusion against a loop, video by video and clip by clip: each mode's drop on
    # each clip alone, the softmax averaged over the video's 2 clips, its entropy in nats, its
    # argmax against the label; a video that does not decode is left out
    torch.manual_seed(0)
    t, classes = 4, 3
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(3 * t * 5 * 5, classes)).eval()
            for _ in range(2)]
    loaded = [types.SimpleNamespace(model=m, ckpt={"classes": list("abc")}) for m in nets]
    videos = torch.randn(7, 2, 3, t, 5, 5)  # (V, clips, 3, T, H, W)
    valid = torch.tensor([True, True, False, True, True, True, True])
    loader = [{"video": videos[i:i + 3], "index": torch.arange(i, min(i + 3, 7)),
               "valid": valid[i:i + 3]} for i in range(0, 7, 3)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    drops = {"none": lambda x: (x, x.new_zeros(x.shape[0], x.shape[2])),  # the brightest frame:
             "bright": lambda x: models.drop_frames(x, x.mean(dim=(1, 3, 4)), 1)}  # per clip
    args = types.SimpleNamespace(frames=t)
    results, masks, index, skipped = evaluate.occlusion(
        loaded, loader, labels, drops, args, torch.device("cpu"), contextlib.nullcontext())
    assert index.tolist() == [0, 1, 3, 4, 5, 6] and skipped == [2]
    for net, per_mode in zip(nets, results):
        fields = evaluate.occlusion_fields(per_mode)
        for mode, drop in drops.items():
            hits = 0
            for row, v in enumerate(index.tolist()):
                probs = torch.zeros(classes)
                for c in range(2):
                    x, mask = drop(videos[v, c][None])
                    probs += net(x).softmax(dim=1)[0] / 2
                    if c == 0:
                        assert torch.equal(masks[mode][row], mask[0])  # the first clip's drops
                h = -sum(p * math.log(p) for p in probs.tolist())
                r = per_mode[mode]
                assert torch.allclose(r["probs"][row], probs, atol=1e-6)
                assert r["entropy"][row].item() == pytest.approx(h, abs=1e-5)
                assert bool(r["top1"][row]) == (probs.argmax().item() == labels[v].item())
                assert fields["per_video"][mode]["entropy"][row] == pytest.approx(h, abs=1e-5)
                assert fields["per_video"][mode]["pred"][row] == probs.argmax().item()
                hits += probs.argmax().item() == labels[v].item()
            assert fields[f"top1_{mode}"] == pytest.approx(hits / len(index))


def test_figures_take_the_next_video_that_decodes():
    # a test video that fails to decode comes back as zeros, valid False: never drawn
    items = [{"video": torch.full((1, 3, 2, 4, 4), float(i)), "valid": i not in (0, 3)}
             for i in range(6)]
    videos, clips = evaluate.first_clips([[item] for item in items], [0, 3, 5])
    assert videos == [1, 4, 5]
    assert [c[0, 0, 0, 0].item() for c in clips] == [1.0, 4.0, 5.0]
    videos, _ = evaluate.first_clips([[item] for item in items], [0, 1])
    assert videos == [1, 2]  # one video is never drawn twice


def test_both_figures_draw_one_selection_and_fig4_captions_follow_its_videos(monkeypatch):
    # video 0 does not decode: the selection takes video 1 instead, and Fig 4's title, strip,
    # drops and captions for that row are all video 1's (row 0 of the occlusion pass, which
    # skipped video 0 too)
    class Videos(list):
        samples = [(f"v{i}.avi", i % 2) for i in range(5)]

    items = Videos([{"video": torch.full((1, 3, 2, 4, 4), float(i)), "valid": i != 0}]
                   for i in range(5))
    selection = evaluate.figure_selection(items, 2)
    assert selection[0] == [1, 4]
    index = torch.tensor([1, 2, 3, 4])  # the videos the occlusion pass decoded
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.5, 0.5], [0.2, 0.8]])
    per_mode = {"none": dict(probs=probs, entropy=evaluate.entropy(probs),
                             top1=probs.argmax(dim=1) == torch.tensor([1, 0, 1, 1]))}
    masks = {"none": torch.tensor([[1.0, 0], [0, 0], [0, 0], [0, 1.0]])}
    drawn = {}
    monkeypatch.setattr(evaluate.visualize, "occlusion_figure",
                        lambda path, clips, titles, masks, captions: drawn.update(
                            clips=clips, titles=titles, masks=masks, captions=captions))
    one = types.SimpleNamespace(label="A")
    evaluate.draw_occlusion_figure("x.png", [one], [per_mode], masks, index, selection, items,
                                   ["even", "odd"])
    assert drawn["titles"] == ["v1.avi: odd", "v4.avi: even"]
    assert [c.flatten()[0].item() for c in drawn["clips"]] == pytest.approx(
        [data.denormalize(torch.full((3, 2, 4, 4), v)).flatten()[0].item() for v in (1.0, 4.0)])
    assert drawn["masks"]["none"].tolist() == [[1.0, 0], [0, 1.0]]
    assert drawn["captions"]["none"] == [[("A: even H=0.33", evaluate.visualize.RED)],
                                         [("A: odd H=0.50", evaluate.visualize.GREEN)]]
    drawn.clear()  # video 1 then failed in the occlusion pass: left out, video 4 drawn alone
    rows = {m: {k: v[1:] for k, v in r.items()} for m, r in per_mode.items()}
    left = evaluate.draw_occlusion_figure("x.png", [one], [rows], {"none": masks["none"][1:]},
                                          index[1:], selection, items, ["even", "odd"])
    assert left == ["v1.avi"] and drawn["titles"] == ["v4.avi: even"]
    assert drawn["captions"]["none"] == [[("A: odd H=0.50", evaluate.visualize.GREEN)]]
    assert drawn["masks"]["none"].tolist() == [[0, 1.0]]
    broken = Videos([{"video": torch.zeros(1, 3, 2, 4, 4), "valid": False}] for _ in range(5))
    with pytest.raises(SystemExit, match="no test video decodes"):
        evaluate.figure_selection(broken, 2)


def test_finetune_then_evaluate_end_to_end_json_keys(small_tree, tmp_path):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    pretrain.main(small_args(small_tree, pre, "--epochs", "1", "--adv-start", "0"))
    finetune.main(["--ckpt", str(pre / "ckpt.pt"), "--dataset", "folder", "--data-root", small_tree,
                   "--out", str(ft),
                   "--epochs", "1", "--batch-size", "4", "--workers", "0", "--print-freq", "1"])
    ckpt = torch.load(ft / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "finetune" and ckpt["arch"] == "tiny" and ckpt["classes"] == ["c0", "c1"]
    assert ckpt["data"]["frames"] == 4 and ckpt["generator"]["drop_frames"] == 1
    out = evaluate.main(["--ckpt", str(ft / "ckpt.pt"), "--clips", "3", "--workers", "0",
                         "--occlusion", "--json", str(tmp_path / "r.json")])
    for key in ("top1", "top5", "n_videos", "n_skipped", "entropy_none", "entropy_random",
                "entropy_adversarial",
                "top1_none", "top1_random", "top1_adversarial"):
        assert out[key] is not None, key
    assert out["n_videos"] == 8 and 0 <= out["top1"] <= 1
    assert json.load(open(tmp_path / "r.json")) == json.loads(json.dumps(out))
    knn = evaluate.main(["--ckpt", str(pre / "ckpt.pt"), "--clips", "2", "--workers", "0"])
    for key in ("R@1", "R@5", "R@10", "R@20", "knn_top1"):
        assert 0 <= knn[key] <= 1
    assert knn["R@20"] == 1.0  # the gallery holds both classes


def test_evaluate_rejects_corrupt_and_wrong_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    r = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--ckpt", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "not a readable checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    for content, message in ((b"", "not a readable checkpoint"),
                             (torch.zeros(2), "holds a Tensor, not a checkpoint dict")):
        path = tmp_path / "other.pt"
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        with pytest.raises(SystemExit, match=message):
            evaluate.main(["--ckpt", str(path)])
    odd = tmp_path / "odd.pt"
    torch.save({"kind": "something-else"}, odd)
    with pytest.raises(SystemExit, match="something-else checkpoint"):
        evaluate.main(["--ckpt", str(odd)])
    with pytest.raises(SystemExit, match="not found"):
        evaluate.main(["--ckpt", str(tmp_path / "missing.pt")])


# -----------------------------------------------------------------------------
# gpu_report.py: the GPU node's one command, dry-run on CPU


def test_gpu_report_dry_run_runs_every_part_and_writes_its_report(demo_root, tmp_path):
    # the same stage and bench commands as on a GPU node, at a tiny size on CPU: each stage ends
    # with finite losses and a checkpoint that loads with weights_only=True, bench's parts write
    # their measurements, and the report holds all five parts; what needs CUDA is one line each
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "gpu_report.py", "--dry-run", "--out", str(out),
                             "--data-root", demo_root], cwd=HERE, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] and report["device"] == "cpu"
    assert list(report["smoke"]) == ["pretrain", "pretrain-fp16-compile", "finetune", "evaluate",
                                     "moco", "cvrl", "vclr"]
    assert all(r["ok"] and r["rc"] == 0 for r in report["smoke"].values())
    skipped = {name: r["skipped"] for name, r in report["smoke"].items() if r["skipped"]}
    assert list(skipped) == ["pretrain-fp16-compile"] and "needs CUDA" in skipped[
        "pretrain-fp16-compile"]
    assert result.stdout.count("dry run:") == 2  # the fp16 + compile stage, bench's compile
    for name in ("pretrain", "moco", "cvrl", "vclr"):
        ckpt = torch.load(out / "runs" / name / "ckpt.pt", map_location="cpu", weights_only=True)
        assert ckpt["args"]["method"] == ("videomoco" if name == "pretrain" else name)
    phases = {r["phase"] for r in read_log(out / "runs" / "pretrain")}
    assert phases == {"moco", "adversarial"}  # 2 epochs, the second adversarial
    steps = report["step"]["data"]["steps"]
    assert {(r["variant"], r["phase"]) for r in steps} == {
        (v, p) for v in ("eager", "channels_last_3d") for p in ("moco", "adversarial")}
    assert all(r["clips_per_s"] > 0 and r["gflop_per_clip"] > 0 for r in steps)
    rows = report["profile"]["data"]["rows"]
    assert len(rows) == 10 and sum(r["share"] for r in rows) <= 1 + 1e-9
    loader = report["loader"]["data"]
    assert loader["cores"] == os.cpu_count() and set(loader["worker_s_per_sample"]) == {
        "workers", "device", "device, repeat 2"}
    # the cost, from the rates: 1 GPU at the largest batch, 8 at the smallest (one here: 2)
    assert [(r["gpus"], r["per_gpu_batch"]) for r in report["cost"]] == [(1, 2)] * 2 + [(8, 2)] * 2
    kinetics, ucf = report["cost"][:2]
    assert kinetics["hours"] / ucf["hours"] == pytest.approx(240_000 / 9_537)
    assert report["cost"][2]["hours"] == pytest.approx(kinetics["hours"] / 8)
    markdown = (out / "report.md").read_text()
    for heading in ("## 1. Every stage", "## 2. The step", "## 3. The ten costliest",
                    "## 4. The loader", "## 5. What a pretraining costs", "Dry run on CPU"):
        assert heading in markdown


def test_gpu_report_records_a_failing_command_and_a_bad_checkpoint(tmp_path):
    # a part that fails is recorded with the end of its output, and the report goes on; a run
    # whose checkpoint does not load with weights_only=True, or whose loss is not finite, fails
    import gpu_report
    result = gpu_report.run_command("boom", [sys.executable, "-c",
                                             "print('step 1'); raise SystemExit('error: boom')"],
                                    str(tmp_path), timeout=60)
    assert not result["ok"] and result["rc"] == 1 and "error: boom" in result["error"]
    assert "step 1" in (tmp_path / "logs" / "boom.log").read_text()
    late = gpu_report.run_command("late", [sys.executable, "-c", "pass"], str(tmp_path), 60,
                                  deadline=time.time() + 5)  # the budget (--minutes) is spent
    assert not late["ok"] and "time budget" in late["error"]
    assert not (tmp_path / "logs" / "late.log").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"loss_d": 1.5, "loss_g": null}\n{"loss": 1.2}\n')
    torch.save({"args": {}, "weights": torch.zeros(2)}, run / "ckpt.pt")
    assert gpu_report.check_run(str(run)) == ([], None)
    torch.save({"args": argparse.Namespace()}, run / "ckpt.pt")  # not weights_only-loadable
    problems, _ = gpu_report.check_run(str(run))
    assert len(problems) == 1 and "weights_only=True" in problems[0]
    (run / "log.jsonl").write_text('{"loss_d": NaN}\n')
    torch.save({"args": {}}, run / "ckpt.pt")
    assert gpu_report.check_run(str(run))[0] == ["a non-finite loss"]
