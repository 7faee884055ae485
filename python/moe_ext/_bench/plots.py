"""The benchmark's PNGs (matplotlib, Agg backend): throughput per shape and fraction of the ceiling.

One panel per dtype; on the x axis the shapes, one bar per implementation. An implementation without
a measurement on a shape (unsupported, unavailable, over budget, error) gets a short grey label instead
of a bar.
"""
import os

COLORS = {"moe_ext": "#d62728", "reference": "#7f7f7f", "torch_eager": "#1f77b4",
          "torch_grouped_mm": "#2ca02c", "dense": "#ff7f0e"}
MISSING = {"unsupported": "not yet", "unavailable": "n/a", "skipped": "budget", "error": "error"}
FILES = {"throughput": "throughput.png", "fraction": "ceiling_fraction.png"}


def write(doc, png_dir):
    """Write the PNGs into png_dir. Returns ([paths written], note or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
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

    def panel_axes(title):
        fig, axes = plt.subplots(len(dtypes), 1, figsize=(max(7.0, 1.6 * len(shapes) + 3), 3.8 * len(dtypes)),
                                 squeeze=False)
        fig.suptitle(title, fontsize=12)
        fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize=7, color="#555555")
        return fig, [a[0] for a in axes]

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

    # 1. tokens/s per shape per implementation
    fig, axes = panel_axes("MoE forward throughput per shape (tokens/s, higher is better)")
    for ax, dt in zip(axes, dtypes):
        values = bars(ax, dt, lambda r: r.get("tokens_per_s"), lambda s: s)
        ax.set_title(dt, fontsize=10, loc="left")
        ax.set_ylabel("tokens/s")
        if values:
            ax.set_yscale("log")
            ax.set_ylim(min(values) / 3, max(values) * 3)
    axes[0].legend(fontsize=8, ncol=len(impls), loc="upper center", bbox_to_anchor=(0.5, 1.2),
                   frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path = os.path.join(png_dir, FILES["throughput"])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    # 2. fraction of this run's ceiling (compute, or bandwidth for decode shapes)
    fig, axes = panel_axes("Fraction of this machine's ceiling measured in the same run")
    for ax, dt in zip(axes, dtypes):
        c = doc["ceilings"].get(dt, {})
        values = bars(ax, dt, lambda r: r.get("fraction_of_ceiling"),
                      lambda s: f"{s}\n({'bandwidth' if decode[s] else 'compute'})")
        peak_c, peak_b = c.get("compute_gflop_per_s"), c.get("bandwidth_gb_per_s")
        ax.set_title(f"{dt}: compute ceiling {peak_c or 0:.1f} GFLOP/s ({c.get('compute_by')}), "
                     f"bandwidth ceiling {peak_b or 0:.1f} GB/s ({c.get('bandwidth_by')})",
                     fontsize=9, loc="left")
        ax.set_ylabel("fraction of ceiling")
        if values:
            ax.set_yscale("log")
            ax.set_ylim(min(min(values) / 3, 0.5), max(1.5, max(values) * 1.5))
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    axes[0].legend(fontsize=8, ncol=len(impls), loc="upper center", bbox_to_anchor=(0.5, 1.22),
                   frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path = os.path.join(png_dir, FILES["fraction"])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written, None
