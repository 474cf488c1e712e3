"""
The data that no training step reads: the built-in demo sets, which the stage scripts write on first
use (`ensure`), and the commands that check and shrink a dataset before a run. It imports data.py.

    python demo_data.py demo [DIR] [--name demo-motion]  # write a built-in demo set (UCF101 layout)
    python demo_data.py check --dataset ucf101 --data-root R  # decode every video, list bad ones
    python demo_data.py resize SRC DST --short-side 128  # re-encode a tree for faster loading
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import data  # before cv2: where a library cv2 links is missing, data.py says so in one line
import cv2  # noqa: E402 (after data, on purpose)

# -----------------------------------------------------------------------------
# the built-in demo sets
#
# Both in the UCF101 layout (CRLF split files, 3 splits holding out the same groups, the first
# groups as test split), 6 classes, 128x96 XVID clips of 32-48 frames. "demo": a group is one scene
# of one class, its clips consecutive pieces of one take; a class is a scene type (the background's
# texture: vertical stripes, checkerboard, horizontal stripes, with colours, period, phase and tilt
# of its own) and one of two actions that differ only in motion, so appearance alone reaches at
# most 1/2. "demo-motion": six motions on backgrounds and palettes shared by all classes, positions
# on a torus, so a frame says nothing of the class. Every motion is symmetric under a flip.

DEMO_SCENE_CLASSES = (("Rise", "vertical"), ("Fall", "vertical"), ("Grow", "checker"),
                      ("Shrink", "checker"), ("SwingHorizontal", "horizontal"),
                      ("SwingVertical", "horizontal"))
DEMO_MOTION_CLASSES = ("MoveUp", "MoveDown", "Grow", "Shrink", "SwingHorizontal", "SwingVertical")
# (groups per class, test groups, clips per group), UCF101 holds out 7 of 25 groups of 4-7 clips
DEMO_GROUPS = {"demo": (16, 6, 3), "demo-motion": (10, 3, 4)}
DEMO_SIZE = (128, 96)
DEMO_FPS = 25


def _smooth_noise(rng, h, w, cells):
    noise = rng.random((cells, cells * w // h + 1, 3)).astype(np.float32)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)


def _scene_background(rng, texture):
    """A scene's background (H, W, 3) float: a smoothed square-wave grating of the scene type's
    orientation (tilted by up to 20 degrees), or the product of two (a checkerboard), in two colours
    of its own, one dark and one light."""
    w, h = DEMO_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(6, 14)
    tilt = rng.uniform(-0.35, 0.35)

    def grating(angle):  # stripes perpendicular to the direction `angle`
        phase = rng.uniform(0, 2 * math.pi)
        return np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period + phase)

    if texture == "vertical":
        a = grating(tilt)
    elif texture == "horizontal":
        a = grating(math.pi / 2 + tilt)
    else:
        a = grating(tilt) * grating(math.pi / 2 + tilt)
    a = (np.tanh(2 * a) / 2 + 0.5)[..., None]  # (H, W, 1) in [0, 1]
    dark = rng.uniform(0, 110, 3)
    light = rng.uniform(140, 255, 3)
    return (dark * (1 - a) + light * a).astype(np.float32)


def _demo_objects(rng, colors):
    return [dict(x=rng.uniform(0, DEMO_SIZE[0]), y=rng.uniform(0, DEMO_SIZE[1]),
                 phase=rng.uniform(0, 1), size=rng.uniform(8, 20), speed=rng.uniform(2.0, 3.5),
                 shape=int(rng.integers(0, 3)),
                 color=colors[int(rng.integers(0, len(colors)))] + rng.normal(0, 20, 3))
            for _ in range(int(rng.integers(2, 4)))]


def _render(rng, motion, background, objects, frames, t0=0):
    """Frames t0 .. t0 + frames - 1 of `objects` moving by `motion` over `background`, uint8 RGB."""
    w, h = DEMO_SIZE
    out = []
    for t in range(t0, t0 + frames):
        frame = background.copy()
        for o in objects:
            x = o["x"]
            y = o["y"]
            size = o["size"]
            swing = 2 * abs(((o["phase"] + t * o["speed"] / 40) % 1) - 0.5) - 0.5  # triangle wave
            cycle = (o["phase"] + t * o["speed"] / 60) % 1  # sawtooth for the size classes
            if motion in ("MoveUp", "Rise"):
                y -= o["speed"] * t
            elif motion in ("MoveDown", "Fall"):
                y += o["speed"] * t
            elif motion == "SwingHorizontal":
                x += 40 * swing
            elif motion == "SwingVertical":
                y += 40 * swing
            elif motion == "Grow":
                size = 8 + 12 * cycle
            elif motion == "Shrink":
                size = 20 - 12 * cycle
            x, y = x % w, y % h
            for dx in (-w, 0, w):  # draw the wrapped copies so objects cross the edges smoothly
                for dy in (-h, 0, h):
                    _draw_shape(frame, o["shape"], x + dx, y + dy, size, o["color"])
        frame = frame + rng.normal(0, 6, frame.shape)
        out.append(frame.clip(0, 255).astype(np.uint8))
    return out


def _draw_shape(frame, shape, x, y, size, color):
    color = tuple(float(c) for c in np.clip(color, 0, 255))
    s = size / 2
    if shape == 0:
        cv2.circle(frame, (int(x), int(y)), int(s), color, -1, cv2.LINE_AA)
    elif shape == 1:
        cv2.rectangle(frame, (int(x) - int(s), int(y) - int(s)), (int(x) + int(s), int(y) + int(s)),
                      color, -1)
    else:
        pts = np.array([[x, y - s], [x - s, y + s], [x + s, y + s]], np.int32)
        cv2.fillPoly(frame, [pts], color, cv2.LINE_AA)


def _write_video(path, frames):
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"XVID"), DEMO_FPS, DEMO_SIZE)
    if not writer.isOpened():  # else the demo set would be half-written and taken as complete
        raise data.DataError(f"OpenCV cannot write XVID video {path}: "
                             "check opencv-python's install")
    for f in frames:
        writer.write(f)
    writer.release()


def _write_splits(root, classes, videos, test_groups):
    """UCF101 split files for `videos` [(rel, label, group)], CRLF as the official ones; groups
    1..test_groups are the test split."""
    lists = os.path.join(root, "ucfTrainTestlist")
    os.makedirs(lists, exist_ok=True)
    train = [(rel, label) for rel, label, g in videos if g > test_groups]
    test = [(rel, label) for rel, label, g in videos if g <= test_groups]
    for split in (1, 2, 3):
        with open(os.path.join(lists, f"trainlist0{split}.txt"), "w", newline="\r\n") as f:
            f.writelines(f"{rel} {label + 1}\n" for rel, label in train)
        with open(os.path.join(lists, f"testlist0{split}.txt"), "w", newline="\r\n") as f:
            f.writelines(f"{rel}\n" for rel, _ in test)
    with open(os.path.join(lists, "classInd.txt"), "w", newline="\r\n") as f:
        f.writelines(f"{i + 1} {name}\n" for i, name in enumerate(classes))


def make_demo(root, seed=0):
    """Write the default demo set (scenes within classes, see above) under `root`; a few seconds."""
    rng = np.random.default_rng(seed)
    classes = [name for name, _ in DEMO_SCENE_CLASSES]
    groups, test_groups, clips = DEMO_GROUPS["demo"]
    videos = []
    for label, (motion, texture) in enumerate(DEMO_SCENE_CLASSES):
        os.makedirs(os.path.join(root, "UCF-101", motion), exist_ok=True)
        for g in range(1, groups + 1):
            background = _scene_background(rng, texture)
            objects = _demo_objects(rng, rng.uniform(0, 255, (3, 3)))
            lengths = rng.integers(32, 49, clips)
            # one take of the scene
            take = _render(rng, motion, background, objects, int(lengths.sum()))
            for c, start in enumerate(np.cumsum(lengths) - lengths, 1):
                rel = f"{motion}/v_{motion}_g{g:02d}_c{c:02d}.avi"
                _write_video(os.path.join(root, "UCF-101", rel), take[start:start + lengths[c - 1]])
                videos.append((rel, label, g))
    _write_splits(root, classes, videos, test_groups)
    return root


def make_demo_motion(root, seed=0):
    """Write the demo-motion set (classes differ only in motion, see above) under `root`."""
    rng = np.random.default_rng(seed)
    w, h = DEMO_SIZE
    groups, test_groups, clips = DEMO_GROUPS["demo-motion"]
    videos = []
    for g in range(1, groups + 1):
        background = (_smooth_noise(rng, h, w, 4) * 160 + rng.uniform(0, 95, 3)).astype(np.float32)
        palette = rng.uniform(0, 255, (3, 3))
        for label, motion in enumerate(DEMO_MOTION_CLASSES):
            os.makedirs(os.path.join(root, "UCF-101", motion), exist_ok=True)
            for c in range(1, clips + 1):
                rel = f"{motion}/v_{motion}_g{g:02d}_c{c:02d}.avi"
                frames = int(rng.integers(32, 49))  # drawn before the objects, as version 1 did
                objects = _demo_objects(rng, palette)
                _write_video(os.path.join(root, "UCF-101", rel),
                             _render(rng, motion, background, objects, frames))
                videos.append((rel, label, g))
    _write_splits(root, DEMO_MOTION_CLASSES, videos, test_groups)
    return root


def ensure(dataset, root=None):
    """What a stage script calls before it lists its videos: for a built-in set, write it (into
    `root`, or the cache: data.demo_root) unless it is there; one line and exit if it cannot. Other
    datasets: nothing."""
    if dataset not in data.DEMOS:
        return
    try:
        ensure_demo(root or data.demo_root(dataset), dataset)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")


def ensure_demo(root, name="demo"):
    """Generate demo set `name` into `root` unless it is there, atomically."""
    done = os.path.join(root, "ucfTrainTestlist", "classInd.txt")
    if os.path.isfile(done):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    t0 = time.time()
    (make_demo_motion if name == "demo-motion" else make_demo)(tmp)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first, or root is a folder of something else
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(done):
            raise data.DataError(f"cannot write the {name} set to {root}: the folder is not empty")
    print(f"wrote the built-in {name} set to {root} ({time.time() - t0:.1f} s)", file=sys.stderr)
    return root


# -----------------------------------------------------------------------------
# data tools

def _check_one(job):
    path, min_frames = job
    try:
        with data.VideoReader(path) as reader:
            claimed = reader.claimed_frames
            real = reader.count_frames()
    except data.VideoError as e:
        return path, "unreadable", str(e)
    if real == 0:
        return path, "unreadable", "no decodable frames"
    if real < min_frames:
        return path, "too short", f"{real} frames, a clip needs at least {min_frames} to loop"
    if claimed != real:
        return path, "frame-count mismatch", f"container claims {claimed}, {real} decode"
    return path, "ok", ""


def check(args):
    """Decode every listed video of both splits: a summary and a file of the bad ones."""
    jobs = []
    missing = []
    for train in (True, False):
        samples, _, miss = data.list_videos(args.dataset, args.data_root, args.split, train)
        jobs += [(p, data.min_clip_frames(args.frames)) for p, _ in samples]
        missing += miss
    jobs = sorted(set(jobs))
    counts = dict.fromkeys(("ok", "unreadable", "too short", "frame-count mismatch"), 0)
    counts["missing"] = len(missing)
    bad = [(p, "missing", "listed in the split file but does not exist")
           for p in sorted(set(missing))]
    with ProcessPoolExecutor(max(args.workers, 1), initializer=data.quiet_opencv) as pool:
        for path, status, reason in pool.map(_check_one, jobs, chunksize=8):
            counts[status] += 1
            if status != "ok":
                bad.append((path, status, reason))
    print(f"{len(jobs) + len(missing)} videos: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    with open(args.bad_list, "w") as f:
        f.writelines(f"{p}\t{s}\t{r}\n" for p, s, r in bad)
    print(f"wrote {len(bad)} problem videos to {args.bad_list} "
          "(frame-count mismatches still load: the reader trusts decoding, not the container)")


def _resize_one(job):
    src, dst, short_side = job
    try:
        cap = data.open_capture(src)
    except data.VideoError as e:
        return src, str(e)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer = None
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        h, w = frame.shape[:2]
        s = short_side / min(h, w)
        size = (max(2, round(w * s / 2) * 2), max(2, round(h * s / 2) * 2))  # even sizes for codecs
        if writer is None:
            fourcc = cv2.VideoWriter_fourcc(*("mp4v" if dst.lower().endswith(".mp4") else "XVID"))
            writer = cv2.VideoWriter(dst + ".tmp" + os.path.splitext(dst)[1], fourcc, fps, size)
            if not writer.isOpened():
                return src, f"OpenCV cannot write {os.path.splitext(dst)[1]} video"
        writer.write(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))
        n += 1
    cap.release()
    if writer is None:
        return src, "no decodable frames"
    writer.release()
    os.replace(dst + ".tmp" + os.path.splitext(dst)[1], dst)
    return src, None


def resize(args):
    """Every video under SRC re-encoded into DST, short side resized, other files copied; videos
    already there are skipped, so it resumes."""
    if not os.path.isdir(args.src):
        raise data.DataError(f"source is not a folder: {args.src}")
    jobs = []
    for folder, _, files in os.walk(args.src):
        out = os.path.join(args.dst, os.path.relpath(folder, args.src))
        os.makedirs(out, exist_ok=True)
        for name in files:
            src = os.path.join(folder, name)
            dst = os.path.join(out, name)
            if name.lower().endswith(data.VIDEO_EXTENSIONS):
                if not os.path.exists(dst):
                    jobs.append((src, dst, args.short_side))
            else:
                shutil.copy2(src, dst)
    failed = 0
    with ProcessPoolExecutor(max(args.workers, 1), initializer=data.quiet_opencv) as pool:
        for i, (src, error) in enumerate(pool.map(_resize_one, jobs, chunksize=4), 1):
            if error:
                failed += 1
                print(f"skipping {src}: {error}", file=sys.stderr)
            if i % 500 == 0:
                print(f"{i}/{len(jobs)} videos re-encoded", flush=True)
    print(f"re-encoded {len(jobs) - failed} videos into {args.dst} ({failed} unreadable, skipped)")


def main():
    parser = argparse.ArgumentParser(description="VideoMoCo data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="write a built-in demo set (UCF101 layout)")
    p.add_argument("dir", nargs="?", default=None, help="output folder (default: the demo cache)")
    p.add_argument("--name", default="demo", choices=tuple(data.DEMOS))
    p = sub.add_parser("check", help="decode every listed video and report the bad ones")
    p.add_argument("--dataset", default="demo", choices=data.DATASETS)
    p.add_argument("--data-root", default=None, help="dataset root as unpacked from the archives")
    p.add_argument("--split", type=int, default=1, help="official split (1-3)")
    p.add_argument("--frames", type=int, default=32, help="clip length; under T/2 is 'too short'")
    p.add_argument("--bad-list", default="bad_videos.txt", help="where to write the problem videos")
    p = sub.add_parser("resize", help="re-encode a dataset tree with a smaller short side")
    p.add_argument("src", help="dataset root to read")
    p.add_argument("dst", help="dataset root to write (same layout, split files copied)")
    p.add_argument("--short-side", type=int, default=128, help="pixels of the short side")
    for p in sub.choices.values():
        p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes")
    args = parser.parse_args()
    data.quiet_opencv()
    try:
        if args.command == "demo":
            if args.dir and os.path.exists(os.path.join(args.dir, "ucfTrainTestlist")):
                raise data.DataError(f"{args.dir} already holds a dataset")
            print(ensure_demo(args.dir or data.demo_root(args.name), args.name))
        elif args.command == "check":
            check(args)
        else:
            resize(args)
    except data.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
