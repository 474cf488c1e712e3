"""
Video data for VideoMoCo: OpenCV clip reading, the official dataset layouts and temporally
consistent augmentation. The built-in demo sets and the data tools are in datatools.py:

    python data.py demo [DIR] [--name demo-motion]       # write a built-in demo set (UCF101 layout)
    python data.py check --dataset ucf101 --data-root R  # decode every listed video, list bad ones
    python data.py resize SRC DST --short-side 128       # re-encode a tree for faster loading

What a clip is: `VideoReader` (seek-aware decoding), `list_videos` (layouts), `TrainTransform` and
`augment` (in the loader workers, or batched on the training device from uint8 clips), `VideoClips`
(the Dataset). loading.py turns the flags into a dataset and the dataset into this rank's batches.
"""

import math
import os
import sys

# bad files are reported by us, once, in one line
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import methods  # noqa: E402  (CVRL's and VCLR's temporal sampling)

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v")
DATASETS = ("ucf101", "hmdb51", "kinetics", "folder", "demo", "demo-motion")
# Kinetics-400 statistics, the ones torchvision's video models are trained with.
MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)
# Reading forward costs one decode per frame (~0.2 ms at 320x240); a seek costs a re-open of the
# decoder at the previous keyframe plus the decodes from there (~3-5 ms measured on XVID 320x240,
# i.e. ~20 frames). Seek only when the gap is larger than this.
SEEK_AHEAD_FRAMES = 32
# --repeat-sample N: the N clips of a video are drawn inside one window of this many clip spans,
# decoded once
REPEAT_WINDOW = 1.25


class DataError(Exception):
    """A problem with the user's data or flags; stage scripts print it as one line and exit 1."""


class VideoError(Exception):
    """One video cannot give the requested clip (unreadable, empty, truncated...)."""


# -----------------------------------------------------------------------------
# clip reader

def open_capture(path):
    if not os.path.isfile(path):
        raise VideoError("file does not exist")
    if os.path.getsize(path) == 0:
        raise VideoError("empty file (0 bytes)")
    # one decoder thread: parallelism comes from DataLoader workers, not from ffmpeg inside each
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    if not cap.isOpened():
        cap.release()
        raise VideoError("OpenCV cannot open it (not a video, or a codec ffmpeg lacks)")
    return cap


class VideoReader:
    """
    Sequential, seek-aware frame access to one video file through cv2.VideoCapture.

    `claimed_frames` is what the container says; it can lie (truncated downloads claim hundreds of
    frames where a few dozen decode), so `real_frames` is only known once decoding hits the end, and
    every read is checked. Frames are returned as uint8 RGB (H, W, 3).
    """

    def __init__(self, path):
        self.path = path
        self.cap = open_capture(path)
        self.claimed_frames = max(int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        self.real_frames = None  # set when the decoder runs out
        self.pos = 0  # index of the frame the next grab() decodes
        self.seeked = False  # after a seek past the real end, pos says nothing about the length

    def close(self):
        self.cap.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _reopen(self):
        self.cap.release()
        self.cap = open_capture(self.path)
        self.pos, self.seeked = 0, False

    def _goto(self, index):
        if index < self.pos:
            if index > SEEK_AHEAD_FRAMES:
                return self._seek(index)
            self._reopen()  # a short rewind: decoding from the start is as cheap as a seek
        if index - self.pos > SEEK_AHEAD_FRAMES:
            return self._seek(index)
        while self.pos < index:
            if not self.cap.grab():
                self._hit_end()
                return
            self.pos += 1

    def _seek(self, index):
        self.cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        self.pos, self.seeked = index, True

    def _hit_end(self):
        if self.real_frames is None:
            # reading forward from frame 0, the end is where we are; after a seek (possibly past the
            # real end) we don't know, so count once
            self.real_frames = self.count_frames() if self.seeked else self.pos
        self.pos = math.inf

    def count_frames(self):
        """Decode-count the frames (grab only: no colour conversion). Leaves the reader at the
        end."""
        self._reopen()
        n = 0
        while self.cap.grab():
            n += 1
        self.pos = math.inf
        self.real_frames = n
        return n

    def frames(self, indices):
        """Decode the frames at sorted unique `indices`; returns {index: frame} for those that
        exist."""
        out = {}
        for index in indices:
            if self.real_frames is not None and index >= self.real_frames:
                break
            if index != self.pos:
                self._goto(index)
            if self.pos != index:
                break  # ran out while getting there
            ok, frame = self.cap.read()
            if not ok or frame is None:
                self._hit_end()
                break
            self.pos += 1
            out[index] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        return out

    def clips(self, starts, num_frames, stride=1, min_frames=1, rng=None):
        """
        Clips of `num_frames` frames taken every `stride` frames from each start, as uint8 RGB
        (len(starts), T, H, W, 3). Frames shared by overlapping clips are decoded once.

        A clip that runs past the real end of the video (the container claimed more frames than
        decode) is moved back to end at the last real frame, or, given `rng`, redrawn uniformly over
        the real length (so a truncated training video still yields varied clips). A video shorter
        than one clip's span is looped: frame i of the clip is frame (i * stride) mod real_length,
        unless it has fewer than `min_frames` frames, which is a VideoError (a 3-frame "video" is
        not a clip).
        """
        span = (num_frames - 1) * stride + 1
        wanted = [s + stride * np.arange(num_frames) for s in starts]
        got = self.frames(sorted(set(np.concatenate(wanted).tolist())))
        if all(i in got for w in wanted for i in w):
            return _stack(got, wanted)
        length = self.real_frames if self.real_frames is not None else self.count_frames()
        if length == 0:
            raise VideoError("no decodable frames")
        if length < min_frames:
            raise VideoError(f"too short: {length} frames decode, a clip needs at least "
                             f"{min_frames}")
        if length >= span:
            if rng is not None:
                last = length - span
                starts = [int(rng.integers(0, last + 1)) if s > last else s for s in starts]
            wanted = [min(s, length - span) + stride * np.arange(num_frames) for s in starts]
        else:
            wanted = [(stride * np.arange(num_frames)) % length for _ in starts]
        need = sorted(set(np.concatenate(wanted).tolist()) - set(got))
        if need:
            self._reopen()  # (rare path: a lying container or a very short video)
            got.update(self.frames(need))
        if not all(i in got for w in wanted for i in w):
            raise VideoError(f"decoding stopped early (only {len(got)} frames readable)")
        return _stack(got, wanted)


def _stack(frames, wanted):
    # (clips, T, H, W, 3) from {index: frame}: one copy of each frame (np.stack of np.stacks: two)
    first = frames[wanted[0][0]]
    out = np.empty((len(wanted), len(wanted[0]), *first.shape), first.dtype)
    for clip, indices in zip(out, wanted):
        for o, i in zip(clip, indices):
            o[...] = frames[i]
    return out


def min_clip_frames(frames):
    """A video with fewer decodable frames than this is bad; a longer one shorter than a clip
    loops."""
    return max(1, frames // 2)


def uniform_starts(num_frames_video, span, num_clips):
    """Start frames of `num_clips` clips of `span` frames spread uniformly over the video, first
    clip at frame 0, last one ending at the last frame (the paper's 10-clip test protocol)."""
    last = max(num_frames_video - span, 0)
    if num_clips == 1:
        return [last // 2]
    return [int(round(i * last / (num_clips - 1))) for i in range(num_clips)]


# -----------------------------------------------------------------------------
# dataset layouts, read as the official archives unpack

def _read_lines(path):
    with open(path, "r", encoding="utf-8", errors="replace", newline=None) as f:  # CRLF safe
        return [line.strip() for line in f if line.strip()]


def _is_video(name):
    return name.lower().endswith(VIDEO_EXTENSIONS)


def _class_folders(root):
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _videos_in(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if _is_video(f))


def _require(path, what):
    if not os.path.exists(path):
        raise DataError(f"{what} not found: {path}")
    return path


def list_ucf101(root, split, train):
    lists = _require(os.path.join(root, "ucfTrainTestlist"), "UCF101 split folder ucfTrainTestlist")
    videos = _require(os.path.join(root, "UCF-101"), "UCF101 video folder UCF-101")
    classes = []
    for line in _read_lines(_require(os.path.join(lists, "classInd.txt"), "UCF101 classInd.txt")):
        index, name = line.split(maxsplit=1)
        classes.append((int(index), name))
    classes = [name for _, name in sorted(classes)]  # labels are 1-based in the file
    to_label = {name: i for i, name in enumerate(classes)}
    split_file = os.path.join(lists, f"{'trainlist' if train else 'testlist'}0{split}.txt")
    samples = []
    for line in _read_lines(_require(split_file, "UCF101 split file")):
        rel = line.split()[0]  # testlist has no label column; the class is the folder
        class_name = rel.replace("\\", "/").split("/")[0]
        if class_name not in to_label:
            raise DataError(f"{split_file}: class {class_name!r} is not in classInd.txt")
        samples.append((os.path.join(videos, rel), to_label[class_name]))
    return samples, classes


def list_hmdb51(root, split, train):
    lists = _require(os.path.join(root, "testTrainMulti_7030_splits"),
                     "HMDB51 split folder testTrainMulti_7030_splits")
    videos = _require(os.path.join(root, "hmdb51_org"), "HMDB51 video folder hmdb51_org")
    suffix = f"_test_split{split}.txt"
    files = sorted(f for f in os.listdir(lists) if f.endswith(suffix))
    if not files:
        raise DataError(f"no *{suffix} files in {lists}")
    classes = [f[: -len(suffix)] for f in files]
    wanted = "1" if train else "2"  # 1 = train, 2 = test, 0 = unused
    samples = []
    for label, (class_name, f) in enumerate(zip(classes, files)):
        for line in _read_lines(os.path.join(lists, f)):
            name, _, tag = line.rpartition(" ")  # names contain spaces? no, but ( ) ! & # yes
            if tag.strip() == wanted:
                samples.append((os.path.join(videos, class_name, name.strip()), label))
    return samples, classes


def list_kinetics(root, split, train):
    train_dir = _require(os.path.join(root, "train"), "Kinetics train folder")
    classes = _class_folders(train_dir)
    folder = train_dir if train else _require(os.path.join(root, "val"), "Kinetics val folder")
    to_label = {name: i for i, name in enumerate(classes)}
    samples = []
    for class_name in _class_folders(folder):
        if class_name not in to_label:
            raise DataError(f"Kinetics val class {class_name!r} has no train folder")
        samples += [(p, to_label[class_name]) for p in _videos_in(os.path.join(folder, class_name))]
    return samples, classes


def list_folder(root, split, train):
    classes = _class_folders(root)
    samples = [(p, i) for i, c in enumerate(classes) for p in _videos_in(os.path.join(root, c))]
    return samples, classes


# the built-in sets (datatools.py): name -> version, in the cache name
DEMOS = {"demo": 2, "demo-motion": 1}


def demo_root(name="demo"):
    """Where the built-in demo set `name` is generated once and cached: ~/.cache/videomoco/NAME-vV
    ($VIDEOMOCO_CACHE replaces ~/.cache/videomoco)."""
    cache = os.environ.get("VIDEOMOCO_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "videomoco"))
    return os.path.join(cache, f"{name}-v{DEMOS[name]}")


def list_videos(dataset, root, split=1, train=True):
    """
    (samples, classes, missing): samples is a list of (path, label) with 0-based labels, classes the
    class names in label order, missing the listed paths that do not exist (skipped; they count as
    bad videos). Raises DataError, one clear line, for an unknown dataset, a missing root or split
    file, or a list that names no existing video.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if dataset in DEMOS:
        import datatools  # (a module that imports this one)
        root = datatools.ensure_demo(root or demo_root(dataset), dataset)
        dataset = "ucf101"
    if not root:
        raise DataError(f"--data-root is required for --dataset {dataset}")
    if not os.path.isdir(root):
        raise DataError(f"data root is not a folder: {root}")
    if dataset in ("ucf101", "hmdb51") and split not in (1, 2, 3):
        raise DataError(f"{dataset} has splits 1, 2 and 3, not {split}")
    lister = {"ucf101": list_ucf101, "hmdb51": list_hmdb51, "kinetics": list_kinetics,
              "folder": list_folder}[dataset]
    samples, classes = lister(root, split, train)
    present = [(p, y) for p, y in samples if os.path.isfile(p)]
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    if not present:
        what = f"split {split} {'train' if train else 'test'}" if dataset != "folder" else "tree"
        raise DataError(f"{dataset} {what} under {root} names no existing video "
                        f"({len(samples)} listed, e.g. {samples[0][0] if samples else 'none'})")
    return present, classes, missing


# -----------------------------------------------------------------------------
# temporally consistent augmentation: parameters drawn once per clip, applied to every frame
#
# Brightness, contrast, saturation, hue rotation and grayscale are all affine maps of a pixel's RGB
# value, so a clip's whole colour augmentation is composed into one 3x4 matrix and applied in a
# single cv2.transform pass over the uint8 frames, which also saturates to [0, 255]. torchvision
# clamps after every op; we clamp once at the end (identical unless an intermediate op leaves [0,
# 1]). One matrix for the whole clip makes the temporal consistency exact by construction.

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as torchvision's rgb_to_grayscale
_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_matrix(angle):
    # a hue shift is a rotation of the chroma plane in YIQ space
    c, s = math.cos(angle), math.sin(angle)
    return np.linalg.inv(_TO_YIQ) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ _TO_YIQ


def color_matrix(rng, mean_rgb, jitter_p=0.8, grayscale_p=0.2, brightness=0.4, contrast=0.4,
                 saturation=0.4, hue=0.1):
    """The 3x4 affine colour map of one clip (RGB in 0..255): colour jitter with probability
    `jitter_p` (its four ops in a random order, as torchvision's ColorJitter), then grayscale with
    probability `grayscale_p`. Brightness, contrast and saturation use torchvision's blend formulas;
    contrast blends towards the clip's mean grey level, computed from `mean_rgb` (the clip's mean
    colour) through the ops applied before it. Hue is a rotation of the YIQ chroma plane by
    2*pi*h (linear, unlike torchvision's HSV shift, which is not affine): the same range of hue
    changes, not the same per-pixel result."""
    m = np.concatenate([np.eye(3), np.zeros((3, 1))], 1)  # x -> m[:, :3] @ x + m[:, 3]

    def then(a, b=np.zeros(3)):
        return np.concatenate([a @ m[:, :3], (a @ m[:, 3] + b)[:, None]], 1)

    gray = np.tile(LUMA, (3, 1))  # each output channel = luma
    if rng.random() < jitter_p:
        for op in rng.permutation(4):
            if op == 0:
                m = then(np.eye(3) * rng.uniform(1 - brightness, 1 + brightness))
            elif op == 1:
                level = LUMA @ (m[:, :3] @ mean_rgb + m[:, 3])
                c = rng.uniform(1 - contrast, 1 + contrast)
                m = then(np.eye(3) * c, np.full(3, (1 - c) * level))
            elif op == 2:
                s = rng.uniform(1 - saturation, 1 + saturation)
                m = then(s * np.eye(3) + (1 - s) * gray)
            else:
                m = then(_hue_matrix(2 * math.pi * rng.uniform(-hue, hue)))
    if rng.random() < grayscale_p:
        m = then(gray)
    return m


def apply_color(frames, matrix):
    """Apply a 3x4 colour map to uint8 RGB frames (T, H, W, 3), saturating to 0..255."""
    t, h, w, _ = frames.shape
    out = cv2.transform(np.ascontiguousarray(frames).reshape(t * h, w, 3), matrix)
    return out.reshape(t, h, w, 3)


def random_resized_box(height, width, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """(y, x, h, w) of a random crop covering `scale` of the area with aspect ratio in `ratio`."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)  # fallback: central square
    return (height - side) // 2, (width - side) // 2, side, side


def _resize_frames(frames, size_hw, flip=False):
    h, w = size_hw
    if frames.shape[1:3] == (h, w) and not flip:
        return frames
    out = np.empty((len(frames), h, w, 3), np.uint8)
    for f, o in zip(frames, out):
        cv2.resize(f, (w, h), dst=o, interpolation=cv2.INTER_LINEAR)
        if flip:
            cv2.flip(o, 1, dst=o)  # per frame in place: a strided [:, :, ::-1] copy costs 5x more
    return out


def to_tensor(frames):
    """uint8 RGB (T, H, W, 3) -> normalised float (3, T, H, W): (x / 255 - MEAN) / STD."""
    # uint8 transpose first (1 byte a value), then one float pass: 4x faster than the other order
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).contiguous().float()
    scale, shift = _normalisation(x.device)
    return x.mul_(scale.view(3, 1, 1, 1)).add_(shift.view(3, 1, 1, 1))


def _normalisation(device):
    # (scale, shift) per RGB channel, uint8 values to (x / 255 - MEAN) / STD
    return (torch.tensor([1 / (255 * s) for s in STD], device=device),
            torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=device))


def denormalize(x):
    """Inverse of to_tensor's normalisation: float (3, ...) back to [0, 1]."""
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(3, *[1] * (x.dim() - 1))
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(3, *[1] * (x.dim() - 1))
    return x * std + mean


class TrainTransform:
    """Random resized crop, horizontal flip, colour jitter (p 0.8), grayscale (p 0.2), normalise.
    Every parameter is drawn once per clip from `rng` and applied to all frames (CVRL Sec 3.1).

    on_device=False: all of it here, in the loader worker -> float (3, T, crop, crop).
    on_device=True: only the crop and resize here -> (uint8 (T, crop, crop, 3), float (13,) the
    flip and the 3x4 colour map); `augment` applies them to a whole batch on the training device.
    Both draw the same parameters from the same `rng`, so they give the same distribution of
    clips, and for the same parameters the same clip to within one grey level (the worker path
    applies the colour map in cv2's 8-bit arithmetic, the device path in float)."""

    def __init__(self, crop=112, scale=(0.2, 1.0), flip=0.5, jitter=0.8, grayscale=0.2,
                 on_device=False):
        self.crop, self.scale, self.flip = crop, scale, flip
        self.jitter, self.grayscale, self.on_device = jitter, grayscale, on_device

    def __call__(self, frames, rng):  # uint8 (T, H, W, 3) -> float (3, T, crop, crop) or the above
        y, x, h, w = random_resized_box(frames.shape[1], frames.shape[2], rng, self.scale)
        flip = rng.random() < self.flip
        # the flip costs nothing inside the worker's resize; on the device it is one batched op
        frames = _resize_frames(frames[:, y:y + h, x:x + w], (self.crop, self.crop),
                                flip and not self.on_device)
        # the mean colour of every 4th pixel of the (flipped) clip: the same pixels on both paths
        grid = frames[:, ::4, ::-4] if flip and self.on_device else frames[:, ::4, ::4]
        mean_rgb = cv2.mean(grid.reshape(-1, grid.shape[2], 3))[:3]
        matrix = color_matrix(rng, np.array(mean_rgb), self.jitter, self.grayscale)
        if self.on_device:
            params = np.concatenate([[float(flip)], matrix.ravel()]).astype(np.float32)
            return torch.from_numpy(frames), torch.from_numpy(params)
        return to_tensor(apply_color(frames, matrix))


def augment(video, params):
    """The device half of TrainTransform(on_device=True), batched: uint8 clips (*P, *S, T, H, W, 3)
    and their parameters (*P, 13) -> normalised float (*P, *S, 3, T, H, W). The clips of the S
    dimensions share their parameters (VCLR's tuples: one augmentation for all the clips of a
    tuple)."""
    shape = (*params.shape[:-1], *[1] * (video.dim() - params.dim() - 3))  # (*P, *1s)
    flip = params[..., 0].view(*shape, 1, 1, 1, 1) > 0.5
    video = torch.where(flip, video.flip(-2), video)
    matrix = params[..., 1:].view(*shape, 1, 3, 4)  # shared by the T frames
    x = video.flatten(-3, -2).float()  # (..., T, H*W, 3)
    x = torch.matmul(x, matrix[..., :3].transpose(-1, -2)).add_(matrix[..., None, :, 3])
    scale, shift = _normalisation(x.device)
    x = x.clamp_(0, 255).mul_(scale).add_(shift)
    return x.view(video.shape).movedim(-1, -4).contiguous()


def to_device(batch, device):
    """A batch's clips on `device` as normalised float (N, ..., 3, T, H, W): uint8 clips are
    augmented there (TrainTransform(on_device=True)), float ones were augmented in the workers."""
    video = batch["video"].to(device, non_blocking=True)
    if "aug" in batch:
        video = augment(video, batch["aug"].to(device, non_blocking=True))
    return video


class EvalTransform:
    """Resize the short side to `resize`, then a centre crop (crops=1) or three crops along the long
    side (crops=3: start, centre, end). Returns (crops, 3, T, crop, crop)."""

    def __init__(self, crop=112, resize=None, crops=1):
        assert crops in (1, 3), "crops must be 1 or 3"
        self.crop, self.crops = crop, crops
        self.resize = resize or int(round(crop * 128 / 112))

    def __call__(self, frames, rng=None):
        height, width = frames.shape[1:3]
        s = self.resize / min(height, width)
        height, width = max(self.crop, round(height * s)), max(self.crop, round(width * s))
        frames = _resize_frames(frames, (height, width))
        cy, cx = (height - self.crop) // 2, (width - self.crop) // 2
        if self.crops == 1:
            boxes = [(cy, cx)]
        elif width >= height:
            boxes = [(cy, 0), (cy, cx), (cy, width - self.crop)]
        else:
            boxes = [(0, cx), (cy, cx), (height - self.crop, cx)]
        return torch.stack([to_tensor(frames[:, y:y + self.crop,
                                             x:x + self.crop]) for y, x in boxes])


# -----------------------------------------------------------------------------
# dataset

class VideoClips(torch.utils.data.Dataset):
    """
    Clips from a list of (path, label) videos.

    Videos shorter than a clip are looped if at least half the clip's frames decode, else bad.

    mode "train", temporal "same": one random clip per video, `views` independently augmented
        copies of it -> {"video": (views, 3, T, crop, crop), "label", "index", "bad"}
    mode "train", temporal "cvrl": two clips whose starts are d ~ methods.interval_probs(`interval`)
        apart, each with its own augmentation -> "video": (2, 3, T, crop, crop)
    mode "train", temporal "vclr": an anchor and a positive tuple of one clip per segment, each
        tuple with one augmentation for all its clips, each tuple's clips shuffled with probability
        0.5 -> "video": (2, segments, 3, T, crop, crop), "order": 0 both tuples in order, 1 the
        first shuffled, 2 the second, 3 both, "segments": (2, segments), each clip's segment
    mode "test": `clips` uniformly spaced clips, each with the eval transform's crops
        -> {"video": (clips * crops, 3, T, crop, crop), "label", "index", "bad", "valid"}

    A video that cannot give a clip is never a crash: in train mode it is replaced by another random
    video, in test mode the sample comes back with valid=False (evaluation must not silently swap a
    test video). `bad` lists the (index, reason) of the videos that failed while producing this
    sample; `loading.BadVideos` in the main process logs each once and enforces the bad fraction.
    """

    def __init__(self, samples, frames=32, stride=1, transform=None, mode="train", views=1,
                 clips=10, temporal="same", interval="linear", segments=3, repeat=1):
        assert mode in ("train", "test") and temporal in ("same", "cvrl", "vclr")
        assert repeat == 1 or (mode, temporal) == ("train", "same"), "repeat: train, same only"
        self.samples, self.frames, self.stride = samples, frames, stride
        self.transform, self.mode, self.views, self.clips = transform, mode, views, clips
        self.temporal, self.interval, self.segments = temporal, interval, segments
        self.repeat = repeat
        self.min_frames = min_clip_frames(frames)
        self.known_bad = set()  # per process: don't retry a video this worker already saw fail
        self.warned_coincide = False

    def __len__(self):
        return len(self.samples)

    @staticmethod
    def _rng(seed):
        # loading.EpochSampler hands every sample its own seed, from (run seed, epoch, index): the
        # clip position, crop and colours then depend neither on which worker loads it nor on how
        # many workers there are, and a run resumed mid-epoch draws exactly what it would have.
        # Indexed directly (an int, no seed), a sample draws its seed from torch's RNG.
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return np.random.default_rng(seed)

    def _augment(self, clips, rng):
        """Each uint8 clip through the transform, stacked: float (n, 3, T, ...) in the workers, or
        uint8 (n, T, ..., 3) with its parameters (n, 13) for the device."""
        out = [self.transform(c, rng) for c in clips]
        if isinstance(out[0], tuple):
            return torch.stack([o[0] for o in out]), {"aug": torch.stack([o[1] for o in out])}
        return torch.stack(out), {}

    def _load(self, index, rng):
        path, label = self.samples[index]
        span = (self.frames - 1) * self.stride + 1
        with VideoReader(path) as reader:
            n = reader.claimed_frames
            if self.mode == "test":
                starts = uniform_starts(n, span, self.clips)
            elif self.temporal == "cvrl":
                starts = methods.cvrl_starts(rng, n, span, self.interval)
            elif self.temporal == "vclr":
                anchor, positive, distinct = methods.tuple_starts(rng, n, span, self.segments)
                if not distinct and not self.warned_coincide:
                    self.warned_coincide = True  # once per loader process
                    print(f"warning: {path} ({n} frames) has a segment too short for two clip "
                          "positions: its VCLR anchor and positive clips coincide there",
                          file=sys.stderr, flush=True)
                starts = anchor + positive
            elif self.repeat == 1:
                starts = [int(rng.integers(0, max(n - span, 0) + 1))]
            else:  # `repeat` clips in one window of REPEAT_WINDOW x span, decoded once
                window = min(span + int((REPEAT_WINDOW - 1) * span), n)
                first = int(rng.integers(0, max(n - window, 0) + 1))
                starts = [first + int(rng.integers(0, max(window - span, 0) + 1))
                          for _ in range(self.repeat)]
            move_rng = rng if self.mode == "train" and self.temporal == "same" else None
            clips = reader.clips(starts, self.frames, self.stride, min_frames=self.min_frames,
                                 rng=move_rng)
        if self.mode == "test":  # float (clips * crops, 3, T, crop, crop)
            return [(torch.cat([self.transform(c, rng) for c in clips]), label, {})]
        if self.temporal == "cvrl":
            video, extra = self._augment(clips, rng)
            return [(video, label, extra)]
        if self.temporal == "same":
            return [(video, label, extra) for video, extra in
                    (self._augment([c] * self.views, rng) for c in clips)]
        tuples, params, shuffled, segments = [], [], [], []
        for clips_of_tuple in (clips[:self.segments], clips[self.segments:]):
            # one augmentation for the whole tuple: its clips side by side in time
            t, extra = self._augment([np.concatenate(clips_of_tuple)], rng)
            if extra:  # uint8 (1, S*T, crop, crop, 3) -> (S, T, crop, crop, 3)
                t = t.view(self.segments, self.frames, *t.shape[2:])
                params.append(extra["aug"][0])
            else:  # float (1, 3, S*T, crop, crop) -> (S, 3, T, crop, crop)
                t = t.view(3, self.segments, self.frames, *t.shape[3:]).transpose(0, 1)
            perm, was_shuffled = methods.order_shuffle(rng, self.segments)
            tuples.append(t[perm])
            shuffled.append(was_shuffled)
            segments.append(perm)  # position j of the tuple holds the clip of segment perm[j]
        extra = {"aug": torch.stack(params)} if params else {}
        extra["order"] = int(shuffled[0]) + 2 * int(shuffled[1])
        extra["segments"] = torch.tensor(segments)  # (2, S)
        return [(torch.stack(tuples), label, extra)]  # (2, S, 3, T, crop, crop) or uint8

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        rng = self._rng(seed)
        bad = []
        for _ in range(100):
            if index not in self.known_bad:
                try:
                    out = [{"video": video, "label": label, "index": index, "bad": [],
                            "valid": True, **extra}
                           for video, label, extra in self._load(index, rng)]
                    out[0]["bad"] = bad
                    return out[0] if len(out) == 1 else out  # a list: --repeat-sample
                except (VideoError, cv2.error) as e:
                    self.known_bad.add(index)
                    bad.append((index, str(e).strip().splitlines()[-1]))
            if self.mode == "test":
                shape = (self.clips * getattr(self.transform, "crops", 1), 3, self.frames,
                         self.transform.crop, self.transform.crop)
                return {"video": torch.zeros(shape), "label": self.samples[index][1],
                        "index": index,
                        "bad": bad, "valid": False}
            index = int(rng.integers(0, len(self.samples)))
        raise DataError("100 videos in a row failed to decode; is the data readable at all?")


if __name__ == "__main__":
    import datatools  # the demo sets and the check / resize tools live there
    datatools.main()
