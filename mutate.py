"""
Hand-written mutants of the method: each is one way of getting VideoMoCo wrong (three of them are
what the authors' code does), applied to a copy of the repository, against which the suite must
fail. A mutant that passes is a survivor and the run exits 1. The program's own mutants (mutmut,
configured in setup.cfg) are the other half; RESULTS.md, "Mutation testing", has both runs.

    python mutate.py               # every mutant, 2 at a time (about 7 minutes on 2 cores)
    python mutate.py --list        # their names and what each breaks
    python mutate.py eq6_unused    # some of them

Each mutant runs the method's tests (setup.cfg's selection, the one mutmut uses) with `pytest -x`,
or the slower tests it names, and reports the first test that failed. A mutant is killed only by a
failing test (pytest's exit 1); the unmutated copy must pass the same tests first.
"""

import argparse
import configparser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Mutant:
    name: str
    what: str
    file: str
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple = ()  # node ids to run instead of the method's tests (slow tests of one concern)
    also: tuple = ()  # more (old, new) edits of the same file


@dataclass
class Outcome:
    killed: bool
    why: str  # the first failing test, or what happened
    seconds: float


MUTANTS = [
    Mutant("eq6_unused", "training never uses Eq 6: the forward computes Eq 1 whatever t is",
           "models.py",
           "loss_d, acc = self.contrast(q, k, self.decay if decay is None else decay)",
           "loss_d, acc = self.contrast(q, k, 1.0)"),
    Mutant("eq6_not_passed", "the step does not pass the schedule's t (the model's own is used)",
           "pretrain.py",
           "out = model(x_query_in, x_key, decay=decay, adversarial=adversarial, x_full=x)",
           "out = model(x_query_in, x_key, adversarial=adversarial, x_full=x)"),
    Mutant("enqueue_before_logits", "the batch's keys enter the queue before the loss sees it",
           "models.py",
           "        loss_d, acc = self.contrast(",
           "        if self.training:\n"
           "            self.dequeue_and_enqueue(k)\n"
           "        loss_d, acc = self.contrast(",
           also=(("        if self.training:\n"
                  "            self.dequeue_and_enqueue(k)  # after the scores",
                  "        if False:\n"
                  "            self.dequeue_and_enqueue(k)  # after the scores"),)),
    Mutant("momentum_after_keys", "Eq 2 after the key forward (MoCo updates before it)",
           "models.py",
           """            if self.training:
                self.momentum_update()  # Eq 2, before the key forward
            k = F.normalize(self.encode_key(x_key), dim=1)  # (N, dim)""",
           """            k = F.normalize(self.encode_key(x_key), dim=1)  # (N, dim)
            if self.training:
                self.momentum_update()"""),
    Mutant("momentum_swapped", "Eq 2 with m and 1 - m swapped", "models.py",
           """        torch._foreach_mul_(params_k, m)
        torch._foreach_add_(params_k, [p.detach() for p in params_q], alpha=1 - m)""",
           """        torch._foreach_mul_(params_k, 1 - m)
        torch._foreach_add_(params_k, [p.detach() for p in params_q], alpha=m)"""),
    Mutant("drop_least_important", "Eq 3 drops the k least important frames (the authors' code)",
           "models.py",
           "top_values, top_index = importance.topk(k + 1, dim=1)",
           "top_values, top_index = importance.topk(k + 1, dim=1, largest=False)"),
    Mutant("ages_per_step", "Eq 6's i counted in steps, a batch of keys one age (authors' code)",
           "models.py",
           "            queue_age += batch * finite\n"
           "            queue_age[slots] = torch.where(finite, torch.arange(kept, 0, -1, ",
           "            queue_age += finite\n"
           "            queue_age[slots] = torch.where(finite, 1 + 0 * torch.arange(kept, 0, -1, "),
    Mutant("g_trained_by_d", "G also follows D's loss (the authors' code)", "models.py",
           "grad_in, = torch.autograd.grad(scale(loss_g), x_query_in, retain_graph=True)",
           "grad_in, = torch.autograd.grad(scale(loss_g + loss_d), x_query_in, retain_graph=True)"),
    Mutant("g_no_gradient", "G gets no gradient", "models.py",
           "    x_query.backward(grad_in)",
           "    x_query.backward(torch.zeros_like(grad_in))"),
    Mutant("d_trained_by_g", "D also follows Eq 4 (D helps G)", "models.py",
           "torch.autograd.backward(scale(loss_d), inputs=list(d_params))",
           "torch.autograd.backward(scale(loss_d + loss_g), inputs=list(d_params))"),
    Mutant("positive_decayed", "Eq 6 weights the positive too (as a key of age 1)", "models.py",
           "logits = torch.cat([l_pos / tau, l_neg], dim=1)  # (N, 1 + K)",
           "logits = torch.cat([l_pos / tau + math.log(decay), l_neg], dim=1)  # (N, 1 + K)"),
    Mutant("split_bn_unshuffled", "one process's shuffle-BN emulation splits the keys unshuffled",
           "models.py",
           "chunks = torch.tensor_split(x_key[perm], min(self.shuffle_splits, n))",
           "chunks = torch.tensor_split(x_key, min(self.shuffle_splits, n))",
           also=(("return k[perm.argsort()]", "return k"),)),
    Mutant("shuffle_bn_off", "shuffle-BN without the shuffle: each process normalises its own keys",
           "models.py",
           "perm = torch.randperm(x_all.shape[0], device=x_key.device)",
           "perm = torch.arange(x_all.shape[0], device=x_key.device)",
           tests=("test_videomoco.py::test_distributed_shuffle_bn_matches_per_process_batches",)),
    Mutant("nonfinite_steps", "a non-finite loss still steps the optimizers", "pretrain.py",
           """        torch._foreach_copy_(bn_statistics(model, generator), bn_before)
        return out
""", """        torch._foreach_copy_(bn_statistics(model, generator), bn_before)
""",
           tests=("test_stages.py::test_nonfinite_step_leaves_weights_and_optimizers",)),
    Mutant("bn_not_restored", "a skipped non-finite step keeps the NaN its forward wrote into BN",
           "pretrain.py",
           "        torch._foreach_copy_(bn_statistics(model, generator), bn_before)",
           "        pass",
           tests=("test_stages.py::test_nonfinite_step_leaves_weights_and_optimizers",)),
    Mutant("epoch_sums_lost", "a mid-epoch resume starts the epoch's averages from zero",
           "pretrain.py",
           "        sums[k] += v.to(run.device)",
           "        pass",
           tests=("test_stages.py::test_pretrain_resume_is_exact_mid_epoch",)),
    Mutant("restart_reads_stale_store", "torchrun's restarted group shares the dead group's keys",
           "utils.py",
           'store=dist.PrefixStore(f"group{generation}/", store))',
           'store=store)',
           tests=("test_stages.py::"
                  "test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint",)),
    Mutant("loader_dies_of_sigterm", "the loader workers die of a scheduler's SIGTERM", "data.py",
           "        signal.signal(sig, signal.SIG_IGN)",
           "        pass",
           tests=("test_stages.py::test_sigterm_to_the_process_group_saves_and_resumes",)),
    Mutant("bf16_ignored", "--amp bf16 runs in float32", "utils.py",
           "    if amp == \"none\":",
           "    if amp in (\"none\", \"bf16\"):",
           tests=("test_stages.py::test_pretrain_bf16_autocast_on_cpu",)),
    Mutant("eq6_off_by_one", "Eq 6's negatives weighted t^(i+1) for t^i", "models.py",
           "log_weight = age.to(q.dtype) * math.log(decay)",
           "log_weight = (age.to(q.dtype) + 1) * math.log(decay)"),
    Mutant("chance_weights_off_by_one", "decay_weights, the chance level's t^i, as t^(i+1)",
           "models.py",
           "age.to(torch.float64))",
           "age.to(torch.float64) + 1)"),
]


def method_tests():
    """setup.cfg's [mutmut] pytest_add_cli_args_test_selection: the method's fast tests."""
    config = configparser.ConfigParser()
    config.read(os.path.join(HERE, "setup.cfg"))
    lines = config.get("mutmut", "pytest_add_cli_args_test_selection").splitlines()
    return [line for line in lines if line]


def copy_repo(dst):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=HERE, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(HERE, f)):
            os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
            shutil.copy2(os.path.join(HERE, f), os.path.join(dst, f))


def edits(mutant):
    return ((mutant.old, mutant.new),) + mutant.also


def check(mutant, root):
    """Every text a mutant replaces is in its file exactly once (else the code moved)."""
    with open(os.path.join(root, mutant.file)) as f:
        source = f.read()
    for old, _ in edits(mutant):
        found = source.count(old)
        if found != 1:
            raise SystemExit(f"error: mutant {mutant.name}: its original text occurs {found} "
                             f"times in {mutant.file} (the code moved: update mutate.py)")


def apply(mutant, root):
    check(mutant, root)
    path = os.path.join(root, mutant.file)
    with open(path) as f:
        source = f.read()
    for old, new in edits(mutant):
        source = source.replace(old, new)
    with open(path, "w") as f:
        f.write(source)


def run(mutant, tests, timeout):
    """The tests against a copy of the repository with `mutant` applied (None: unmutated)."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mutant-") as root:
        copy_repo(root)
        if mutant is not None:
            apply(mutant, root)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        try:
            r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(False, f"timed out after {timeout} s", time.time() - t0)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    if r.returncode == 0:
        return Outcome(False, "all passed", time.time() - t0)
    if r.returncode != 1 or not failed:  # an internal or usage error is no test failing
        tail = (r.stdout + r.stderr).strip().splitlines()[-1:]
        return Outcome(False, f"pytest exit {r.returncode}: {' '.join(tail)}", time.time() - t0)
    return Outcome(True, failed[0].split("::")[-1], time.time() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--jobs", type=int, default=2, help="mutants run at once")
    p.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    args = p.parse_args()
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:26s} {m.file:12s} {m.what}")
        return
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"error: unknown mutant(s) {', '.join(sorted(unknown))}; see --list")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    for m in chosen:  # every original text is still there, before anything runs
        check(m, HERE)
    # the unmutated copy passes every test the mutants run, or no kill means anything
    baseline = method_tests() + sorted({t for m in chosen for t in m.tests})
    clean = run(None, baseline, args.timeout)
    if clean.why != "all passed":
        raise SystemExit(f"error: the unmutated code fails its tests: {clean.why}")
    print(f"{'unmutated':26s} all passed ({clean.seconds:.0f} s)", flush=True)
    survivors = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = pool.map(lambda m: run(m, list(m.tests) or method_tests(), args.timeout),
                            chosen)
        for m, outcome in zip(chosen, outcomes):
            survivors += not outcome.killed
            if outcome.killed:
                verdict = "killed by"
            else:
                verdict = "SURVIVED:"
            print(f"{m.name:26s} {verdict} {outcome.why} ({outcome.seconds:.0f} s)", flush=True)
    print(f"{len(chosen) - survivors}/{len(chosen)} mutants killed")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
