"""
pytest's hook and the fixtures the test files share. The hook runs before collection: where OpenCV
cannot load (no libGL), the check in data.py gives its one line (what to install) instead of an
import traceback, so nothing here imports OpenCV at the top (the fixtures import what they write
with). The fixtures: small video sets, real files encoded by OpenCV in temporary folders.
"""

import numpy as np
import pytest


def pytest_configure(config):
    try:
        import data  # noqa: F401 (imported for its check)
    except Exception as e:
        if type(e).__name__ != "OpenCVUnavailable":
            return  # any other error: collection reports it, with its traceback
        message = str(e)
    else:
        return
    pytest.exit(f"error: {message}", returncode=1)  # printed as one line, "Exit: error: ..."


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    import demo_data
    return demo_data.make_demo(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="session")
def demo_motion_root(tmp_path_factory):
    import demo_data
    return demo_data.make_demo_motion(str(tmp_path_factory.mktemp("demo-motion")))


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory):
    """A `folder` dataset of 8 short random-texture videos in 2 classes."""
    from testlib import write_video
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    for i in range(8):
        base = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        frames = [np.roll(base, 2 * t * (1 if i % 2 else -1), axis=1) for t in range(12)]
        write_video(str(root / f"c{i % 2}" / f"v{i}.avi"), frames)
    return str(root)


@pytest.fixture(scope="session")
def distinct_tree(tmp_path_factory):
    """48 videos (4 class folders) that two augmented views of a clip still match: each a random
    binary texture in two colours of its own, drifting a pixel or two per frame; 24 frames,
    48x48."""
    from testlib import write_video
    root = tmp_path_factory.mktemp("distinct")
    rng = np.random.default_rng(0)
    for i in range(48):
        colors = rng.integers(0, 256, (2, 3))
        base = np.where(rng.random((96, 96, 1)) < 0.5, colors[0], colors[1]).astype(np.uint8)
        dy, dx = rng.integers(-2, 3, 2)
        frames = [np.roll(base, (t * dy, t * dx), axis=(0, 1))[:48, :48].copy() for t in range(24)]
        write_video(str(root / f"c{i % 4}" / f"v{i:02d}.avi"), frames)
    return str(root)
