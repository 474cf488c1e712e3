"""
Video data as a training step reads it, standalone (it imports nothing of the project): OpenCV clip
reading, the official dataset layouts, temporally consistent augmentation, the Dataset (what a
training sample is comes from a `PairMaker`: SameClip here, CVRL's and VCLR's in methods.py) and
its DataLoader. The demo sets and the check / resize commands are demo_data.py's.
"""

import importlib.metadata
import math
import os
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist


class OpenCVUnavailable(ImportError):
    """cv2 is installed but cannot load a system library it links: libGL.so.1 and glib, which slim
    containers and many GPU nodes lack. An ImportError, so code that copies data.py can catch it;
    a script that lets it through prints its one line, not a traceback."""


def _opencv_fix(error):
    """One line: what the loader could not find, and the two fixes."""
    installed = "opencv-python"
    version = ""
    for name in ("opencv-python", "opencv-contrib-python"):
        try:
            version = "==" + importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        installed = name
        break
    headless = installed.replace("-python", "-python-headless") + version
    return (f"OpenCV cannot load: {error}. Install the system libraries it links (Debian/Ubuntu: "
            "apt-get install libgl1 libglib2.0-0), or the same OpenCV without GUI, which needs "
            f"neither: pip uninstall -y {installed} && pip install {headless} (and {headless} in "
            f"place of {installed} in requirements.txt)")


def _one_line_for_opencv(previous_hook):
    def excepthook(kind, value, traceback):
        if issubclass(kind, OpenCVUnavailable):
            print(f"error: {value}", file=sys.stderr)  # and the interpreter exits with 1
        else:
            previous_hook(kind, value, traceback)
    return excepthook


try:
    import cv2
except ImportError as e:
    if "shared object file" not in str(e):  # the loader's message; any other error is not ours
        raise
    sys.excepthook = _one_line_for_opencv(sys.excepthook)  # set on this path only
    raise OpenCVUnavailable(_opencv_fix(e)) from None


VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v")
DATASETS = ("ucf101", "hmdb51", "kinetics", "folder", "demo", "demo-motion")
# Kinetics-400 statistics, the ones torchvision's video models are trained with.
MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)
# Reading forward costs ~0.2 ms a frame at 320x240, a seek ~3-5 ms (XVID, measured): seek only
# over gaps larger than this
SEEK_AHEAD_FRAMES = 32
REPEAT_WINDOW = 1.25  # repeated sampling: a video's clips lie in one window of this many spans
MAX_BAD_FRACTION = 0.1  # more unreadable or missing videos than this stop a run


class DataError(Exception):
    """A problem with the user's data or flags; stage scripts print it as one line and exit 1."""


class VideoError(Exception):
    """One video cannot give the requested clip (unreadable, empty, truncated...)."""


def quiet_opencv():
    """Bad files are reported by us, once, in one line: OpenCV's own warnings off in this process
    (the loader workers and the scripts call it)."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


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
    """Sequential, seek-aware access to a video's frames (uint8 RGB) through cv2.VideoCapture.
    `claimed_frames` is the container's count, which can lie (truncated downloads), so
    `real_frames` is known only once decoding hits the end, and every read is checked."""

    def __init__(self, path):
        self.path = path
        self.cap = open_capture(path)
        self.claimed_frames = max(int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        self.real_frames = None  # set when the decoder runs out
        self.pos = 0  # index of the frame the next grab() decodes
        self.seeked = False  # after a seek past the real end, pos says nothing about the length

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cap.release()

    def _reopen(self):
        self.cap.release()
        self.cap = open_capture(self.path)
        self.pos = 0
        self.seeked = False

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
        self.pos = index
        self.seeked = True

    def _hit_end(self):
        if self.real_frames is None:
            # reading forward from frame 0, the end is where we are; after a seek (possibly past the
            # real end) we don't know, so count once
            self.real_frames = self.count_frames() if self.seeked else self.pos
        self.pos = math.inf

    def count_frames(self):
        """Decode-count the frames (grab only); leaves the reader at the end."""
        self._reopen()
        n = 0
        while self.cap.grab():
            n += 1
        self.pos = math.inf
        self.real_frames = n
        return n

    def frames(self, indices):
        """{index: frame} for those of the sorted unique `indices` that exist."""
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
        """Clips of `num_frames` frames every `stride` frames from each start, uint8 RGB
        (len(starts), T, H, W, 3); frames shared by clips are decoded once. A clip past the real end
        (a lying container) is moved back to end at the last frame, or, given `rng`, redrawn over
        the real length. A video shorter than a clip loops (frame i is (i * stride) mod length),
        unless under `min_frames` frames decode: a VideoError."""
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
    """Fewer decodable frames than this make a bad video; more, but fewer than a clip, loop."""
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


def _class_folders(root):
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _videos_in(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(VIDEO_EXTENSIONS))


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


# the built-in sets (see below): name -> version, in the cache name
DEMOS = {"demo": 2, "demo-motion": 1}
DATA_KEYS = ("dataset", "data_root", "split", "frames", "stride", "crop")  # a run's data


def demo_root(name="demo"):
    """Where demo set `name` is cached: ~/.cache/videomoco/NAME-vV (or $VIDEOMOCO_CACHE/NAME-vV)."""
    cache = os.environ.get("VIDEOMOCO_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "videomoco"))
    return os.path.join(cache, f"{name}-v{DEMOS[name]}")


def list_videos(dataset, root, split=1, train=True):
    """(samples [(path, 0-based label)], class names, listed paths that do not exist: bad
    videos). DataError, one line, for an unknown dataset, a missing root or split file, or a list
    that names no existing video."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if dataset in DEMOS:  # written by demo_data.ensure, which the stage scripts call first
        root = root or demo_root(dataset)
        if not os.path.isfile(os.path.join(root, "ucfTrainTestlist", "classInd.txt")):
            raise DataError(f"the {dataset} set is not at {root}: python demo_data.py demo "
                            f"{root} --name {dataset} writes it")
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
    c = math.cos(angle)
    s = math.sin(angle)
    return np.linalg.inv(_TO_YIQ) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ _TO_YIQ


def color_matrix(rng, mean_rgb, jitter_p=0.8, grayscale_p=0.2, brightness=0.4, contrast=0.4,
                 saturation=0.4, hue=0.1):
    """The 3x4 affine colour map of one clip (RGB 0..255): colour jitter with probability
    `jitter_p` (four ops in random order, torchvision's blend formulas; contrast towards the mean
    grey of `mean_rgb` as transformed so far; hue a YIQ chroma rotation by 2 pi h, which is affine
    where torchvision's HSV shift is not), then grayscale with probability `grayscale_p`."""
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
    """Random resized crop, flip, colour jitter (p 0.8), grayscale (p 0.2), normalisation, each
    drawn once per clip from `rng` and applied to all its frames (CVRL Sec 3.1). on_device=False:
    all here -> float (3, T, crop, crop); on_device=True: crop and resize here -> (uint8 (T, crop,
    crop, 3), (13,) flip and 3x4 colour map), the rest by `augment` on the training device. Same
    draws, same clip to within one grey level (cv2's 8-bit arithmetic here)."""

    def __init__(self, crop=112, scale=(0.2, 1.0), flip=0.5, jitter=0.8, grayscale=0.2,
                 on_device=False):
        self.crop = crop
        self.scale = scale
        self.flip = flip
        self.jitter = jitter
        self.grayscale = grayscale
        self.on_device = on_device

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
    """TrainTransform(on_device=True)'s second half, batched: uint8 clips (*P, *S, T, H, W, 3) and
    parameters (*P, 13) -> float (*P, *S, 3, T, H, W); the S clips (a VCLR tuple) share them."""
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
    """A batch's clips on `device`, normalised float (N, ..., 3, T, H, W); uint8 ones augmented."""
    video = batch["video"].to(device, non_blocking=True)
    if "aug" in batch:
        video = augment(video, batch["aug"].to(device, non_blocking=True))
    return video


class EvalTransform:
    """Resize the short side to `resize`, then a centre crop (crops=1) or three crops along the long
    side (crops=3: start, centre, end). Returns (crops, 3, T, crop, crop)."""

    def __init__(self, crop=112, resize=None, crops=1):
        assert crops in (1, 3), "crops must be 1 or 3"
        self.crop = crop
        self.crops = crops
        self.resize = resize or int(round(crop * 128 / 112))

    def __call__(self, frames, rng=None):
        height, width = frames.shape[1:3]
        s = self.resize / min(height, width)
        height, width = max(self.crop, round(height * s)), max(self.crop, round(width * s))
        frames = _resize_frames(frames, (height, width))
        cy = (height - self.crop) // 2
        cx = (width - self.crop) // 2
        if self.crops == 1:
            boxes = [(cy, cx)]
        elif width >= height:
            boxes = [(cy, 0), (cy, cx), (cy, width - self.crop)]
        else:
            boxes = [(0, cx), (cy, cx), (height - self.crop, cx)]
        return torch.stack([to_tensor(frames[:, y:y + self.crop,
                                             x:x + self.crop]) for y, x in boxes])


# -----------------------------------------------------------------------------
# the dataset

class PairMaker:
    """What a training sample is, for VideoClips: where its clips start in a video, and how the
    decoded clips become samples. SameClip below (VideoMoCo, MoCo); methods.CVRLPair and
    methods.VCLRTuples.
      redraw  a clip that runs past a lying container's end is redrawn (True) or moved back
      repeat  samples per decoded video (repeated sampling); 1 for a pair of one sample"""
    redraw = False
    repeat = 1

    def starts(self, rng, num_frames, span):
        """The first frames of the clips to decode, a list of ints, from a video that claims
        `num_frames` frames; a clip covers `span` frames (T with its stride)."""
        raise NotImplementedError

    def samples(self, clips, rng, augment):
        """[(video, extra)], one per sample, from the decoded uint8 clips (len(starts), T, H, W, 3)
        in the order of `starts`. augment(list of clips, rng) gives (the clips augmented and
        stacked, extra: {"aug": parameters} where the augmentation runs on the device, else {});
        extra may add the pair's own fields (VCLR's "order", "segments")."""
        raise NotImplementedError


class SameClip(PairMaker):
    """VideoMoCo's positive pair: `views` augmentations of one random clip. With repeat N (repeated
    sampling, Feichtenhofer et al. 2022) one decode gives N samples, their clips in one window of
    REPEAT_WINDOW spans."""
    redraw = True

    def __init__(self, views=2, repeat=1):
        self.views = views
        self.repeat = repeat

    def starts(self, rng, num_frames, span):
        if self.repeat == 1:
            return [int(rng.integers(0, max(num_frames - span, 0) + 1))]
        window = min(span + int((REPEAT_WINDOW - 1) * span), num_frames)
        first = int(rng.integers(0, max(num_frames - window, 0) + 1))
        return [first + int(rng.integers(0, max(window - span, 0) + 1))
                for _ in range(self.repeat)]

    def samples(self, clips, rng, augment):  # one sample per clip: its `views` augmentations
        return [augment([clip] * self.views, rng) for clip in clips]


class VideoClips(torch.utils.data.Dataset):
    """Clips of (path, label) videos. An item is a list of sample dicts, {"video", "label",
    "index", "bad", "valid", ...the pair's extra}: mode "train", one per sample of `pair` (a
    PairMaker; its repeat, 1 but for repeated sampling), "video" (views, 3, T, crop, crop) for
    SameClip; mode "test", one, "video" the `clips` uniformly spaced clips x the eval crops.
    Items are (index, seed) from EpochSampler: every random choice comes from the seed, whatever
    worker loads it. A bad video is never a crash: replaced by a random one in training, valid=False
    in testing; `bad` lists (index, reason) for BadVideos to log once in the main process."""

    def __init__(self, samples, frames=32, stride=1, transform=None, pair=None, mode="train",
                 clips=10):
        assert mode in ("train", "test")
        self.samples = samples
        self.frames = frames
        self.stride = stride
        self.transform = transform
        self.mode = mode
        self.clips = clips
        self.pair = pair or SameClip()
        self.min_frames = min_clip_frames(frames)
        self.known_bad = set()  # per process: don't retry a video this worker already saw fail

    def __len__(self):
        return len(self.samples)

    def _augment(self, clips, rng):
        """Each uint8 clip through the transform, stacked: float (n, 3, T, ...) in the workers, or
        uint8 (n, T, ..., 3) with its parameters {"aug": (n, 13)} for the device."""
        out = [self.transform(c, rng) for c in clips]
        if isinstance(out[0], tuple):
            return torch.stack([o[0] for o in out]), {"aug": torch.stack([o[1] for o in out])}
        return torch.stack(out), {}

    def _load(self, index, rng):
        path, label = self.samples[index]
        span = (self.frames - 1) * self.stride + 1
        test = self.mode == "test"
        with VideoReader(path) as reader:
            n = reader.claimed_frames
            starts = uniform_starts(n, span, self.clips) if test else self.pair.starts(rng, n, span)
            clips = reader.clips(starts, self.frames, self.stride, min_frames=self.min_frames,
                                 rng=rng if not test and self.pair.redraw else None)
        if test:  # float (clips * crops, 3, T, crop, crop)
            return [(torch.cat([self.transform(c, rng) for c in clips]), label, {})]
        return [(video, label, extra) for video, extra in self.pair.samples(clips, rng,
                                                                            self._augment)]

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is None:  # a bare index: a test clip needs no randomness (torch's RNG left alone)
            seed = 0 if self.mode == "test" else int(torch.randint(0, 2**62, (1,)).item())
        bad = []
        for attempt in range(100):
            # each attempt draws from its own stream, so that a replacement depends neither on
            # what a failed attempt consumed nor on whether this worker already knew it was bad
            rng = np.random.default_rng(seed if attempt == 0 else [seed, attempt])
            if attempt:
                if self.mode == "test":
                    shape = (self.clips * getattr(self.transform, "crops", 1), 3, self.frames,
                             self.transform.crop, self.transform.crop)
                    return [{"video": torch.zeros(shape), "label": self.samples[index][1],
                             "index": index, "bad": bad, "valid": False}]
                index = int(rng.integers(0, len(self.samples)))
            if index in self.known_bad:
                continue
            try:
                out = [{"video": video, "label": label, "index": index, "bad": [], "valid": True,
                        **extra} for video, label, extra in self._load(index, rng)]
                out[0]["bad"] = bad
                return out
            except (VideoError, cv2.error) as e:
                self.known_bad.add(index)
                bad.append((index, str(e).strip().splitlines()[-1]))
        raise DataError("100 videos in a row failed to decode; is the data readable at all?")


# -----------------------------------------------------------------------------
# loading: this rank's batches

def collate(batch):
    """default_collate of the items' samples (VideoClips: a list per item), except that `bad`
    lists are concatenated rather than stacked."""
    batch = [s for item in batch for s in item]
    bad = [b for sample in batch for b in sample["bad"]]
    out = torch.utils.data.default_collate([{k: v for k, v in s.items() if k != "bad"}
                                            for s in batch])
    out["bad"] = bad
    return out


class BadVideos:
    """Main-process record of skipped videos: logs each once, counts them (missing files from the
    start), and stops the run (DataError) above `max_fraction`. Under torch.distributed `update`
    collects and `flush` (a collective, at the same step on every rank) merges all ranks'
    reports, so the count and the decision to stop are the same everywhere."""

    def __init__(self, samples, missing=(), max_fraction=MAX_BAD_FRACTION, log=True):
        self.samples = samples
        self.max_fraction = max_fraction
        self.log = log
        self.total = len(samples) + len(missing)
        self.paths = {}
        self.pending = []
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
            dist.all_gather_object(reports, self.pending)
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
                            "(python demo_data.py check)")

    def write(self, path):
        with open(path, "w") as f:
            f.writelines(f"{p}\t{r}\n" for p, r in sorted(self.paths.items()))


def worker_init(worker_id):
    # A scheduler's SIGTERM (SLURM's pre-emption) reaches the whole process group, and torchrun's
    # agent forwards it to its workers' groups: a loader worker that died of it would crash the
    # main process ("DataLoader worker ... is killed by signal") before that can save. The main
    # process handles the signal (pretrain.py saves and stops) and ends its workers itself.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    cv2.setNumThreads(0)  # OpenCV's own thread pool would oversubscribe the cores the workers share
    torch.set_num_threads(1)
    quiet_opencv()
    seed = torch.initial_seed() % 2**32  # base_seed + worker_id, see EpochSampler.set_epoch
    np.random.seed(seed)  # for third-party code in the workers; our own draws use per-sample seeds


def _rank_world():
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


class EpochSampler(torch.utils.data.Sampler):
    """This rank's (index, seed) items for an epoch. Training: a permutation per (seed, epoch), in
    equal shards (the tail dropped); test: rank r takes r, r + world, ... The seed comes from (seed,
    epoch, index), so every choice for a sample is fixed whatever the workers; set_epoch(epoch,
    skip) also reseeds the workers' base seed and skips what a resumed run already did."""

    def __init__(self, size, train, seed=0):  # yields (index, per-sample seed)
        self.size = size
        self.train = train
        self.seed = seed
        self.rank, self.world = _rank_world()
        self.epoch = 0
        self.skip = 0
        self.generator = None

    def set_epoch(self, epoch, skip=0):
        self.epoch = epoch
        self.skip = skip
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
            yield index, int(np.random.SeedSequence([self.seed, self.epoch, index])
                             .generate_state(2, np.uint64)[0])

    def __len__(self):
        return len(self._indices()) - self.skip


def build_loader(dataset, batch_size, workers, train, seed=0):
    """DataLoader over this rank's EpochSampler shard, `batch_size` samples from batch_size / repeat
    videos; training loaders keep their workers across epochs (no restart, no drained prefetch)."""
    repeat = dataset.pair.repeat if train else 1
    if batch_size % repeat:
        raise DataError(f"--repeat-sample {repeat} does not divide the batch of {batch_size} per "
                        "process")
    sampler = EpochSampler(len(dataset), train, seed)
    sampler.generator = torch.Generator()
    sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size // repeat, sampler=sampler, num_workers=workers,
        collate_fn=collate, worker_init_fn=worker_init, generator=sampler.generator,
        drop_last=train, pin_memory=torch.cuda.is_available(),
        persistent_workers=train and workers > 0, prefetch_factor=4 if workers > 0 else None)
    if train and len(loader) == 0:
        raise DataError(f"{len(dataset)} videos give no full batch of {batch_size} per process")
    return loader


def test_loader(samples, args, batch_size, workers, clips=1, crops=1):
    """This rank's share of `samples` in order, `clips` uniformly spaced clips of each (x `crops`),
    for a frozen or finetuned model; args gives --frames --stride --crop."""
    dataset = VideoClips(samples, args.frames, args.stride, EvalTransform(args.crop, crops=crops),
                         mode="test", clips=clips)
    return build_loader(dataset, batch_size, workers, train=False)


BN_CLIPS = 1024
BN_BATCH = 32


def bn_loader(samples, args, workers):
    """The clips BN statistics are estimated on before a frozen evaluation: the centre clip of up to
    BN_CLIPS training videos, a fixed random subset (split files go by class), not sharded. (Its
    own generator: torch's global RNG is left alone.)"""
    keep = np.random.default_rng(0).permutation(len(samples))[:BN_CLIPS]
    dataset = VideoClips([samples[i] for i in sorted(keep)], args.frames, args.stride,
                         EvalTransform(args.crop), mode="test", clips=1)
    return torch.utils.data.DataLoader(dataset, batch_size=BN_BATCH, num_workers=workers,
                                       collate_fn=collate, worker_init_fn=worker_init,
                                       generator=torch.Generator())


def add_data_args(p):
    """The data flags of pretrain.py and finetune.py (paper defaults: 32 consecutive frames, crop
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
    p.add_argument("--augment-on", default="device" if torch.cuda.is_available() else "workers",
                   choices=("workers", "device"), help="where flip, colour and normalisation run "
                   "(device on CUDA, workers on CPU); the device path ships uint8 clips")
    p.add_argument("--repeat-sample", type=int, default=1,
                   help="training samples per decoded video (repeated sampling)")


def is_demo(args):  # a built-in set, no --data-root: the stage scripts' demo presets apply
    return args.dataset in DEMOS and args.data_root is None
