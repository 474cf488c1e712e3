"""
The built-in demo sets and the data tools of VideoMoCo; `python data.py demo|check|resize` runs
main().

    python data.py demo [DIR] [--name demo-motion]       # write a built-in demo set (UCF101 layout)
    python data.py check --dataset ucf101 --data-root R  # decode every listed video, list bad ones
    python data.py resize SRC DST --short-side 128       # re-encode a tree for faster loading
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np

from data import (DATASETS, DEMOS, DataError, VideoError, VideoReader, _is_video, demo_root,
                  list_videos,
                  min_clip_frames, open_capture)

# -----------------------------------------------------------------------------
# the built-in demo sets
#
# Both are written in the UCF101 layout (UCF-101/<Class>/v_<Class>_gGG_cCC.avi, ucfTrainTestlist/
# with CRLF split files; 3 splits that all hold out the same groups), 6 classes, groups of clips of
# 128x96 pixels, 32-48 frames, XVID; the first groups are the test split (DEMO_GROUPS), as UCF101
# holds out g01-g07.
#
# "demo" (the default) has UCF101's structure: a group is one scene, filmed once, of one class, and
# its 3 clips are consecutive pieces of that take. Each class is a scene type and an action: three
# scene types (the background's texture: vertical stripes, a checkerboard, horizontal stripes; every
# scene draws its own colours, period, phase and tilt) each host two actions that differ only in how
# the objects move. A single frame tells the scene type, so appearance alone can reach at most 1/2;
# the rest needs motion. Test groups are scenes never seen in training.
#
# "demo-motion" is the static-appearance stress test: six classes that differ only in motion, and
# every group's background and palette are shared by all six classes, so a frame says nothing about
# the class and instance discrimination on appearance learns nothing about it. Positions live on a
# torus (they wrap around the frame edges) with a random phase, so no frame position hints at the
# class either. Every motion in both sets is symmetric under a horizontal flip, so the flip
# augmentation never changes a label.

DEMO_SCENE_CLASSES = (("Rise", "vertical"), ("Fall", "vertical"), ("Grow", "checker"),
                      ("Shrink", "checker"), ("SwingHorizontal", "horizontal"),
                      ("SwingVertical", "horizontal"))
DEMO_MOTION_CLASSES = ("MoveUp", "MoveDown", "Grow", "Shrink", "SwingHorizontal", "SwingVertical")
# (groups per class, test groups, clips per group); the first groups are the test split (UCF101:
# g01-g07 of 25 groups of 4-7 clips). "demo" has more, shorter groups: its kNN and probe read 36
# independent test scenes rather than 18.
DEMO_GROUPS = {"demo": (16, 6, 3), "demo-motion": (10, 3, 4)}
DEMO_SIZE, DEMO_FPS = (128, 96), 25


def _smooth_noise(rng, h, w, cells):
    noise = rng.random((cells, cells * w // h + 1, 3)).astype(np.float32)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)


def _scene_background(rng, texture):
    """A scene's background (H, W, 3) float: a smoothed square-wave grating of the scene type's
    orientation (tilted by up to 20 degrees), or the product of two (a checkerboard), in two colours
    of its own, one dark and one light."""
    w, h = DEMO_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period, tilt = rng.uniform(6, 14), rng.uniform(-0.35, 0.35)

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
    dark, light = rng.uniform(0, 110, 3), rng.uniform(140, 255, 3)
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
            x, y, size = o["x"], o["y"], o["size"]
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
    if shape == 0:
        cv2.circle(frame, (int(x), int(y)), int(size / 2), color, -1, cv2.LINE_AA)
    elif shape == 1:
        s = int(size / 2)
        cv2.rectangle(frame, (int(x) - s, int(y) - s), (int(x) + s, int(y) + s), color, -1)
    else:
        s = size / 2
        pts = np.array([[x, y - s], [x - s, y + s], [x + s, y + s]], np.int32)
        cv2.fillPoly(frame, [pts], color, cv2.LINE_AA)


def _write_video(path, frames):
    w, h = DEMO_SIZE
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"XVID"), DEMO_FPS, (w, h))
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


def ensure_demo(root, name="demo"):
    """Generate the demo set `name` into `root` unless it is already there (atomically: a
    half-written set from an interrupted run is never used)."""
    if os.path.isfile(os.path.join(root, "ucfTrainTestlist", "classInd.txt")):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    t0 = time.time()
    (make_demo_motion if name == "demo-motion" else make_demo)(tmp)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote the built-in {name} set to {root} ({time.time() - t0:.1f} s)", file=sys.stderr)
    return root


# -----------------------------------------------------------------------------
# data tools

def _check_one(job):
    path, min_frames = job
    try:
        with VideoReader(path) as reader:
            claimed = reader.claimed_frames
            real = reader.count_frames()
    except VideoError as e:
        return path, "unreadable", str(e), 0, 0
    if real == 0:
        return path, "unreadable", "no decodable frames", claimed, real
    if real < min_frames:
        why = f"{real} frames, a clip needs at least {min_frames} to loop"
        return path, "too short", why, claimed, real
    if claimed != real:
        why = f"container claims {claimed}, {real} decode"
        return path, "frame-count mismatch", why, claimed, real
    return path, "ok", "", claimed, real


def check(args):
    """Decode every listed video of both splits; summary and a file of the bad ones."""
    jobs, missing = [], []
    for train in (True, False):
        samples, _, miss = list_videos(args.dataset, args.data_root, args.split, train)
        jobs += [(p, min_clip_frames(args.frames)) for p, _ in samples]
        missing += miss
    jobs = sorted(set(jobs))
    counts = {"ok": 0, "unreadable": 0, "too short": 0, "frame-count mismatch": 0,
              "missing": len(missing)}
    bad = [(p, "missing",
            "listed in the split file but does not exist") for p in sorted(set(missing))]
    with ProcessPoolExecutor(max(args.workers, 1)) as pool:
        for path, status, reason, _, _ in pool.map(_check_one, jobs, chunksize=8):
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
        cap = open_capture(src)
    except VideoError as e:
        return src, str(e)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer, n = None, 0
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
        writer.write(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))
        n += 1
    cap.release()
    if writer is None:
        return src, "no decodable frames"
    writer.release()
    os.replace(dst + ".tmp" + os.path.splitext(dst)[1], dst)
    return src, None


def resize(args):
    """Re-encode every video under SRC into DST with the short side resized; other files (split
    lists) are copied, the layout is kept. Already-converted videos are skipped, so it resumes."""
    if not os.path.isdir(args.src):
        raise DataError(f"source is not a folder: {args.src}")
    jobs = []
    for folder, _, files in os.walk(args.src):
        out = os.path.join(args.dst, os.path.relpath(folder, args.src))
        os.makedirs(out, exist_ok=True)
        for name in files:
            src, dst = os.path.join(folder, name), os.path.join(out, name)
            if _is_video(name):
                if not os.path.exists(dst):
                    jobs.append((src, dst, args.short_side))
            else:
                shutil.copy2(src, dst)
    failed = 0
    with ProcessPoolExecutor(max(args.workers, 1)) as pool:
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
    p.add_argument("--name", default="demo", choices=tuple(DEMOS), help="which demo set")
    p = sub.add_parser("check", help="decode every listed video and report the bad ones")
    p.add_argument("--dataset", default="demo", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-root", default=None, help="dataset root as unpacked from the archives")
    p.add_argument("--split", type=int, default=1, help="official split (1-3)")
    p.add_argument("--frames", type=int, default=32,
                   help="clip length T; videos under T/2 frames are 'too short'")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decode processes")
    p.add_argument("--bad-list", default="bad_videos.txt", help="where to write the problem videos")
    p = sub.add_parser("resize", help="re-encode a dataset tree with a smaller short side")
    p.add_argument("src", help="dataset root to read")
    p.add_argument("dst", help="dataset root to write (same layout, split files copied)")
    p.add_argument("--short-side", type=int, default=128, help="pixels of the short side (128)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="encode processes")
    args = parser.parse_args()
    try:
        if args.command == "demo":
            if args.dir:
                if os.path.exists(os.path.join(args.dir, "ucfTrainTestlist", "classInd.txt")):
                    raise DataError(f"{args.dir} already holds a dataset")
                t0 = time.time()
                (make_demo_motion if args.name == "demo-motion" else make_demo)(args.dir)
                print(f"wrote the {args.name} set to {args.dir} in {time.time() - t0:.1f} s")
            else:
                print(ensure_demo(demo_root(args.name), args.name))
        elif args.command == "check":
            check(args)
        else:
            resize(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
