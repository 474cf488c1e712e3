"""pytest's hook for test_videomoco.py: before collection, the check that OpenCV loads, so that a
machine without libGL gets data.py's one line (what to install) instead of an import traceback."""

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
