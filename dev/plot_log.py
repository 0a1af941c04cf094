#!/usr/bin/env python
"""Render the loss curves of a train_gpt2.py JSONL log to a PNG.

  python dev/plot_log.py OUT_DIR/log.jsonl [-o loss.png] [--title TEXT]

The log has one JSON object per line: {"type": "train", "step", "loss", "norm", "lr",
...} for every optimizer step and {"type": "val", "step", "loss", "perplexity"} for every
evaluation. A log holds one run (train_gpt2.py refuses a new run into a folder with
another run's log; --resume trims what was logged after its checkpoint and appends);
should a step still appear twice, the last record of it wins. The top panel shows the
train loss (a thin line, with a moving average once there are enough steps) and the val
loss (markers joined by a line) against the step; the bottom panel the learning rate. A
log with {"type": "hellaswag", "step", "correct", "total", "accuracy"} records (--hellaswag)
gets a panel beside the loss with the HellaSwag accuracy.

Errors (a missing, empty or unreadable log, a line that is not a JSON object, no train
or val records) are one line "error: ..." on stderr and exit code 1. The one exception is
an incomplete last line (no newline: a run killed while appending), which is skipped with
a warning so that the log of a killed run still plots.
"""

import argparse
import json
import math
import os
import sys


class LogError(Exception):
    pass


def read_log(path):
    """{'train': [(step, loss, lr)], 'val': [(step, loss)], 'hellaswag': [(step,
    accuracy)]}, sorted by step, the last record of a step winning."""
    if not os.path.exists(path):
        raise LogError(f"log not found: {path}")
    if os.path.isdir(path):
        raise LogError(f"{path} is a directory; pass the log.jsonl file inside it")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        lines = text.splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LogError(f"cannot read {path}: {e}")
    train, val, hellaswag = {}, {}, {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            if number == len(lines) and not text.endswith("\n"):
                # a run killed while appending leaves a partial last line: plot the rest
                print(f"warning: {path}:{number}: ignoring the incomplete last line", file=sys.stderr)
                continue
            raise LogError(f"{path}:{number}: not valid JSON ({e.msg}); is this a train_gpt2.py log.jsonl?")
        if not isinstance(record, dict):
            raise LogError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        kind = record.get("type")
        if kind == "hellaswag":
            try:
                hellaswag[int(record["step"])] = (int(record["step"]), float(record["accuracy"]))
            except (KeyError, TypeError, ValueError) as e:
                raise LogError(f"{path}:{number}: hellaswag record without a numeric step/accuracy ({e!r})")
            continue
        if kind not in ("train", "val"):
            continue  # other record types may be added later
        try:
            step = int(record["step"])
            loss = float(record["loss"])
            lr = float(record["lr"]) if kind == "train" else None
        except (KeyError, TypeError, ValueError) as e:
            fields = "step/loss/lr" if kind == "train" else "step/loss"
            raise LogError(f"{path}:{number}: {kind} record without a numeric {fields} ({e!r})")
        if kind == "train":
            train[step] = (step, loss, lr)
        else:
            val[step] = (step, loss)
    if not lines or not any(line.strip() for line in lines):
        raise LogError(f"{path} is empty: no steps logged yet")
    if not train and not val:
        raise LogError(f"{path}: no train or val records")
    return {"train": [train[s] for s in sorted(train)], "val": [val[s] for s in sorted(val)],
            "hellaswag": [hellaswag[s] for s in sorted(hellaswag)]}


def moving_average(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(log, out_path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val, hellaswag = log["train"], log["val"], log.get("hellaswag", [])
    if hellaswag:
        fig, axes = plt.subplots(2, 2, figsize=(14, 6.5), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1], "width_ratios": [3, 2]})
        (ax_loss, ax_hs), (ax_lr, ax_empty) = axes
        ax_empty.axis("off")
        ax_hs.plot([s for s, _ in hellaswag], [100 * a for _, a in hellaswag], color="tab:purple", marker="o",
                   markersize=4, linewidth=1.5)
        last_step, last_accuracy = hellaswag[-1]
        ax_hs.annotate(f"{100 * last_accuracy:.1f}%", (last_step, 100 * last_accuracy), textcoords="offset points",
                       xytext=(-6, -14), ha="right", color="tab:purple", fontsize=9)
        ax_hs.set_title("HellaSwag accuracy (%)")
        ax_hs.grid(True, alpha=0.3)
        ax_hs.tick_params(labelbottom=True)
        ax_hs.set_xlabel("step")
    else:
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 1]})
    if train:
        steps = [s for s, _, _ in train]
        losses = [l for _, l, _ in train]
        finite = [(s, l) for s, l in zip(steps, losses) if math.isfinite(l)]
        window = max(1, len(finite) // 25)
        if window > 1:
            ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
            ax_loss.plot([s for s, _ in finite], moving_average([l for _, l in finite], window), color="tab:blue",
                         linewidth=1.8, label=f"train loss ({window}-step average)")
        else:
            ax_loss.plot(steps, losses, color="tab:blue", linewidth=1.5, marker="." if len(steps) < 50 else None,
                         label="train loss")
        ax_lr.plot(steps, [lr for _, _, lr in train], color="tab:green", linewidth=1.5)
    else:
        ax_lr.text(0.5, 0.5, "no train steps logged", ha="center", va="center", transform=ax_lr.transAxes)
    if val:
        ax_loss.plot([s for s, _ in val], [l for _, l in val], color="tab:orange", marker="o", markersize=5,
                     linewidth=1.5, label="val loss")
        last_step, last_loss = val[-1]
        ax_loss.annotate(f"{last_loss:.3f}", (last_step, last_loss), textcoords="offset points", xytext=(6, 6),
                         color="tab:orange", fontsize=9)
    if train:
        final = train[-1]
        ax_loss.annotate(f"{final[1]:.3f}", (final[0], final[1]), textcoords="offset points", xytext=(6, -12),
                         color="tab:blue", fontsize=9)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title(title)
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(loc="upper right")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(True, alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{out_path}.tmp.{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot train/val loss and the learning rate of a train_gpt2.py log.jsonl.")
    p.add_argument("log", help="log.jsonl written by train_gpt2.py -o DIR")
    p.add_argument("-o", "--output", default=None, help="PNG to write (default: loss.png beside the log)")
    p.add_argument("--title", default=None, help="plot title (default: the log's path)")
    args = p.parse_args(argv)
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.log)), "loss.png")
    try:
        log = read_log(args.log)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise LogError("matplotlib is not installed (pip install matplotlib, or `make install`)")
        plot(log, out, args.title or args.log)
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    train, val = log["train"], log["val"]
    summary = f"{len(train)} train steps" + (f" (final loss {train[-1][1]:.4f})" if train else "")
    summary += f", {len(val)} val points" + (f" (final val loss {val[-1][1]:.4f})" if val else "")
    hellaswag = log["hellaswag"]
    summary += f", {len(hellaswag)} HellaSwag points (final {100 * hellaswag[-1][1]:.1f}%)" if hellaswag else ""
    print(f"wrote {out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
