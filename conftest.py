"""pytest's hook for test_videomoco.py: before collection, the check that OpenCV loads, so that a
machine without libGL gets data.py's one line (what to install) instead of an import traceback."""

import pytest


def pytest_configure(config):
    try:
        import data  # noqa: F401 (imported for its check)
    except SystemExit as e:  # data.py's one line; pytest.exit prints it as "Exit: error: ..."
        message = str(e)
    else:
        return
    pytest.exit(message, returncode=1)
