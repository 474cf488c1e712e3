"""
Speed and memory targets, measured as ratios within one run (absolute times on shared machines are
noise; ratios taken back to back are not).

    python bench.py            # both of the below
    python bench.py --loader   # the data pipelines against the sequential-decode limit
    python bench.py --step     # the step: adversarial vs MoCo, FLOPs, MFU, memory format, compile
    python bench.py --profile  # the ten costliest kernels of one adversarial step
    (--json PATH also writes the measurements; gpu_report.py runs all three on a GPU node)

Targets: pipeline / limit >= 0.8, pipeline / naive >= 3, --repeat-sample 2 pipeline / limit >= 1.7,
worker time with the augmentation on the device <= 0.8 x in the workers, resident memory growth
over 2,000 iterations < 5 %; adversarial / MoCo step <= 1.75 (1.6 on a GPU); decayed / plain
InfoNCE <= 1.05. Every pipeline runs in warm DataLoader workers (steady_malloc). The step runs at
the paper's size on CUDA (MFU against the dense bf16 peak), at 16 x 64 x 64, batch 4, on CPU.
"""

import argparse
import ctypes
import json
import os
import time
import types

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import data  # before cv2: where OpenCV cannot load (no libGL), data.py stops with one line
import cv2
import models
import pretrain
import utils


# -----------------------------------------------------------------------------
# loader

def make_bench_videos(root, n=30, seconds=10, fps=25, size=(320, 240)):
    """UCF101-like files: 320x240 XVID, 10 s, textured background with moving shapes and noise."""
    marker = os.path.join(root, "done")
    if os.path.exists(marker):
        return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".avi"))
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    paths = []
    for i in range(n):
        noise = rng.random((6, 8, 3)).astype(np.float32)
        background = cv2.resize(noise, (w * 2, h), interpolation=cv2.INTER_CUBIC) * 200
        path = os.path.join(root, f"v{i:02d}.avi")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"XVID"), fps, (w, h))
        for t in range(seconds * fps):
            pan = int(t * 2) % w  # a slow camera pan, so every frame differs
            frame = background[:, pan:pan + w].copy()
            for k in range(3):
                x = int((37 * k + 3 * t * (k + 1)) % w)
                cv2.circle(frame, (x, h // 2 + 30 * (k - 1)), 18, (255 - 80 * k, 60 * k, 120), -1)
            frame += rng.normal(0, 4, frame.shape).astype(np.float32)
            writer.write(frame.clip(0, 255).astype(np.uint8))
        writer.release()
        paths.append(path)
    open(marker, "w").close()
    return paths


def _jobs(paths, count, frames, seed=0):
    rng = np.random.default_rng(seed)
    jobs = []
    for _ in range(count):
        path = paths[int(rng.integers(len(paths)))]
        jobs.append((path, float(rng.random()), frames))
    return jobs


class DecodeOnly(torch.utils.data.Dataset):
    """Decoding alone, through the same DataLoader as the pipelines, nothing of it returned: the
    limit (open, seek, decode exactly the clip's frames) or, whole=True, the naive way (decode the
    whole video, then slice the clip out)."""

    def __init__(self, jobs, whole=False):
        self.jobs = jobs
        self.whole = whole

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, i):
        path, u, frames = self.jobs[i]
        if self.whole:  # every frame decoded and converted, as a naive loader does
            cap = cv2.VideoCapture(path)
            video = []
            while (frame := cap.read()[1]) is not None:
                video.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            cap.release()
            np.stack(video[int(u * (len(video) - frames + 1)):][:frames])
        else:
            with data.VideoReader(path) as reader:
                reader.clips([int(u * (reader.claimed_frames - frames + 1))], frames)
        return [{"video": torch.zeros(1, dtype=torch.uint8), "bad": []}]  # as VideoClips: a list


def steady_malloc():
    """Fixed glibc malloc thresholds for a decoding process. By default glibc hands freed frame
    buffers (230 KB at 320x240, above its 128 KB mmap threshold) back to the OS and page-faults
    them in again for the next clip, until its dynamic thresholds adapt: the first ~100 clips of a
    fresh process decode 1.7x slower (measured: 13.1 against 7.5 ms a clip). A training loader's
    persistent workers pass that phase once; the bench's short measurements would read it, so its
    processes (and only they) set the thresholds where glibc's adaptation ends. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: buffers below 32 MB come from the heap
    libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: keep up to 64 MB of freed heap


def bench_worker_init(worker_id=0):
    data.worker_init(worker_id)
    steady_malloc()


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pipeline_rate(dataset, count, workers, batch=8, repeat=1):
    # samples/s through a DataLoader: decode, augment (in the workers or not), collate
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch // repeat, shuffle=True, num_workers=workers,
        collate_fn=data.collate, worker_init_fn=bench_worker_init, persistent_workers=True,
        prefetch_factor=4)
    n = 0
    it = iter(loader)
    next(it)  # workers up and warm
    t0 = time.perf_counter()
    while n < count:
        n += len(next(it)["video"])
    return n / (time.perf_counter() - t0)


def _worker_time(dataset, n=40):
    # seconds per sample in one process, one thread: what a loader worker spends on it
    dataset[(0, 0)]
    t0 = time.perf_counter()
    for i in range(n):
        dataset[(i % len(dataset), i)]
    return (time.perf_counter() - t0) / n


def bench_loader(args):
    root = os.path.join(args.video_cache, "bench-videos-v1" + (
        f"-{args.videos}" if args.videos != 30 else ""))
    t0 = time.time()
    paths = make_bench_videos(root, n=args.videos)
    print(f"{len(paths)} videos, 320x240 XVID, 10 s each, in {root} "
          f"({time.time() - t0:.1f} s to prepare)")
    frames = args.frames
    workers = args.workers
    count = args.clips
    jobs = _jobs(paths, count, frames)
    samples = [(p, 0) for p in paths] * 50  # long epochs: no restart stalls inside a measurement

    def clips(on_device, views=1, repeat=1):
        return data.VideoClips(samples, frames, 1, data.TrainTransform(args.crop,
                               on_device=on_device), data.SameClip(views, repeat))

    # one view per sample, as the decode limit; interleaved twice, each one's best kept, so that a
    # noisy neighbour slows all of them rather than one
    pipelines = {"workers": clips(False), "device": clips(True),
                 f"device, repeat {args.repeat}": clips(True, repeat=args.repeat)}
    rates = {name: [] for name in [*pipelines, "limit", "naive"]}
    for _ in range(2):
        for name, dataset in pipelines.items():
            rates[name].append(_pipeline_rate(dataset, count, workers, repeat=dataset.pair.repeat))
        rates["limit"].append(_pipeline_rate(DecodeOnly(jobs * 4), count, workers))
        rates["naive"].append(_pipeline_rate(DecodeOnly(jobs, whole=True), count // 3, workers))
    best = {k: max(v) for k, v in rates.items()}
    print(f"clip: {frames} frames, crop {args.crop}; {workers} workers / processes each; "
          "samples/s of one view")
    print(f"limit (decode exactly the clip's frames): {best['limit']:8.1f} clips/s")
    print(f"naive (decode whole video, slice):        {best['naive']:8.1f} clips/s")
    for name in pipelines:
        print(f"pipeline, augmentation on {name + ':':20s} {best[name]:8.1f} samples/s, "
              f"{best[name] / best['limit']:.2f} x limit")
    print(f"ratio pipeline / limit = {best['workers'] / best['limit']:.2f}  (target >= 0.8)")
    print(f"ratio pipeline / naive = {best['workers'] / best['naive']:.2f}  (target >= 3)")
    repeated = best[f"device, repeat {args.repeat}"]
    print(f"ratio pipeline with --repeat-sample {args.repeat} / limit = "
          f"{repeated / best['limit']:.2f}  (target >= 1.7); / the same pipeline without it = "
          f"{repeated / best['device']:.2f}")

    # a pretraining sample (two views of one clip), in this process: worker time
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    two_views = {"workers": clips(False, views=2), "device": clips(True, views=2),
                 f"device, repeat {args.repeat}": clips(True, views=2, repeat=args.repeat)}
    times = {name: [] for name in two_views}
    for _ in range(3):
        for name, dataset in two_views.items():
            # an item is `repeat` samples of one decoded clip
            times[name].append(_worker_time(dataset) / dataset.pair.repeat)
    worker_s = {name: min(t) for name, t in times.items()}
    work = worker_s["workers"]
    dev = worker_s["device"]
    print(f"worker time per sample: {work * 1e3:.1f} ms augmenting in the worker, "
          f"{dev * 1e3:.1f} ms with the augmentation on the device, "
          f"{worker_s[f'device, repeat {args.repeat}'] * 1e3:.1f} ms with it and "
          f"--repeat-sample {args.repeat}")
    print(f"ratio worker time device / workers = {dev / work:.2f}  (target <= 0.8)")

    # memory: the dataset in this process, so every allocation it makes is counted
    dataset = pipelines["workers"]
    for i in range(100):
        dataset[i % len(dataset)]
    rss0 = _rss_mb()
    for i in range(args.memory_iters):
        dataset[i % len(dataset)]
    rss1 = _rss_mb()
    print(f"resident memory over {args.memory_iters} iterations: {rss0:.0f} MB -> {rss1:.0f} MB "
          f"({100 * (rss1 - rss0) / rss0:+.1f} %, target < 5 %)")
    return {"cores": os.cpu_count(), "workers": workers, "frames": frames, "crop": args.crop,
            "repeat": args.repeat, "samples_per_s": best, "worker_s_per_sample": worker_s,
            "rss_growth": (rss1 - rss0) / rss0}


# -----------------------------------------------------------------------------
# training step

def _time(fn, repeats, device):
    fn()  # warm-up: allocator, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


class CountFlops(TorchDispatchMode):
    """FLOPs of every op torch.utils.flop_counter has a formula for (its FlopCounterMode's module
    hooks break the autograd.grad of G's straight-through path)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


# the step's variants: (memory format, torch.compile of both encoders)
VARIANTS = {"eager": (torch.contiguous_format, False),
            "channels_last_3d": (torch.channels_last_3d, False),
            "compile": (torch.contiguous_format, True)}

# dense bf16 tensor-core peaks (vendor datasheets, SXM parts), for the MFU estimate
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def step_setup(args):
    """What every measured step shares: the device, the encoder, the clip size, autocast. The
    paper's size on CUDA; at most 16 x 64 x 64, batch 4, on CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True  # as the stage scripts (utils.init_distributed)
    ctx, scaler = utils.autocast_context(None, device)
    frames = args.frames if cuda else min(args.frames, 16)
    return types.SimpleNamespace(
        device=device, cuda=cuda, arch=args.arch or "r2plus1d_10", input=args.input,
        moco_k=args.moco_k, frames=frames, crop=args.crop if cuda else min(args.crop, 64),
        ctx=ctx, scaler=scaler,
        step_args=argparse.Namespace(method="videomoco", background_erasing=0,
                                     drop_frames=max(1, frames // 4)),
        guard=types.SimpleNamespace(agree=lambda finite: bool(finite)))  # one process, no signals


def make_step(setup, batch, variant="eager"):
    """pretrain.py's step on a fixed random batch, in a world of one: step(phase)."""
    memory_format, compiled = VARIANTS[variant]
    torch.manual_seed(0)
    video = torch.randn(batch, 2, 3, setup.frames, setup.crop, setup.crop,
                        device=setup.device)  # x and x_key
    model = models.VideoMoCo(models.encoder_builder(setup.arch, setup.input), 128, setup.moco_k,
                             0.999, 0.07, 0.99999).to(setup.device, memory_format=memory_format)
    generator = models.ConvLSTMGenerator().to(setup.device)
    if compiled:  # in place: the state_dict keys stay as they are (pretrain.py --compile)
        model.encoder_q.compile()
        model.encoder_k.compile()
    opt_d = torch.optim.SGD(model.encoder_q.parameters(), 0.02, momentum=0.9)
    opt_g = torch.optim.SGD(generator.parameters(), 0.02, momentum=0.9)
    run = pretrain.Run(setup.step_args, model, generator, opt_d, opt_g, setup.ctx, setup.scaler,
                       setup.guard)

    def step(phase="moco"):
        pretrain.train_step(run, video, [], phase, model.decay)
    return step


def bench_step(args):
    setup = step_setup(args)
    device = setup.device
    cuda = setup.cuda
    arch = setup.arch
    frames = setup.frames
    crop = setup.crop
    # per-GPU batches of 16, 32, 64 (8 GPUs at the paper's global 128), and 128 on one GPU
    batches = [args.batch] if args.batch else ([16, 32, 64, 128] if cuda else [4])
    peak = next((v for k, v in PEAK_BF16_FLOPS.items()
                 if cuda and k in torch.cuda.get_device_name()), None)
    print(f"step: {arch} on {args.input} input, {frames} frames, crop {crop}, K {args.moco_k}, on "
          f"{device}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))

    records = []
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "arch": arch,
              "frames": frames, "crop": crop, "moco_k": args.moco_k, "steps": records}
    for batch in batches:
        best = {}
        for variant in args.variants:
            if variant == "compile":
                t0 = time.perf_counter()
            step = make_step(setup, batch, variant)
            if variant == "compile":
                step()  # compiles
                print(f"torch.compile of both encoders at batch {batch}: "
                      f"{time.perf_counter() - t0:.0f} s")
            times = {"moco": [], "adversarial": []}
            for _ in range(3):  # interleaved, best of three
                for phase in times:
                    times[phase].append(_time(lambda: step(phase), args.repeats, device))
            for phase, seconds in ((phase, min(t)) for phase, t in times.items()):
                best[variant, phase] = seconds
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                with CountFlops() as counter:
                    step(phase)
                rate = counter.total / seconds
                record = {"batch": batch, "variant": variant, "phase": phase,
                          "ms": seconds * 1e3, "clips_per_s": batch / seconds,
                          "gflop_per_clip": counter.total / batch / 1e9,
                          "tflop_per_s": rate / 1e12,
                          "mfu": rate / peak if peak else None,
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
                records.append(record)
                print(f"batch {batch:3d} {variant:16s} {phase + ' step':17s} "
                      f"{seconds * 1e3:8.1f} ms {batch / seconds:7.1f} clips/s "
                      f"{record['gflop_per_clip']:6.1f} GFLOP/clip {rate / 1e12:6.2f} TFLOP/s"
                      + (f"  MFU {100 * record['mfu']:.1f} % of {peak / 1e12:.0f} bf16"
                         if peak else "")
                      + (f"  peak {record['peak_gib']:.1f} GiB" if cuda else ""))
            del step
            print(f"ratio adversarial / MoCo step ({variant}) = "
                  f"{best[variant, 'adversarial'] / best[variant, 'moco']:.2f}  "
                  "(target <= 1.75; <= 1.6 on a GPU)")
        if args.json:  # what is measured so far, should a later batch fail or run out of time
            with open(args.json, "w") as f:
                json.dump({"step": result}, f, indent=1)
        for variant in args.variants[1:]:  # the memory format and compilation against eager
            print(f"ratio MoCo step {variant} / {args.variants[0]} = "
                  f"{best[variant, 'moco'] / best[args.variants[0], 'moco']:.2f}  "
                  "(on by default only where < 1)")

    # the loss alone at --moco-k (the paper's K by default): Eq 6 vs Eq 1, forward and backward
    n = 128
    k = args.moco_k
    q = torch.nn.functional.normalize(torch.randn(n, 128, device=device), dim=1).requires_grad_()
    key = torch.nn.functional.normalize(torch.randn(n, 128, device=device), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(128, k, device=device), dim=0)
    age = torch.arange(1, k + 1, device=device)
    times = {1.0: [], 0.99999: []}
    for _ in range(5):
        for decay in times:
            times[decay].append(_time(lambda: models.decayed_infonce(
                q, key, queue, age, 0.07, decay).backward(), args.repeats * 4, device))
    plain = min(times[1.0])
    decayed = min(times[0.99999])
    print(f"InfoNCE (Eq 1) {plain * 1e3:.2f} ms, decayed InfoNCE (Eq 6) {decayed * 1e3:.2f} ms "
          f"at N {n}, K {k}")
    print(f"ratio decayed / plain InfoNCE = {decayed / plain:.3f}  (target <= 1.05)")
    result.update(infonce_ms=plain * 1e3, decayed_infonce_ms=decayed * 1e3)
    return result


def profile_step(args):
    """The ten costliest kernels (CUDA; on CPU, operators) of one adversarial step, by self time,
    after two warm-up steps. Returns the rows; prints them as a Markdown table."""
    setup = step_setup(args)
    batch = args.batch or (32 if setup.cuda else 4)
    step = make_step(setup, batch)
    for _ in range(2):
        step("adversarial")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if setup.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        step("adversarial")
        if setup.cuda:
            torch.cuda.synchronize()
    kind = "device" if setup.cuda else "cpu"

    def self_time(e):  # microseconds on the device (CUDA) or the CPU
        return getattr(e, f"self_{kind}_time_total")

    events = [e for e in prof.key_averages() if self_time(e) > 0]
    events.sort(key=self_time, reverse=True)
    total = sum(self_time(e) for e in events)
    rows = [{"name": e.key, "calls": e.count, "self_ms": self_time(e) / 1e3,
             "share": self_time(e) / total} for e in events[:10]]
    print(f"one adversarial step, batch {batch}, {setup.frames} x {setup.crop}, on "
          f"{setup.device}: the ten costliest {'kernels' if setup.cuda else 'operators'}")
    print("| kernel | calls | self ms | share |\n| --- | --- | --- | --- |")
    for r in rows:
        share = 100 * r["share"]
        print(f"| {r['name'][:80]} | {r['calls']} | {r['self_ms']:.2f} | {share:.1f} % |")
    return {"device": str(setup.device), "batch": batch, "kind": kind, "rows": rows}


def main():
    parser = argparse.ArgumentParser(description="VideoMoCo speed and memory ratios")
    parser.add_argument("--loader", action="store_true", help="benchmark the data pipeline")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count()))
    parser.add_argument("--frames", type=int, default=32, help="clip length T (paper: 32)")
    parser.add_argument("--crop", type=int, default=112, help="crop size (paper: 112)")
    parser.add_argument("--clips", type=int, default=240, help="clips per throughput measurement")
    parser.add_argument("--repeat", type=int, default=2, help="--repeat-sample N measured")
    parser.add_argument("--memory-iters", type=int, default=2000, help="for the RSS check")
    parser.add_argument("--videos", type=int, default=30, help="UCF101-like videos for --loader")
    parser.add_argument("--video-cache", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                              "videomoco"),
                        help="where --loader writes its videos once")
    parser.add_argument("--step", action="store_true", help="benchmark the step and the loss")
    parser.add_argument("--arch", default=None, help="encoder for --step (default r2plus1d_10)")
    parser.add_argument("--batch", type=int, default=None,
                        help="per-step batch for --step (default 16, 32, 64, 128 on CUDA; 4)")
    parser.add_argument("--moco-k", type=int, default=65536, help="queue size for --step")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement")
    parser.add_argument("--input", default="rgb", choices=models.INPUTS)
    parser.add_argument("--variants", default="eager,channels_last_3d,compile",
                        help=f"--step's variants, the first the reference: {', '.join(VARIANTS)} "
                             "(compile: about 2 minutes on CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="the ten costliest kernels of one adversarial step, as a table")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(VARIANTS)}")
    run_all = not (args.loader or args.step or args.profile)
    results = {}
    if args.loader or run_all:
        results["loader"] = bench_loader(args)
    if args.step or run_all:
        results["step"] = bench_step(args)
    if args.profile:
        results["profile"] = profile_step(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
