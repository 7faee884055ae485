"""The benchmark's PNGs (matplotlib, Agg backend): throughput per shape and fraction of the ceiling.

One panel per dtype; on the x axis the shapes, one bar per implementation. An implementation without
a measurement on a shape (unsupported, unavailable, over budget, error) gets a short grey label instead
of a bar.
"""
import os

COLORS = {"moe_ext": "#d62728", "moe_ext_plain": "#e377c2", "moe_ext_torch": "#8c564b", "reference": "#7f7f7f",
          "torch_eager": "#1f77b4",
          "torch_grouped_mm": "#2ca02c", "dense": "#ff7f0e"}
MISSING = {"unsupported": "not yet", "unavailable": "n/a", "skipped": "budget", "error": "error"}
FILES = {"throughput": "throughput.png", "fraction": "ceiling_fraction.png"}


def _human(v):
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def write(doc, png_dir):
    """Write the PNGs into png_dir. Returns ([paths written], note or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return [], "matplotlib is not installed: no PNG written (pip install 'moe_ext[bench]')"
    os.makedirs(png_dir, exist_ok=True)
    results = doc["results"]
    dtypes = doc["settings"]["dtypes"]
    shapes = [s["name"] for s in doc["settings"]["shapes"]]
    decode = {s["name"]: s["decode"] for s in doc["settings"]["shapes"]}
    impls = doc["settings"]["impls"]
    info = doc["info"]
    subtitle = (f"moe_ext {info['version']}, isa {info['isa']}, {info['num_threads']} threads, "
                f"{doc['environment'].get('processor') or ''}; p50 of {doc['settings']['repeats']} runs")
    written = []

    def scale(ax, values, percent, line_at_one=False):
        """Log scale when the values span more than 20x (then major ticks only), else linear from 0."""
        fmt = (lambda v, _: f"{100 * v:g}%") if percent else (lambda v, _: _human(v))
        if values and max(values) / min(values) > 20:
            ax.set_yscale("log")
            top = max(values) * (1.5 if not line_at_one else 1)
            ax.set_ylim(min(values) / 3, max(top, 1.5) if line_at_one else top * 2)
            ax.yaxis.set_minor_formatter(NullFormatter())
        elif values:
            ax.set_ylim(0, max(max(values) * 1.15, 1.05 if line_at_one else 0))
        ax.yaxis.set_major_formatter(FuncFormatter(fmt))
        if line_at_one and values:
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")

    def panel_axes(title, top=1.1):
        # Fixed margins in inches (tight_layout costs seconds): title and legend on top, two-line tick
        # labels and the subtitle at the bottom.
        width, panel, bottom, gap = max(7.5, 1.6 * len(shapes) + 3), 3.0, 0.75, top - 0.1
        height = top + bottom + len(dtypes) * panel + (len(dtypes) - 1) * gap
        fig, axes = plt.subplots(len(dtypes), 1, figsize=(width, height), squeeze=False)
        fig.subplots_adjust(left=1.0 / width, right=1 - 0.2 / width, top=1 - top / height,
                            bottom=bottom / height, hspace=gap / panel)
        fig.suptitle(title, fontsize=12, y=1 - 0.12 / height)
        fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize=7, color="#555555")
        return fig, [a[0] for a in axes], 1 - 0.42 / height

    def bars(ax, dt, value_of, label_of_shape):
        width = 0.8 / max(len(impls), 1)
        by_key = {(r["shape"], r["impl"]): r for r in results if r["dtype"] == dt}
        values = []
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                r = by_key.get((shape, impl))
                x = j - 0.4 + width * (i + 0.5)
                v = value_of(r) if r is not None and r["status"] == "ok" else None
                if v is None or v <= 0:
                    tag = MISSING.get(r["status"], "n/a") if r is not None and r["status"] != "ok" else "n/a"
                    ax.text(x, 0.02, tag, rotation=90, ha="center", va="bottom", fontsize=7,
                            color="#777777", transform=ax.get_xaxis_transform())
                    continue
                xs.append(x)
                ys.append(v)
            values += ys
            ax.bar(xs, ys, width * 0.92, label=impl, color=COLORS.get(impl))
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([label_of_shape(s) for s in shapes], fontsize=8)
        ax.set_xlim(-0.5, len(shapes) - 0.5)
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.set_axisbelow(True)
        return values

    def legend(fig, axes, y):
        handles, labels = axes[0].get_legend_handles_labels()
        for ax in axes[1:]:  # an implementation may have bars in a later panel only
            for h, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(h)
                    labels.append(label)
        order = sorted(range(len(labels)), key=lambda i: impls.index(labels[i]))
        fig.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, ncol=len(impls),
                   loc="upper center", bbox_to_anchor=(0.5, y), frameon=False)

    # 1. tokens/s per shape per implementation
    fig, axes, legend_y = panel_axes("MoE forward throughput per shape (tokens/s, higher is better)")
    for ax, dt in zip(axes, dtypes):
        values = bars(ax, dt, lambda r: r.get("tokens_per_s"), lambda s: s)
        ax.set_title(dt, fontsize=10, loc="left")
        ax.set_ylabel("tokens/s")
        scale(ax, values, percent=False)
    legend(fig, axes, legend_y)
    path = os.path.join(png_dir, FILES["throughput"])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    # 2. fraction of this run's ceiling (compute, or bandwidth for decode shapes)
    fig, axes, legend_y = panel_axes("Fraction of this machine's ceiling measured in the same run", top=1.35)
    for ax, dt in zip(axes, dtypes):
        c = doc["ceilings"].get(dt, {})
        values = bars(ax, dt, lambda r: r.get("fraction_of_ceiling"),
                      lambda s: f"{s}\n({'bandwidth' if decode[s] else 'compute'})")
        peak_c, peak_b = c.get("compute_gflop_per_s"), c.get("bandwidth_gb_per_s")
        ax.set_title(f"{dt}: compute ceiling {peak_c or 0:.1f} GFLOP/s ({c.get('compute_by')}),\n"
                     f"bandwidth ceiling {peak_b or 0:.1f} GB/s ({c.get('bandwidth_by')})",
                     fontsize=8.5, loc="left")
        ax.set_ylabel("fraction of ceiling")
        scale(ax, values, percent=True, line_at_one=True)
    legend(fig, axes, legend_y)
    path = os.path.join(png_dir, FILES["fraction"])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written, None
