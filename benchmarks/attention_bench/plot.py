"""The PNG plot: speed-up against length per phase and pair, and peak memory against length.

One panel per (length-sweep group, phase, pair) that has data, with the target of that pair and
phase (from the groups' RatioTargets) as a red guide; then ATen peak memory of the timed
training steps (first dtype / head dim / causal combination) and of the batch-1 memory scan.
Needs matplotlib; without it `make_plot` returns the reason and the run goes on.
"""

import math
import os
from typing import Any, Dict, List, Optional, Tuple

from . import MIB
from .targets import memory_scan_series, plot_targets
from .workloads import GROUPS, LABELS, PHASE_NAMES, SHORT


def make_plot(data: Dict[str, Any], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); no plot"

    panels: List[Tuple[str, str, str, str]] = []  # (group, phase, pair label, title)
    for phase in ("fwdbwd", "fwd", "bwd", "infer"):
        for _, _, label in GROUPS["layer"].pairs:
            panels.append(("layer", phase, label, f"layer {PHASE_NAMES[phase]}\nvs nn {label}"))
    for phase in ("fwdbwd", "fwd", "bwd"):
        for _, _, label in GROUPS["core"].pairs:
            panels.append(("core", phase, label, f"core {PHASE_NAMES[phase]}\nvs {label}"))
    for spec in GROUPS.values():  # the other length-sweep groups (layer_autocast)
        if spec.sweep and spec.name not in ("layer", "core"):
            for phase in ("fwdbwd", "fwd", "bwd", "infer"):
                for anchor, _, label in spec.pairs:
                    title = f"{spec.name} {PHASE_NAMES[phase]}\nvs {LABELS[anchor]}"
                    panels.append((spec.name, phase, label, title))
    targets = plot_targets(GROUPS.values())
    mem_series = [
        (spec.name, contender)
        for spec in GROUPS.values()
        if spec.scan is not None
        for contender in spec.contenders
    ]
    panels = [
        p
        for p in panels
        if any(
            c["group"] == p[0] and p[2] in c["speedups"] and p[1] in c["speedups"][p[2]]
            for c in data["cases"]
        )
    ]
    if not panels and not data["memory_scan_keys"]:
        return "no length-sweep group and no memory scan in this run: no plot"
    n_panels = len(panels) + 2
    cols = 4
    rows = max(1, math.ceil(n_panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    flat = list(axes.flat)
    combos = sorted(
        {
            (c["dtype"], c["head_dim"], c["causal"], c["threads"])
            for c in data["cases"]
            if GROUPS[c["group"]].sweep  # the fixed-shape groups have no panel
        }
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
    dd = sorted({(d, h) for d, h, _, _ in combos})
    for combo in combos:
        dtype, hd, causal, threads = combo
        style[combo] = dict(
            color=colors[dd.index((dtype, hd)) % len(colors)],
            linestyle="--" if causal else "-",
            marker="o" if threads == max(t for *_, t in combos) else "s",
            label=f"{dtype} D={hd}{' causal' if causal else ''} {threads}t",
        )
    handles = {}
    for ax, (group, phase, label, title) in zip(flat, panels):
        for combo in combos:
            pts = sorted(
                (c["length"], c["speedups"][label][phase])
                for c in data["cases"]
                if c["group"] == group
                and (c["dtype"], c["head_dim"], c["causal"], c["threads"]) == combo
                and label in c["speedups"]
                and phase in c["speedups"][label]
            )
            if pts:
                (line,) = ax.plot(*zip(*pts), **style[combo])
                handles[style[combo]["label"]] = line
        ax.axhline(1.0, color="black", linewidth=0.8)
        target = targets.get((group, phase, label))
        if target is not None:
            handles["issue #5 target"] = ax.axhline(
                target, color="red", linestyle=":", linewidth=1.2, label="issue #5 target"
            )
        _length_axis(ax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("length")
        ax.set_ylabel("speed-up (anchor / torch_mha)")
        ax.grid(True, alpha=0.3)

    # Memory panels.
    mem_axes = flat[len(panels) : len(panels) + 2]
    scan_keys = set(data["memory_scan_keys"])
    timed_mem = [
        m
        for m in data["memory"]
        if m["workload_key"] not in scan_keys and m["mode"] == "train" and "aten_peak_bytes" in m
    ]
    if combos:
        first = combos[0]
        ax = mem_axes[0]
        for i, (group, contender) in enumerate(mem_series):
            pts = sorted(
                (m["workload"]["length"], m["aten_peak_bytes"] / MIB)
                for m in timed_mem
                if m["workload"]["group"] == group
                and m["contender"] == contender
                and (
                    m["workload"]["dtype"],
                    m["workload"]["embed"] // m["workload"]["heads"],
                    m["workload"]["causal"],
                )
                == first[:3]
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    color=colors[i % len(colors)],
                    label=f"{group} {SHORT[contender]}",
                )
        ax.set_title(
            f"ATen peak, training step, {first[0]} D={first[1]}"
            f"{' causal' if first[2] else ''}\nbatch x length = {data['config'].get('tokens')}",
            fontsize=9,
        )
        _memory_axes(ax)
    ax = mem_axes[1]
    for i, (group, contender) in enumerate(mem_series):
        rows_ = memory_scan_series(data, group, contender)
        if rows_:
            ax.plot(
                [r["workload"]["length"] for r in rows_],
                [r["aten_peak_bytes"] / MIB for r in rows_],
                marker="o",
                color=colors[i % len(colors)],
                label=f"{group} {SHORT[contender]}",
            )
    ax.set_title("ATen peak, training step, batch 1 (memory scan)\nfloat32 D=64", fontsize=9)
    _memory_axes(ax)
    for ax in flat[len(panels) + 2 :]:
        ax.axis("off")
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles.keys()),
            loc="lower center",
            ncol=min(4, len(handles)),
            fontsize=8,
            bbox_to_anchor=(0.5, 0.0),
        )
    fig.suptitle(
        f"torch_mha vs anchors ({data['metadata']['date_utc']}, torch "
        f"{data['metadata']['torch_version']}, {data['metadata']['cpu_model']})",
        fontsize=11,
    )
    legend_rows = math.ceil(len(handles) / 4) if handles else 0
    fig.tight_layout(rect=(0, 0.03 * legend_rows + 0.01, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None


def _length_axis(ax: Any) -> None:
    """log2 length axis, ticks at the plotted lengths."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    lengths = sorted(
        {
            int(x)
            for line in ax.get_lines()
            if line.get_marker() not in (None, "None", "")  # data, not the axhline guides
            for x in line.get_xdata()
        }
    )
    if lengths:
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v))}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.tick_params(axis="x", labelsize=7)


def _memory_axes(ax: Any) -> None:
    _length_axis(ax)
    ax.set_yscale("log")
    ax.set_xlabel("length")
    ax.set_ylabel("MiB")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
