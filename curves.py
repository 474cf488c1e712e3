"""
The learning curves of a pretraining as one picture, from its log.jsonl: pretrain.py draws
OUT/curves.png at the end of every run; this draws it again from any run's log, for example one
made on a cluster node without matplotlib.

    python curves.py runs/demo/log.jsonl            # writes runs/demo/curves.png
    python curves.py runs/demo/log.jsonl --png c.png

Panels, per epoch (epoch 0 is the encoder at random init, before any step):
  - the training loss over its chance level (1 = a loss no better than equal logits);
  - the queue-free loss and top-1 over their chance levels;
  - the kNN top-1 on the test split against random init and chance;
  - the feature spread (a collapsing encoder's falls towards 0);
  - G's Eq 4 distance over that of random drops of as many frames (1 = G no stronger than chance);
  - where in the clip G's drops fall (the share at each frame position), per adversarial epoch;
  - the correlation of G's importance with each frame's motion (its mean absolute difference to
    its neighbours): what says whether G "removes temporally important frames" (Sec 1).
The plotting library is matplotlib, imported only here and only when drawing.
"""

import argparse
import json
import math
import os


class NotALog(ValueError):
    """A file that read_curves cannot draw: its message is one line."""


MISSING = ("curves.png not drawn: matplotlib is not installed (pip install -r requirements.txt, "
           "then python curves.py {log})")


def read_curves(log_path):
    """The per-epoch records ("curve": true) of a log.jsonl, merged by epoch: {epoch: fields}.
    A line that is not a JSON object (one half-written by a run that was stopped) is skipped; a
    file that is not a log raises NotALog."""
    epochs = {}
    try:
        with open(log_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (isinstance(record, dict) and record.get("curve")
                        and isinstance(record.get("epoch"), int)):
                    fields = {k: v for k, v in record.items() if v is not None and k != "curve"}
                    epochs.setdefault(record["epoch"], {}).update(fields)
    except (OSError, UnicodeDecodeError) as e:
        raise NotALog(f"{log_path} is not a readable log.jsonl ({type(e).__name__})") from None
    if not epochs:
        raise NotALog(f"{log_path} has no per-epoch record (\"curve\": true): not a "
                      "pretraining's log.jsonl, or one stopped before its first epoch")
    return dict(sorted(epochs.items()))


def series(epochs, key, over=None):
    """(epochs, values) where `key` (and `over`, its divisor) was logged."""
    xs = [e for e, r in epochs.items() if key in r and (over is None or r.get(over))]
    ys = [epochs[e][key] / (epochs[e][over] if over else 1) for e in xs]
    return xs, ys


def drop_columns(epochs, xs):
    """The drop shares of the epochs xs (sorted), one column per epoch from the first to the last,
    NaN (blank) in an epoch that measured none: the heat map's x axis is then the epochs'."""
    t = len(epochs[xs[0]]["drops"])
    return [epochs[e]["drops"] if e in xs else [math.nan] * t for e in range(xs[0], xs[-1] + 1)]


def draw(log_path, png_path):
    """curves.png from log.jsonl. Raises ImportError where matplotlib is missing, NotALog where
    the file is not a pretraining's log."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    epochs = read_curves(log_path)
    fig, axes = plt.subplots(2, 4, figsize=(18, 7), constrained_layout=True)
    axes = axes.ravel()
    ax = axes[0]
    ax.plot(*series(epochs, "loss", "chance"), marker=".", label="training loss")
    ax.axhline(1, color="gray", ls=":", label="chance")
    ax.set(title="training loss / chance", xlabel="epoch", ylabel="ratio")
    ax.legend()

    ax = axes[1]
    ax.plot(*series(epochs, "probe_loss", "probe_chance"), marker=".", label="loss / chance")
    ax.axhline(1, color="gray", ls=":", label="chance")
    ax.set(title="queue-free loss / chance", xlabel="epoch", ylabel="ratio")
    twin = ax.twinx()
    xs, top1 = series(epochs, "probe_top1")
    # the chance loss is log(candidates), so chance top-1 is exp(-chance loss)
    chance_top1 = [math.exp(-epochs[e]["probe_chance"]) for e in xs]
    twin.plot(xs, [t / c for t, c in zip(top1, chance_top1)], color="C1", marker=".",
              label="top-1 / chance (right)")
    twin.set_ylabel("top-1 / chance")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right", fontsize=8)

    ax = axes[2]
    xs, knn = series(epochs, "knn_top1")
    ax.plot(xs, knn, marker="o", label="kNN top-1")
    if xs and xs[0] == 0:
        ax.axhline(knn[0], color="C3", ls="--", label="random init")
    _, chance = series(epochs, "knn_chance")
    if chance:
        ax.axhline(chance[-1], color="gray", ls=":", label="chance")
    ax.set(title="kNN top-1 (test split)", xlabel="epoch", ylabel="top-1")
    ax.legend()

    ax = axes[3]
    ax.plot(*series(epochs, "spread"), marker=".")
    ax.set(title="feature spread", xlabel="epoch", ylabel="spread", ylim=(0, None))

    ax = axes[4]
    xs, ratio = series(epochs, "g_vs_random")
    ax.plot(xs, ratio, marker=".", label="G's drops / random drops")
    ax.axhline(1, color="gray", ls=":", label="as strong as chance")
    ax.set(title="Eq 4 distance, G / random", xlabel="epoch", ylabel="ratio")
    if not xs:
        ax.text(0.5, 0.5, "no adversarial epoch", ha="center", transform=ax.transAxes)
    ax.legend()

    # what G drops, per adversarial epoch: where in the clip, and whether it follows motion
    ax = axes[5]
    xs = [e for e, r in epochs.items() if "drops" in r]
    if xs:
        columns = drop_columns(epochs, xs)
        t = len(columns[0])
        image = ax.imshow(list(zip(*columns)), aspect="auto", origin="lower", cmap="magma",
                          extent=(xs[0] - 0.5, xs[-1] + 0.5, -0.5, t - 0.5), vmin=0)
        fig.colorbar(image, ax=ax, label="share of G's drops")
    else:
        ax.text(0.5, 0.5, "no adversarial epoch", ha="center", transform=ax.transAxes)
    ax.set(title="where G drops (frame position)", xlabel="epoch", ylabel="frame")

    ax = axes[6]
    xs, r = series(epochs, "motion_corr")
    ax.plot(xs, r, marker=".", label="r(importance, motion)")
    ax.axhline(0, color="gray", ls=":", label="no relation")
    ax.set(title="G's importance vs frame motion", xlabel="epoch", ylabel="Pearson r",
           ylim=(-1, 1))
    ax.legend()
    axes[7].axis("off")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(log_path))), fontsize=9)
    fig.savefig(png_path, dpi=72)
    plt.close(fig)
    return png_path


def draw_or_say(log_path, png_path, log=print):
    """pretrain.py's end of run: draws curves.png, or says in one line how to get it."""
    try:
        path = draw(log_path, png_path)
    except ImportError:
        log(MISSING.format(log=log_path))
        return None
    except NotALog as e:  # the run goes on to its end without the picture
        log(f"curves.png not drawn: {e}")
        return None
    log(f"learning curves: {path}")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="curves.png from a pretraining's log.jsonl")
    p.add_argument("log", help="a run's log.jsonl")
    p.add_argument("--png", default=None, help="default: curves.png beside the log")
    args = p.parse_args(argv)
    if not os.path.isfile(args.log):
        raise SystemExit(f"error: {args.log} is not a file")
    png = args.png or os.path.join(os.path.dirname(os.path.abspath(args.log)), "curves.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(png))):  # before drawing, not after
        raise SystemExit(f"error: the folder of {png} does not exist")
    try:
        draw(args.log, png)
    except ImportError:
        raise SystemExit(MISSING.format(log=args.log))
    except NotALog as e:
        raise SystemExit(f"error: {e}")
    print(png)


if __name__ == "__main__":
    main()
