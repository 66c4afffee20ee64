"""Markdown tables from ``resnet-fused bench --json`` records, for the README.

    python bench/records_to_markdown.py bench-results/default.json [more.json ...]
"""
import json
import sys


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def tables(records):
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in records):
        rs = [r for r in records if r["mode"] == mode]
        r0, train = rs[0], mode == "train"
        lines.append(f"{r0['model']} {'train step' if train else 'eval forward'}, batch "
                     f"{r0['batch']}, {r0['size']}x{r0['size']}, float32, {r0['device']}, "
                     f"{r0['threads']} threads, median of {r0['rounds']} interleaved rounds "
                     f"(+{r0['warmup']} warm-up):\n")
        header = ["variant", "images/s", "ms (± IQR)", "speedup", "headroom", "rel_err out"]
        header += ["rel_err grad (max)", "saved for bwd"] if train else []
        header += ["backend"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|")
        for r in rs:
            ref = r["variant"] == "torchvision"
            cells = [r["variant"], f"{r['images_per_s']:,.1f}",
                     f"{r['median_s'] * 1e3:,.1f} ± {r['iqr_s'] * 1e3:,.1f}",
                     f"{r['speedup']:.2f}x", _fmt(r["headroom"], ".0%"),
                     "—" if ref else _fmt(r["rel_err"], ".1e")]
            if train:
                cells += ["—" if ref else _fmt(r["grad_rel_err"], ".1e"),
                          "—" if r["saved_bytes"] is None else f"{r['saved_bytes'] / 2**20:,.1f} MiB"]
            cells.append(r["backend"])
            lines.append("| " + " | ".join(cells) + " |")
        compiled = [r for r in rs if r.get("compile_s")]
        if compiled:
            lines.append(f"\n{compiled[0]['variant']}: the first (compiling) call took "
                         f"{compiled[0]['compile_s']:.0f} s, excluded.")
        lines.append("")
    m = records[0]["machine"]
    load = "" if m.get("load_avg_1m") is None else f", load {m['load_avg_1m']:.1f}"
    lines.append(f"machine: {m['cpu']} ({m['cores']} cores, {m['cpu_capability']}{load}), "
                 f"{m['threads']} threads, torch {m['torch']}, torchvision {m['torchvision']}, "
                 f"triton {m['triton'] or 'not installed'}, {m['date']}\n")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(tables(json.load(f)))
