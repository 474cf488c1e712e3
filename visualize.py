"""
The pictures of evaluate.py, drawn with OpenCV and torchvision.utils (no plotting library):

  - occlusion_figure (--figure, the paper's Fig 4): each clip's frames in a strip per drop mode
    (none, random, G's), the dropped frames greyed and crossed, and beside each strip every
    checkpoint's prediction and entropy on that clip under that mode;
  - cam_figure (--cam, the paper's Fig 5): each clip's frames, and below them every checkpoint's
    Grad-CAM map per frame as a JET colour map over the frame (red = more attention).

Only draws: evaluate.py computes every number shown. Imports nothing of the project.
"""

import os

import cv2
import numpy as np
import torch
import torchvision

FONT = cv2.FONT_HERSHEY_SIMPLEX
GREEN = (40, 160, 40)  # BGR
RED = (40, 40, 210)
BLACK = (0, 0, 0)
PAD = 2  # pixels between frames


def to_bgr(frames, height):
    """Frames (3, T, H, W) in [0, 1] -> uint8 BGR (T, height, width, 3), aspect kept."""
    t, h, w = frames.shape[1:]
    width = max(1, round(w * height / h))
    x = frames.permute(1, 0, 2, 3).float().clamp(0, 1)  # (T, 3, H, W)
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear",
                                        align_corners=False)
    rgb = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (T, h, w, 3)
    return np.ascontiguousarray(rgb[..., ::-1])


def strip(tiles):
    """uint8 BGR tiles (T, h, w, 3) side by side with PAD white pixels between them
    (torchvision.utils.make_grid)."""
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)  # (T, 3, h, w)
    grid = torchvision.utils.make_grid(x, nrow=len(tiles), padding=PAD, pad_value=255)
    return np.ascontiguousarray(grid.permute(1, 2, 0).numpy())


def mark_dropped(tiles, dropped):
    """Tiles (T, h, w, 3) with the frames where `dropped` (T,) is set greyed and crossed in red."""
    out = tiles.copy()
    h, w = tiles.shape[1:3]
    for i in np.flatnonzero(np.asarray(dropped) > 0.5):
        out[i] = (0.35 * out[i] + 0.65 * 128).astype(np.uint8)
        cv2.line(out[i], (0, 0), (w - 1, h - 1), RED, 2, cv2.LINE_AA)
        cv2.line(out[i], (0, h - 1), (w - 1, 0), RED, 2, cv2.LINE_AA)
    return out


def cam_overlay(tiles, cam, alpha=0.5):
    """Tiles (T, h, w, 3) blended with the JET colour map (cv2.applyColorMap) of `cam` (T, H', W')
    in [0, 1], resized to the tiles."""
    h, w = tiles.shape[1:3]
    out = np.empty_like(tiles)
    for i, (tile, c) in enumerate(zip(tiles, cam)):
        c = cv2.resize(np.asarray(c, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        colour = cv2.applyColorMap((c.clip(0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
        out[i] = cv2.addWeighted(tile, 1 - alpha, colour, alpha, 0)
    return out


def text_block(lines, height, width, scale=0.4):
    """A white block (height, width, 3) with `lines` [(text, BGR colour)], one per row."""
    block = np.full((height, width, 3), 255, np.uint8)
    step = max(12, height // max(len(lines), 1))
    for row, (text, colour) in enumerate(lines):
        y = min(height - 3, 4 + step * row + int(step * 0.7))
        cv2.putText(block, text, (4, y), FONT, scale, colour, 1, cv2.LINE_AA)
    return block


def title_row(text):
    """A figure's line over a video: black text on a white block as wide as the text."""
    return text_block([(text, BLACK)], 16, 10 * len(text) + 8)


def hstack(*images):
    return np.concatenate(images, axis=1)


def vstack(images, gap=0):
    """Images of any widths one under the other (white to the right of narrower ones, `gap` white
    rows between)."""
    width = max(im.shape[1] for im in images)
    rows = []
    for im in images:
        rows.append(np.pad(im, ((0, gap), (0, width - im.shape[1]), (0, 0)), constant_values=255))
    return np.concatenate(rows, axis=0)


def write_png(path, image, bits=5):
    """`image` (uint8 BGR) to `path` as PNG, atomically (path.tmp, then os.replace), its colours
    kept to `bits` per channel: invisible in these pictures, and it halves the file (the demo's
    striped textures defeat PNG's compression otherwise)."""
    drop = 8 - bits
    image = (image >> drop << drop) + (1 << drop >> 1)  # the middle of each colour bin
    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buffer.tobytes())
    os.replace(tmp, path)


def occlusion_figure(path, clips, titles, masks, captions, height=40):
    """Fig 4. clips: frames (3, T, H, W) in [0, 1] per video; titles: a line per video; masks:
    {mode: (V, T) dropped frames}; captions: {mode: per video, lines [(text, colour)]}."""
    blocks = []
    for v, clip in enumerate(clips):
        tiles = to_bgr(clip, height)
        rows = [title_row(titles[v])]
        for mode, mask in masks.items():
            frames = strip(mark_dropped(tiles, mask[v]))
            lines = [(mode, BLACK)] + captions[mode][v]
            rows.append(hstack(frames, text_block(lines, frames.shape[0], 300)))
        blocks.append(vstack(rows, gap=PAD))
    write_png(path, vstack(blocks, gap=10))


def cam_figure(path, clips, titles, cams, captions, height=56, max_frames=8):
    """Fig 5. clips: frames (3, T, H, W) in [0, 1] per video; titles: a line per video; cams:
    {checkpoint label: per video, (T, H', W') in [0, 1]}; captions: {checkpoint label: per video,
    lines [(text, colour)]}. At most `max_frames` frames a clip, evenly spaced."""
    blocks = []
    for v, clip in enumerate(clips):
        t = clip.shape[1]
        shown = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
        tiles = to_bgr(clip[:, shown], height)
        frames = strip(tiles)
        rows = [title_row(titles[v]),
                hstack(frames, text_block([("frames", BLACK)], frames.shape[0], 300))]
        for label, per_video in cams.items():
            overlay = strip(cam_overlay(tiles, np.asarray(per_video[v])[shown]))
            lines = [(label, BLACK)] + captions[label][v]
            rows.append(hstack(overlay, text_block(lines, overlay.shape[0], 300)))
        blocks.append(vstack(rows, gap=PAD))
    write_png(path, vstack(blocks, gap=10))
