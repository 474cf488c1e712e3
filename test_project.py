"""
The project as a whole: the README's tables name tests that exist, the imports form a tree, and
every entry point says in one line what is missing where OpenCV cannot load.
"""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys

from testlib import HERE


# -----------------------------------------------------------------------------
# the project as a whole


# every module of the project (its .py files beside the tests), so a new file joins the tree's test
MODULES = sorted(f.removesuffix(".py") for f in os.listdir(HERE)
                 if f.endswith(".py") and not f.startswith(("test_", ".")))


def project_imports(module):
    """The project modules that `module`.py imports, read from its source."""
    tree = ast.parse(open(os.path.join(HERE, module + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_imports_form_a_tree_with_two_leaves():
    # models.py and data.py import nothing of the project; utils.py only models.py (its one "am I
    # distributed?"), methods.py only models.py and data.py (its pairs are data.PairMakers),
    # demo_data.py only data.py; the stage scripts only models, data, demo_data, methods, utils
    # and the pictures, curves and visualize (which import nothing of the project)
    # (bench.py also pretrain.py, for its step); gpu_report.py none
    graph = {m: project_imports(m) for m in MODULES}
    card = {"models", "data", "methods", "utils", "pretrain", "finetune", "evaluate", "bench"}
    assert card <= set(graph)
    assert graph["models"] == graph["data"] == set()
    assert graph["utils"] == {"models"}  # for models.is_distributed
    assert graph["methods"] == {"models", "data"}
    assert graph["demo_data"] == {"data"}
    assert graph["curves"] == set()  # pretrain.py's picture, drawn from log.jsonl
    assert graph["visualize"] == set()  # evaluate.py's pictures
    for stage in ("pretrain", "finetune", "evaluate"):
        assert graph[stage] <= {"models", "data", "demo_data", "methods", "utils", "curves",
                                "visualize"}, stage
    assert graph["bench"] <= {"models", "data", "utils", "pretrain"}
    assert graph["gpu_report"] == set()  # it runs the scripts as commands

    def visit(m, path):  # depth-first: a module met again on its own path is a cycle
        assert m not in path, path + [m]
        for n in graph[m]:
            visit(n, path + [m])

    for m in MODULES:
        visit(m, [])


def names_of_tests(filename):
    """The names of the test functions defined in `filename` (a test file beside this one)."""
    tree = ast.parse(open(os.path.join(HERE, filename)).read())
    return {node.name for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_the_readme_names_a_test_for_every_equation():
    # the equation table of README.md: every test it names exists in test_videomoco.py, the file
    # of the equations, and every equation has one
    equations = names_of_tests("test_videomoco.py")
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("## The method, where it lives"):readme.index("One step, as")]
    rows = [line for line in table.splitlines() if line.startswith("| Eq")]
    assert len(rows) == 5  # Eq 1, 2, 3, 4, 5/6
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)  # the cells, escaped pipes kept
        tests = cells[3].replace("`", "").replace(",", " ").split()
        assert tests and set(tests) <= equations, row


def fake_cv2(root, message):
    """A `cv2` package under `root` whose import fails with `message`, as opencv-python's does where
    a library it links is missing. Returns an environment that puts it ahead of the real one."""
    os.makedirs(os.path.join(root, "cv2"))
    with open(os.path.join(root, "cv2", "__init__.py"), "w") as f:
        f.write(f"raise ImportError({message!r})\n")
    env = dict(os.environ, PYTHONPATH=str(root))
    for name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS"):  # the nested pytest runs as the README's
        env.pop(name, None)
    return env


def opencv_pin():
    """'==version' of the installed opencv-python (or its contrib flavour), '' for neither."""
    for name in ("opencv-python", "opencv-contrib-python"):
        try:
            return "==" + importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return ""


def test_without_libgl_every_entry_point_stops_with_one_line(tmp_path):
    # a slim container or GPU node without libGL.so.1: the stage scripts, bench.py, demo_data.py's
    # commands and the tests' collection each print one line naming both fixes, and exit 1
    env = fake_cv2(tmp_path / "nogl", "libGL.so.1: cannot open shared object file: No such file "
                                      "or directory")
    scripts = ["pretrain.py", "finetune.py", "evaluate.py", "bench.py", "demo_data.py"]
    pytest_collect = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                      "--collect-only", "test_videomoco.py"]
    one_line = [[sys.executable, s, "--help"] for s in scripts] + [pytest_collect]
    # code that imports data.py can catch it as the ImportError it is
    catch = [sys.executable, "-c", "try:\n    import data\nexcept ImportError as e:\n"
                                   "    print('caught', type(e).__name__)"]
    # any other import error is not ours to explain: its own traceback, for a script and for pytest
    other = fake_cv2(tmp_path / "other", "numpy.core.multiarray failed to import")
    runs = ([(c, env) for c in one_line] + [(catch, env)]
            + [([sys.executable, "demo_data.py", "--help"], other), (pytest_collect, other)])
    procs = [subprocess.Popen(c, cwd=HERE, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c, e in runs]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()  # no-op for those that ended
    codes = [p.returncode for p in procs]
    headless = rf"pip install opencv-(contrib-)?python-headless{re.escape(opencv_pin())} "
    for command, code, out in zip(one_line, codes, outputs):
        lines = out.strip().splitlines()
        assert code == 1 and len(lines) == 1, (command, out)
        assert "error: OpenCV cannot load: libGL.so.1: cannot open shared object file" in lines[0]
        assert "apt-get install libgl1 libglib2.0-0" in lines[0], command
        assert re.search(headless, lines[0]), command
    n = len(one_line)
    assert codes[n] == 0 and outputs[n].strip() == "caught OpenCVUnavailable", outputs[n]
    assert codes[n + 1] == 1 and "Traceback" in outputs[n + 1]
    assert codes[n + 2] == 2 and "INTERNALERROR" not in outputs[n + 2]  # a collection error
    for out in outputs[n + 1:]:
        assert "numpy.core.multiarray failed to import" in out and "OpenCV cannot load" not in out
