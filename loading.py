"""
From a dataset to this rank's batches, shared by the stage scripts: the data flags
(`add_data_args`), the dataset they ask for (`build_dataset`), the DataLoader with one seed per
sample (`EpochSampler`, `build_loader`), its workers (`worker_init`, `steady_malloc`), the collate
and the main-process record of skipped videos (`BadVideos`). What a clip is (reading, layouts,
augmentation, VideoClips) is in data.py.
"""

import ctypes
import random
import sys

import cv2
import numpy as np
import torch

from data import (DATASETS, DataError, EvalTransform, TrainTransform, VideoClips,
                  list_videos)


def collate(batch):
    """default_collate, except `bad` lists are concatenated rather than stacked, and the samples of
    one video (a list, --repeat-sample) are samples of the batch."""
    batch = [s for item in batch for s in (item if isinstance(item, list) else [item])]
    bad = [b for sample in batch for b in sample["bad"]]
    out = torch.utils.data.default_collate([{k: v for k, v in s.items() if k != "bad"}
                                            for s in batch])
    out["bad"] = bad
    return out


class BadVideos:
    """Main-process record of skipped videos: logs each once (path and reason), counts them, and
    stops the run (DataError) when more than `max_fraction` of the dataset is bad instead of
    training on garbage. Listed-but-missing files count from the start.

    Under torch.distributed each rank meets the bad videos of its own shard: `update` only collects
    them, and `flush` (a collective: every rank calls it at the same step) merges all ranks'
    reports, so the count, the log and the decision to stop are global and the same on every
    rank."""

    def __init__(self, samples, missing=(), max_fraction=0.1, log=True):
        self.samples, self.max_fraction, self.log = samples, max_fraction, log
        self.total = len(samples) + len(missing)
        self.paths, self.pending = {}, []
        for path in missing:
            self._add(path, "listed in the split file but does not exist")
        self.check()

    def _add(self, path, reason):
        if path not in self.paths:
            self.paths[path] = reason
            if self.log:
                print(f"skipping bad video {path}: {reason}", file=sys.stderr, flush=True)

    def update(self, bad):
        self.pending += bad
        if _rank_world()[1] == 1:
            self.flush()

    def flush(self):
        reports = [self.pending]
        if _rank_world()[1] > 1:
            reports = [None] * _rank_world()[1]
            torch.distributed.all_gather_object(reports, self.pending)
        self.pending = []
        for index, reason in (b for report in reports for b in report):
            self._add(self.samples[index][0], reason)
        self.check()

    def __len__(self):
        return len(self.paths)

    def check(self):
        if len(self.paths) > self.max_fraction * self.total:
            raise DataError(f"{len(self.paths)} of {self.total} videos are unreadable or missing "
                            f"(more than {self.max_fraction:.0%}); fix the data "
                            "(python data.py check) or raise --max-bad-fraction")

    def write(self, path):
        with open(path, "w") as f:
            f.writelines(f"{p}\t{r}\n" for p, r in sorted(self.paths.items()))


def steady_malloc():
    """Fixed glibc malloc thresholds for a decoding process. By default glibc hands freed frame
    buffers (230 KB at 320x240, above its 128 KB mmap threshold) back to the OS and page-faults
    them in again for the next clip, until its dynamic thresholds adapt: the first ~100 clips of a
    fresh worker decode 1.7x slower (measured: 13.1 against 7.5 ms a clip). No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    # where glibc's own adaptation ends on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX, twice that to trim)
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: buffers below 32 MB come from the heap
    libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: keep up to 64 MB of freed heap


def worker_init(worker_id):
    cv2.setNumThreads(0)  # OpenCV's own thread pool would oversubscribe the cores the workers share
    torch.set_num_threads(1)
    steady_malloc()
    seed = torch.initial_seed() % 2**32  # base_seed + worker_id, see EpochSampler.set_epoch
    np.random.seed(seed)  # for third-party code in the workers; our own draws use per-sample seeds
    random.seed(seed)


def _rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochSampler(torch.utils.data.Sampler):
    """
    This rank's indices for one epoch. Training: one permutation per (seed, epoch), shared by all
    ranks, split into equal shards (the tail that does not divide is dropped, as DistributedSampler
    with drop_last). Test: every index exactly once, rank r taking r, r + world, ...

    Each index comes with its own seed from (seed, epoch, index), so every random choice made for a
    sample is fixed by the run's seed, whatever the number of workers; set_epoch(epoch, skip) also
    reseeds the loader's generator (the workers' base seed). `skip` drops the first samples of this
    rank's shard: a run resumed mid-epoch continues exactly, without re-decoding what was done.
    """

    def __init__(self, size, train, seed=0):  # yields (index, per-sample seed)
        self.size, self.train, self.seed = size, train, seed
        self.rank, self.world = _rank_world()
        self.epoch, self.skip, self.generator = 0, 0, None

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip
        if self.generator is not None:
            seed = np.random.SeedSequence([self.seed, self.rank, epoch]).generate_state(1)[0]
            self.generator.manual_seed(int(seed))

    def _indices(self):
        if not self.train:
            return list(range(self.rank, self.size, self.world))
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        per_rank = self.size // self.world
        return order[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()

    def __iter__(self):
        for index in self._indices()[self.skip:]:
            seed = np.random.SeedSequence([self.seed,
                                           self.epoch, index]).generate_state(2, np.uint64)[0]
            yield index, int(seed)

    def __len__(self):
        return len(self._indices()) - self.skip


def build_loader(dataset, batch_size, workers, train, seed=0):
    """DataLoader over this rank's EpochSampler shard, with per-worker RNG streams and the collate
    that keeps the bad-video lists; `batch_size` samples per batch, from batch_size / repeat videos
    (--repeat-sample). Call loader.sampler.set_epoch(epoch) before each epoch."""
    repeat = getattr(dataset, "repeat", 1)
    if batch_size % repeat:
        raise DataError(f"--repeat-sample {repeat} does not divide the batch of {batch_size} per "
                        "process")
    batch_size //= repeat
    sampler = EpochSampler(len(dataset), train, seed)
    sampler.generator = torch.Generator()
    sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
        worker_init_fn=worker_init, generator=sampler.generator, drop_last=train,
        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers > 0 else None)
    if train and len(loader) == 0:
        raise DataError(f"{len(dataset)} videos give no full batch of {batch_size * repeat} per "
                        "process")
    return loader


def add_data_args(p):
    """The data flags every training script shares (paper defaults: 32 consecutive frames, crop
    112)."""
    p.add_argument("--dataset", default="demo", choices=DATASETS,
                   help="dataset layout (demo: the built-in set)")
    p.add_argument("--data-root", default=None,
                   help="dataset root as the official archives unpack; none = demo preset")
    p.add_argument("--split", type=int, default=1,
                   help="official split for ucf101/hmdb51, 1-3 (paper: 1)")
    p.add_argument("--frames", type=int, default=32, help="frames per clip T (paper: 32)")
    p.add_argument("--stride", type=int, default=1,
                   help="temporal stride between clip frames (paper: 1, consecutive)")
    p.add_argument("--crop", type=int, default=112, help="crop size in pixels (paper: 112)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per process")
    p.add_argument("--augment-on", default=None, choices=("workers", "device"),
                   help="where flip, colour and normalisation run (default: device on CUDA, "
                   "workers on CPU); the device path ships uint8 clips")
    p.add_argument("--repeat-sample", type=int, default=1,
                   help="training samples per decoded video (MAE-ST's repeated sampling)")
    p.add_argument("--max-bad-fraction", type=float, default=0.1,
                   help="stop if more than this fraction of videos is unreadable")


def build_dataset(args, train, mode=None, views=1, transform=None, temporal="same", clips=None):
    """The dataset a stage script asks for with the shared flags (--dataset --data-root --split
    --frames --stride --crop, --jitter --grayscale for pretraining, --clips --crops for testing);
    returns (dataset, classes, BadVideos). `train` picks the split; `mode` how clips are drawn
    (default: "train" for the train split); `clips` overrides --clips."""
    samples, classes, missing = list_videos(args.dataset, args.data_root, args.split, train)
    mode = mode or ("train" if train else "test")
    repeat = getattr(args, "repeat_sample", 1) if mode == "train" else 1
    if repeat < 1 or (repeat > 1 and temporal != "same"):
        raise DataError(f"--repeat-sample {repeat}: it must be at least 1, and above 1 only where "
                        "a sample is one clip (not --method cvrl or vclr)")
    if transform is None and mode == "train":
        transform = TrainTransform(args.crop, jitter=getattr(args, "jitter", 0.8),
                                   grayscale=getattr(args, "grayscale", 0.2),
                                   on_device=getattr(args, "augment_on", None) == "device")
    elif transform is None:
        transform = EvalTransform(args.crop, crops=getattr(args, "crops", 1))
    dataset = VideoClips(samples, args.frames, args.stride, transform, mode, views=views,
                         clips=clips or getattr(args, "clips", 1), temporal=temporal,
                         interval=getattr(args, "cvrl_interval", "linear"),
                         segments=getattr(args, "segments", 3),
                         repeat=repeat)
    bad = BadVideos(samples, missing, getattr(args, "max_bad_fraction", 0.1),
                    log=_rank_world()[0] == 0)
    return dataset, classes, bad
