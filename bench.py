"""
Speed and memory targets, measured as ratios within one run (absolute times on shared machines are
noise; ratios taken back to back are not).

    python bench.py            # both of the below
    python bench.py --loader   # the data pipelines against the sequential-decode limit
    python bench.py --step     # the step: adversarial vs MoCo, FLOPs, MFU, memory format, compile

Targets: pipeline / limit >= 0.8, pipeline / naive >= 3, --repeat-sample 2 pipeline / limit >= 1.7,
worker time with the augmentation on the device <= 0.8 x in the workers, resident memory growth
over 2,000 iterations < 5 %; adversarial / MoCo step <= 1.75 (1.6 on a GPU); decayed / plain
InfoNCE <= 1.05. Every pipeline runs in warm DataLoader workers (steady_malloc). The step runs at
the paper's size on CUDA (MFU against the dense bf16 peak), at 16 x 64 x 64, batch 4, on CPU.
"""

import argparse
import ctypes
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
    root = os.path.join(os.path.expanduser("~"), ".cache", "videomoco", "bench-videos-v1")
    t0 = time.time()
    paths = make_bench_videos(root)
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
    two_views = {on_device: clips(on_device, views=2) for on_device in (False, True)}
    times = {False: [], True: []}
    for _ in range(3):
        for on_device in times:
            times[on_device].append(_worker_time(two_views[on_device]))
    work = min(times[False])
    dev = min(times[True])
    print(f"worker time per sample: {work * 1e3:.1f} ms augmenting in the worker, "
          f"{dev * 1e3:.1f} ms with the augmentation on the device")
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


# dense bf16 tensor-core peaks (vendor datasheets, SXM parts), for the MFU estimate
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def bench_step(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True  # as the stage scripts (utils.init_distributed)
    arch = args.arch or "r2plus1d_10"
    # per-GPU batches of 16, 32, 64 (8 GPUs at the paper's global 128), and 128 on one GPU
    batches = [args.batch] if args.batch else ([16, 32, 64, 128] if cuda else [4])
    frames, crop = (args.frames, args.crop) if cuda else (min(args.frames, 16), min(args.crop, 64))
    ctx, scaler = utils.autocast_context(None, device)
    step_args = argparse.Namespace(method="videomoco", background_erasing=0,
                                   drop_frames=max(1, frames // 4))
    no_guard = types.SimpleNamespace(agree=lambda finite: bool(finite))  # one process, no signals
    peak = next((v for k, v in PEAK_BF16_FLOPS.items()
                 if cuda and k in torch.cuda.get_device_name()), None)
    print(f"step: {arch} on {args.input} input, {frames} frames, crop {crop}, K {args.moco_k}, on "
          f"{device}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))

    def make(batch, memory_format=torch.contiguous_format, compiled=False):
        torch.manual_seed(0)
        video = torch.randn(batch, 2, 3, frames, crop, crop, device=device)  # x and x_key
        model = models.VideoMoCo(models.encoder_builder(arch, args.input), 128, args.moco_k,
                                 0.999, 0.07, 0.99999).to(device, memory_format=memory_format)
        generator = models.ConvLSTMGenerator().to(device)
        if compiled:  # in place: the state_dict keys stay as they are (pretrain.py --compile)
            model.encoder_q.compile()
            model.encoder_k.compile()
        opt_d = torch.optim.SGD(model.encoder_q.parameters(), 0.02, momentum=0.9)
        opt_g = torch.optim.SGD(generator.parameters(), 0.02, momentum=0.9)

        run = pretrain.Run(step_args, model, generator, opt_d, opt_g, ctx, scaler, no_guard)

        def step(phase="moco"):  # pretrain.py's step, in a world of one
            pretrain.train_step(run, video, [], phase, model.decay)
        return step

    for batch in batches:
        step = make(batch)
        times = {"moco": [], "adversarial": []}
        for _ in range(3):  # interleaved, best of three
            for phase in times:
                times[phase].append(_time(lambda: step(phase), args.repeats, device))
        best = {phase: min(t) for phase, t in times.items()}
        for phase, seconds in best.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with CountFlops() as counter:
                step(phase)
            rate = counter.total / seconds
            print(f"batch {batch:3d} {phase + ' step':17s} {seconds * 1e3:8.1f} ms "
                  f"{batch / seconds:7.1f} clips/s {counter.total / batch / 1e9:6.1f} GFLOP/clip "
                  f"{rate / 1e12:6.2f} TFLOP/s"
                  + (f"  MFU {100 * rate / peak:.1f} % of {peak / 1e12:.0f} bf16" if peak else "")
                  + (f"  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""))
        print(f"ratio adversarial / MoCo step = {best['adversarial'] / best['moco']:.2f}  "
              "(target <= 1.75; <= 1.6 on a GPU)")
        del step

    # the memory format and compilation, each against the same MoCo step in eager NCTHW
    step = make(batches[0])
    variants = {"channels_last_3d": make(batches[0], torch.channels_last_3d)}
    if args.compile:
        t0 = time.perf_counter()
        variants["torch.compile"] = make(batches[0], compiled=True)
        variants["torch.compile"]()  # compiles
        print(f"torch.compile of both encoders: {time.perf_counter() - t0:.0f} s")
    times = {name: [] for name in ["eager", *variants]}
    for _ in range(3):
        for name, fn in [("eager", step), *variants.items()]:
            times[name].append(_time(fn, args.repeats, device))
    for name in variants:
        print(f"ratio MoCo step {name} / eager = {min(times[name]) / min(times['eager']):.2f}  "
              "(on by default only where < 1)")

    # the loss alone at the paper's K: Eq 6 vs Eq 1, forward and backward
    n = 128
    k = 65536
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


def main():
    parser = argparse.ArgumentParser(description="VideoMoCo speed and memory ratios")
    parser.add_argument("--loader", action="store_true", help="benchmark the data pipeline")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count()))
    parser.add_argument("--frames", type=int, default=32, help="clip length T (paper: 32)")
    parser.add_argument("--crop", type=int, default=112, help="crop size (paper: 112)")
    parser.add_argument("--clips", type=int, default=240, help="clips per throughput measurement")
    parser.add_argument("--repeat", type=int, default=2, help="--repeat-sample N measured")
    parser.add_argument("--memory-iters", type=int, default=2000, help="for the RSS check")
    parser.add_argument("--step", action="store_true", help="benchmark the step and the loss")
    parser.add_argument("--arch", default=None, help="encoder for --step (default r2plus1d_10)")
    parser.add_argument("--batch", type=int, default=None,
                        help="per-step batch for --step (default 16, 32, 64, 128 on CUDA; 4)")
    parser.add_argument("--moco-k", type=int, default=65536, help="queue size for --step")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement")
    parser.add_argument("--input", default="rgb", choices=models.INPUTS)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="measure torch.compile in --step (about 2 minutes to compile on CPU)")
    args = parser.parse_args()
    run_all = not (args.loader or args.step)
    if args.loader or run_all:
        bench_loader(args)
    if args.step or run_all:
        bench_step(args)


if __name__ == "__main__":
    main()
