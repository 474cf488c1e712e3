"""
The GPU path in one command, for a short allocation on a GPU node (about 8 minutes on one
H100/H200): a CUDA check of every stage, the step at the paper's size with its MFU, the profile,
the loader cores a GPU needs, and what a pretraining costs.

    python gpu_report.py --out gpu-report              # on the GPU node
    python gpu_report.py --out /tmp/r --dry-run        # the same plumbing on CPU, at a tiny size

Each part runs the project's own commands in processes of their own and goes on past a failure,
recording its error: OUT/report.md (the tables, for RESULTS.md), OUT/report.json (everything),
OUT/logs/NAME.log (each command's output), OUT/runs/ (the runs' folders).
  1. smoke:   pretrain.py on the demo set for 2 epochs with the CUDA defaults (bf16, augmentation
              on the device, the adversarial phase from epoch 1); again with --amp fp16
              --channels-last --compile; finetune.py 1 epoch, evaluate.py --occlusion; --method
              moco, cvrl, vclr 1 epoch each. Each must end with finite losses and a checkpoint
              that loads on CPU with weights_only=True; the peak GPU memory of each.
  2. step:    bench.py --step: R(2+1)D-10, 32 x 112, per-GPU batch 16, 32, 64, 128; the MoCo and
              the adversarial step; eager, channels_last_3d, torch.compile.
  3. profile: bench.py --profile: the ten costliest kernels of one adversarial step.
  4. loader:  bench.py --loader with all of the node's cores: the worker time of a sample with the
              augmentation on the device, with and without --repeat-sample 2.
  5. cost:    from 2 and 4, the hours of the paper's pretraining (Kinetics-400) and of a UCF101
              one on 1 and 8 GPUs, with the loader cores they need.
The dry run runs the same commands on CPU at a tiny size and leaves out, with one line each, only
what needs CUDA (--amp fp16) or would take minutes on CPU (torch.compile).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# what a pretraining costs (part 5): (videos, epochs), one clip per video per epoch
RUNS = {"Kinetics-400, 200 epochs (the paper's)": (240_000, 200),
        "UCF101 split 1 train, 200 epochs": (9_537, 200)}
ADVERSARIAL_SHARE = 0.5  # pretrain.py's default --adv-start: the second half is adversarial


def run_command(name, argv, out, timeout, deadline=None):
    """One command in a process of its own, its output in OUT/logs/NAME.log, ended at `timeout`
    seconds or at the report's deadline (time.time()), whichever is first. Returns {"ok", "rc",
    "seconds", "error"}: the error is the log's last lines where it failed."""
    if deadline is not None:
        timeout = min(timeout, deadline - time.time())
        if timeout < 10:
            return {"ok": False, "rc": None, "seconds": 0,
                    "error": "not run: the report's time budget (--minutes) is spent"}
    log_path = os.path.join(out, "logs", f"{name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        try:
            rc = subprocess.run(argv, cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = {"ok": rc == 0, "rc": rc, "seconds": round(time.time() - t0, 1), "error": None}
    if rc != 0:
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-3:]
        result["error"] = f"exit {rc}" + (": " + " / ".join(tail) if tail else "")
    return result


def check_run(folder, ckpt_name="ckpt.pt"):
    """A stage's run folder: its logged losses all finite, its checkpoint loadable on CPU with
    weights_only=True, its peak GPU memory. Returns (problems, peak GiB or None)."""
    problems = []
    records = []
    log_path = os.path.join(folder, "log.jsonl")
    if os.path.exists(log_path):
        with open(log_path) as f:
            records = [json.loads(line) for line in f]
    losses = [v for r in records for k, v in r.items() if k.startswith("loss") and v is not None]
    if not losses:
        problems.append("no loss logged")
    elif not all(math.isfinite(v) for v in losses):
        problems.append("a non-finite loss")
    try:
        ckpt = torch.load(os.path.join(folder, ckpt_name), map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict):
            problems.append(f"{ckpt_name} is not a dict")
    except Exception as e:  # any reason it does not load is the finding
        problems.append(f"{ckpt_name} does not load with weights_only=True: "
                        f"{str(e).splitlines()[0]}")
    peaks = [r["cuda_peak_gib"] for r in records if "cuda_peak_gib" in r]
    return problems, max(peaks) if peaks else None


def smoke_stages(out, dry_run, data_root):
    """The stage commands of part 1: (name, argv, the folder to check or None, skipped reason)."""
    py = sys.executable
    runs = os.path.join(out, "runs")
    tiny = []
    if dry_run:  # the demo set at a tiny size (with --data-root the demo presets do not apply)
        tiny = ["--arch", "tiny", "--frames", "4", "--stride", "2", "--crop", "32",
                "--batch-size", "8", "--moco-k", "16", "--workers", "1", "--print-freq", "100"]
    data_args = ["--dataset", "demo"] + (["--data-root", data_root] if data_root else [])

    def pretrain(name, *flags):
        return [py, "pretrain.py", *data_args, *tiny, "--out", os.path.join(runs, name), *flags]

    fast = ["--amp", "fp16", "--channels-last", "--compile"]
    skip_fast = None
    if dry_run:
        fast = ["--channels-last"]
        skip_fast = "dry run: --amp fp16 needs CUDA; --compile takes minutes on CPU (left out)"
    stages = [
        ("pretrain", pretrain("pretrain", "--epochs", "2", "--adv-start", "1"), "pretrain", None),
        ("pretrain-fp16-compile", pretrain("pretrain-fp16-compile", "--epochs", "2",
                                           "--adv-start", "1", *fast),
         "pretrain-fp16-compile", skip_fast),
        ("finetune", [py, "finetune.py", "--ckpt", os.path.join(runs, "pretrain", "ckpt.pt"),
                      "--epochs", "1", "--out", os.path.join(runs, "finetune"),
                      *(["--batch-size", "8", "--workers", "1"] if dry_run else [])],
         "finetune", None),
        ("evaluate", [py, "evaluate.py", "--ckpt", os.path.join(runs, "finetune", "ckpt.pt"),
                      "--occlusion", "--gen-ckpt", os.path.join(runs, "pretrain", "ckpt.pt"),
                      "--json", os.path.join(runs, "evaluate.json"),
                      *(["--clips", "2", "--batch-size", "8", "--workers", "1"]
                        if dry_run else [])],
         None, None),
    ]
    for method in ("moco", "cvrl", "vclr"):
        extra = ["--frames", "12"] if dry_run and method == "vclr" else []  # 3 tuples of 4
        stages.append((method, pretrain(method, "--method", method, "--epochs", "1", *extra),
                       method, None))
    return stages


def part_smoke(out, dry_run, data_root, timeout, deadline):
    results = {}
    for name, argv, folder, skipped in smoke_stages(out, dry_run, data_root):
        if skipped:  # the dry run's fp16 + compile stage runs what CPU can (--channels-last)
            print(f"  {name}: {skipped}")
        result = run_command(name, argv, out, timeout, deadline)
        result["skipped"] = skipped
        if folder and result["ok"]:
            problems, peak = check_run(os.path.join(out, "runs", folder))
            result["peak_gib"] = peak
            if problems:
                result["ok"] = False
                result["error"] = "; ".join(problems)
        if name == "evaluate" and result["ok"]:
            with open(os.path.join(out, "runs", "evaluate.json")) as f:
                evaluation = json.load(f)
            result["peak_gib"] = evaluation.get("cuda_peak_gib")
            numbers = [v for v in evaluation.values() if isinstance(v, float)]
            if not all(math.isfinite(v) for v in numbers):
                result["ok"] = False
                result["error"] = "a non-finite number in evaluate.json"
        print(f"  {name}: {'ok' if result['ok'] else 'FAILED: ' + result['error']} "
              f"({result['seconds']} s)")
        results[name] = result
    return results


def part_bench(name, out, flags, timeout, deadline):
    """bench.py with --json; returns the run's result with the measurements under "data" (those
    written before a failure or the deadline too: bench.py --step writes after every batch)."""
    path = os.path.join(out, f"{name}.json")
    result = run_command(name, [sys.executable, "bench.py", *flags, "--json", path], out,
                         timeout, deadline)
    if os.path.exists(path):
        with open(path) as f:
            result["data"] = next(iter(json.load(f).values()), None)
    print(f"  {name}: {'ok' if result['ok'] else 'FAILED: ' + result['error']} "
          f"({result['seconds']} s)")
    return result


def cost(step, loader):
    """Part 5: hours and loader cores from the measured rates. 1 GPU runs batch 128; 8 GPUs run
    16 each, at 8 x one GPU's rate at 16 (the gradient all-reduce and the key gathers are not in
    that rate: a lower bound on the hours)."""
    rates = {}  # (batch, phase) -> the best variant's clips/s
    for r in step["steps"]:
        key = (r["batch"], r["phase"])
        rates[key] = max(rates.get(key, 0), r["clips_per_s"])
    batches = sorted({b for b, _ in rates if (b, "moco") in rates and (b, "adversarial") in rates})
    if not batches:
        return None
    worker_s = loader["worker_s_per_sample"]
    repeat_key = next(k for k in worker_s if k.startswith("device, repeat"))
    rows = []
    for gpus, batch in ((1, batches[-1]), (8, batches[0])):
        moco = gpus * rates[batch, "moco"]
        adversarial = gpus * rates[batch, "adversarial"]
        for run, (videos, epochs) in RUNS.items():
            clips = videos * epochs
            seconds = (clips * (1 - ADVERSARIAL_SHARE) / moco
                       + clips * ADVERSARIAL_SHARE / adversarial)
            rate = clips / seconds  # clips/s averaged over the two phases
            rows.append({"run": run, "gpus": gpus, "per_gpu_batch": batch,
                         "hours": seconds / 3600, "clips_per_s": rate,
                         "loader_cores": rate * worker_s["device"],
                         "loader_cores_repeat": rate * worker_s[repeat_key]})
    return rows


def table(header, rows):
    """A Markdown table: the header's cells, then one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def optional(value, spec):
    return "-" if value is None else format(value, spec)


def write_report(out, report):
    lines = [f"# GPU report, {report['date']}", "",
             f"Device: {report['device']}; {report['cores']} CPU cores; torch {report['torch']}."
             + (" **Dry run on CPU at a tiny size: no number here is a GPU's.**"
                if report["dry_run"] else ""), ""]
    lines += ["## 1. Every stage", ""]
    rows = []
    for name, r in report["smoke"].items():
        result = "ok" if r["ok"] else f"FAILED: {r['error']}"
        if r.get("skipped"):
            result += f" ({r['skipped']})"
        rows.append([name, result, r["seconds"], optional(r.get("peak_gib"), ".2f")])
    lines += table(["stage", "result", "seconds", "peak GPU memory (GiB)"], rows)

    sections = {"step": "## 2. The step",
                "profile": "## 3. The ten costliest kernels of one adversarial step",
                "loader": "## 4. The loader"}
    for part, heading in sections.items():
        lines += ["", heading, ""]
        d = report[part].get("data")
        if d and part == "step":
            lines += [f"{d['arch']}, {d['frames']} x {d['crop']}, K {d['moco_k']}, on "
                      f"{d['device']}.", ""]
            lines += table(["batch", "variant", "step", "ms", "clips/s", "MFU", "peak GiB"], [
                [r["batch"], r["variant"], r["phase"], f"{r['ms']:.1f}",
                 f"{r['clips_per_s']:.1f}",
                 "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %",
                 optional(r["peak_gib"], ".1f")] for r in d["steps"]])
        elif d and part == "profile":
            lines += [f"Batch {d['batch']} on {d['device']}, by self {d['kind']} time.", ""]
            lines += table(["kernel", "calls", "self ms", "share"], [
                [r["name"][:80], r["calls"], f"{r['self_ms']:.2f}", f"{100 * r['share']:.1f} %"]
                for r in d["rows"]])
        elif d and part == "loader":
            lines += [f"{d['workers']} workers on {d['cores']} cores, {d['frames']} x "
                      f"{d['crop']}.", ""]
            worker = d["worker_s_per_sample"]
            lines += table(["pipeline", "samples/s", "worker ms per sample"], [
                [name, f"{rate:.1f}", "-" if name not in worker else f"{worker[name] * 1e3:.1f}"]
                for name, rate in d["samples_per_s"].items()])
        if not report[part]["ok"]:
            lines += ["", f"FAILED: {report[part]['error']}"]

    lines += ["", "## 5. What a pretraining costs", ""]
    if report["cost"]:
        lines += ["From the best variant's rates in 2, half the epochs MoCo and half adversarial; "
                  "8 GPUs at 8 x one GPU's rate at their per-GPU batch (no communication "
                  "counted: a lower bound).", ""]
        lines += table(["run", "GPUs", "per-GPU batch", "hours", "clips/s", "loader cores",
                        "loader cores, --repeat-sample 2"], [
            [r["run"], r["gpus"], r["per_gpu_batch"], f"{r['hours']:.1f}",
             f"{r['clips_per_s']:.1f}", f"{r['loader_cores']:.1f}",
             f"{r['loader_cores_repeat']:.1f}"] for r in report["cost"]])
    else:
        lines.append("not computed: it needs parts 2 and 4")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-report", help="the report's folder")
    p.add_argument("--dry-run", action="store_true",
                   help="on CPU at a tiny size: the plumbing, no GPU number")
    p.add_argument("--data-root", default=None,
                   help="the demo set's folder (default: where demo_data.py writes it)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per command at most")
    p.add_argument("--minutes", type=float, default=8,
                   help="the whole report's budget: a command still running then is ended")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("error: no CUDA device; run on a GPU node, or pass --dry-run")
    os.makedirs(args.out, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "cores": os.cpu_count(), "torch": torch.__version__}
    t0 = time.time()
    deadline = t0 + 60 * args.minutes
    print("1. every stage")
    report["smoke"] = part_smoke(args.out, args.dry_run, args.data_root, args.timeout, deadline)
    tiny = ["--frames", "8", "--crop", "32", "--repeats", "1"] if args.dry_run else []
    print("2. the step")
    report["step"] = part_bench("step", args.out, ["--step", *tiny, *(
        ["--batch", "2", "--moco-k", "256", "--variants", "eager,channels_last_3d"]
        if args.dry_run else ["--repeats", "2"])], 2 * args.timeout, deadline)
    if args.dry_run:
        print("  step: dry run: the compile variant left out (minutes on CPU)")
    print("3. the profile")
    report["profile"] = part_bench("profile", args.out, ["--profile", *tiny, *(
        ["--batch", "2", "--moco-k", "256"] if args.dry_run else [])], args.timeout, deadline)
    print("4. the loader")
    report["loader"] = part_bench("loader", args.out, [
        "--loader", "--workers", str(os.cpu_count()), *(
            ["--frames", "8", "--crop", "32", "--clips", "16", "--memory-iters", "20",
             "--videos", "4", "--video-cache", os.path.join(args.out, "cache")]
            if args.dry_run else ["--memory-iters", "200"])], args.timeout, deadline)
    have = all(report[part].get("data") for part in ("step", "loader"))
    report["cost"] = cost(report["step"]["data"], report["loader"]["data"]) if have else None
    report["seconds"] = round(time.time() - t0)
    write_report(args.out, report)
    failed = [name for name, r in report["smoke"].items() if not r["ok"]] + [
        name for name in ("step", "profile", "loader") if not report[name]["ok"]]
    print(f"report: {os.path.join(args.out, 'report.md')} ({report['seconds']} s)"
          + (f"; FAILED: {', '.join(failed)}" if failed else "; every part ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
