#!/usr/bin/env python3
"""Turn herald-bench JSON reports into markdown tables and SVG charts (standard library only).

    results.py compare  DIR   # DIR/raw/<setup>__<workload>__<server>__r<k>.json -> DIR/results.md, summary.json
    results.py capacity DIR   # DIR/raw/<server>__<n>.json -> DIR/results.md, *.svg, summary.json
"""
import json
import math
import os
import statistics
import sys
from collections import defaultdict


def load(dirname):
    out = []
    raw = os.path.join(dirname, "raw")
    for name in sorted(os.listdir(raw)):
        if name.endswith(".json"):
            try:
                with open(os.path.join(raw, name)) as f:
                    out.append((name[:-5].split("__"), json.load(f)))
            except (OSError, ValueError) as e:
                print(f"skipping {name}: {e}", file=sys.stderr)
    return out


def get(rep, path):
    cur = rep
    for p in path.split("."):
        if cur is None:
            return None
        cur = cur.get(p) if isinstance(cur, dict) else None
    return cur


# (column title, json path, format, lower is better)
METRICS = [
    ("server CPU µs/delivery", "publish.server_cpu_us_per_delivery", "{:.2f}"),
    ("deliveries/s", "publish.deliveries_per_s", "{:,.0f}"),
    ("latency p50 µs", "publish.latency_us.p50", "{:,.0f}"),
    ("latency p99 µs", "publish.latency_us.p99", "{:,.0f}"),
    ("fan-out p99 µs", "publish.fanout_completion_us.p99", "{:,.0f}"),
    ("RSS B/conn", "memory.server_rss_per_conn_bytes", "{:,.0f}"),
    ("loadgen CPU µs/delivery", "publish.loadgen_cpu_us_per_delivery", "{:.2f}"),
]
IDLE = [
    ("RSS B/conn", "memory.server_rss_per_conn_bytes", "{:,.0f}"),
    ("kernel slab B/conn (both ends)", "memory.kernel_slab_per_conn_bytes", "{:,.0f}"),
    ("tcp_mem B/conn (both ends)", "memory.tcp_mem_per_conn_bytes", "{:,.0f}"),
]


def stat(values, fmt):
    vals = [v for v in values if isinstance(v, (int, float))]
    if not vals:
        return None, "–"
    med = statistics.median(vals)
    if len(vals) == 1:
        return med, fmt.format(med)
    return med, f"{fmt.format(med)} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"


def flags(reps):
    bad = []
    for r in reps:
        if not r.get("valid", False):
            bad.append("INVALID: " + "; ".join(r.get("invalid_reasons", [])))
        p = r.get("publish") or {}
        if p and not p.get("complete", True):
            bad.append("incomplete")
        if p.get("missing") or p.get("duplicates") or p.get("out_of_order"):
            bad.append(f"loss/order m{p.get('missing')} d{p.get('duplicates')} o{p.get('out_of_order')}")
        c = r.get("connect", {})
        if c.get("connected", 0) < c.get("requested", 0):
            bad.append(f"connected {c.get('connected')}/{c.get('requested')}")
    return sorted(set(bad))


def compare(dirname):
    runs = load(dirname)
    groups = defaultdict(list)
    servers, setups, workloads = [], [], []
    for key, rep in runs:
        if len(key) < 4:
            continue
        setup, workload, server = key[0], key[1], key[2]
        groups[(setup, workload, server)].append(rep)
        for lst, v in ((setups, setup), (workloads, workload), (servers, server)):
            if v not in lst:
                lst.append(v)
    lines = ["# herald comparison", ""]
    env = os.path.join(dirname, "env.md")
    summary = {}
    for setup in setups:
        lines += [f"## set-up: {setup}", ""]
        for wl in [w for w in workloads if w != "idle"]:
            lines += [f"### workload: {wl}", ""]
            lines.append("| server | runs | " + " | ".join(m[0] for m in METRICS) + " | notes |")
            lines.append("|---|---|" + "---|" * len(METRICS) + "---|")
            meds = {}
            for srv in servers:
                reps = groups.get((setup, wl, srv), [])
                if not reps:
                    continue
                cells = []
                for title, path, fmt in METRICS:
                    med, txt = stat([get(r, path) for r in reps], fmt)
                    meds.setdefault(srv, {})[title] = med
                    cells.append(txt)
                lines.append(f"| {srv} | {len(reps)} | " + " | ".join(cells) + " | " + "; ".join(flags(reps)) + " |")
            summary[f"{setup}/{wl}"] = meds
            lines += ["", ratio_table(meds, servers), ""]
        # Idle memory: every run samples it after connecting, before publishing.
        lines += ["### workload: idle memory (sampled in every run after connect + settle)", ""]
        lines.append("| server | samples | " + " | ".join(m[0] for m in IDLE) + " |")
        lines.append("|---|---|" + "---|" * len(IDLE))
        for srv in servers:
            reps = [r for (s, w, v), rs in groups.items() if s == setup and v == srv for r in rs]
            if not reps:
                continue
            cells = [stat([get(r, p) for r in reps], f)[1] for _, p, f in IDLE]
            lines.append(f"| {srv} | {len(reps)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Cells: median (min–max) over rounds. Ratios: herald ÷ other (below 1 = herald uses less / is faster;",
              "for deliveries/s above 1 = herald delivers more). Kernel memory is a system-wide delta, so both",
              "ends of every loopback connection are counted.", ""]
    if os.path.exists(env):
        lines += ["## machine", "", open(env).read()]
    with open(os.path.join(dirname, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(dirname, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n".join(lines))


def ratio_table(meds, servers):
    heralds = [s for s in servers if s.startswith("herald") and s in meds]
    others = [s for s in servers if s in meds]
    if not heralds:
        return ""
    keys = ["server CPU µs/delivery", "deliveries/s", "latency p99 µs", "fan-out p99 µs", "RSS B/conn"]
    out = ["| ratio | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for h in heralds:
        for o in others:
            if o == h:
                continue
            cells = []
            for k in keys:
                a, b = meds[h].get(k), meds[o].get(k)
                cells.append(f"{a / b:.2f}×" if a is not None and b else "–")
            out.append(f"| {h} ÷ {o} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def svg_chart(title, ylabel, series, path, logx=True):
    """series: {name: [(x, y), ...]} -> a line chart."""
    w, h, ml, mr, mt, mb = 720, 420, 80, 160, 40, 60
    pts = [p for s in series.values() for p in s if p[1] is not None]
    if not pts:
        return
    fx = (lambda x: math.log10(x)) if logx else (lambda x: x)
    xs = [fx(p[0]) for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y1 = max(p[1] for p in pts) * 1.1 or 1
    sx = lambda x: ml + (fx(x) - x0) / (x1 - x0) * (w - ml - mr)
    sy = lambda y: h - mb - y / y1 * (h - mt - mb)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
         f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="black"/>',
         f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="black"/>',
         f'<text x="{(w - mr + ml) / 2}" y="{h - 15}" text-anchor="middle">subscribers{" (log scale)" if logx else ""}</text>',
         f'<text x="18" y="{(h - mb + mt) / 2}" transform="rotate(-90 18 {(h - mb + mt) / 2})" text-anchor="middle">{ylabel}</text>']
    for i in range(6):
        y = y1 * i / 5
        o.append(f'<line x1="{ml - 4}" y1="{sy(y):.1f}" x2="{w - mr}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        o.append(f'<text x="{ml - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:,.0f}</text>')
    for x in sorted({p[0] for p in pts}):
        o.append(f'<text x="{sx(x):.1f}" y="{h - mb + 18}" text-anchor="middle">{x:,}</text>')
    for i, (name, s) in enumerate(series.items()):
        c = colors[i % len(colors)]
        s = sorted(p for p in s if p[1] is not None)
        if not s:
            continue
        o.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="' +
                 " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s) + '"/>')
        for x, y in s:
            o.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>')
        o.append(f'<rect x="{w - mr + 15}" y="{mt + 20 * i}" width="12" height="12" fill="{c}"/>')
        o.append(f'<text x="{w - mr + 32}" y="{mt + 20 * i + 11}">{name}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def capacity(dirname):
    runs = load(dirname)
    by = defaultdict(dict)
    for key, rep in runs:
        if len(key) >= 2 and key[1].isdigit():
            by[key[0]][int(key[1])] = rep
    stops = {}
    sp = os.path.join(dirname, "stops.json")
    if os.path.exists(sp):
        stops = json.load(open(sp))
    lines = ["# herald capacity", "",
             "| server | subscribers | connected | connect/s | RSS B/conn | kernel slab B/conn (both ends) | tcp_mem B/conn | fan-out p99 µs | latency p99 µs | server CPU µs/delivery | hold: keep-alives / dropped / CPU % | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mem, fan, kern = {}, {}, {}
    for srv in sorted(by):
        for n in sorted(by[srv]):
            r = by[srv][n]
            c, m, p, hd = r["connect"], r["memory"], r.get("publish") or {}, r.get("hold") or {}
            hold = f"{hd.get('keepalives', '–')} / {hd.get('streams_dropped', '–')} / {hd.get('server_cpu_pct', 0):.2f}" if hd else "–"
            fails = ", ".join(f"{k} {v}" for k, v in c.get("failed", {}).items())
            notes = "; ".join(flags([r]) + ([f"failures: {fails}"] if fails else []))
            fp = get(r, "publish.fanout_completion_us.p99")
            lines.append(f"| {srv} | {n:,} | {c['connected']:,} | {c['per_second']:,.0f} | {m['server_rss_per_conn_bytes']:,.0f} | "
                         f"{m['kernel_slab_per_conn_bytes']:,.0f} | {m['tcp_mem_per_conn_bytes']:,.0f} | "
                         f"{fp if fp is None else f'{fp:,.0f}'} | {get(r, 'publish.latency_us.p99') or 0:,.0f} | "
                         f"{get(r, 'publish.server_cpu_us_per_delivery') or 0:.2f} | {hold} | {notes} |")
            if c["connected"] > 0:
                mem.setdefault(srv, []).append((c["connected"], m["server_rss_per_conn_bytes"]))
                kern.setdefault(srv, []).append((c["connected"], m["kernel_slab_per_conn_bytes"]))
                if fp is not None:
                    fan.setdefault(srv, []).append((c["connected"], fp / 1000))
    lines += ["", "## where each server stopped", ""]
    for srv, why in stops.items():
        lines.append(f"- **{srv}**: {why}")
    lines += ["", "![memory per connection](memory-per-conn.svg)", "", "![fan-out p99](fanout-p99.svg)", "",
              "Kernel memory is a system-wide delta: on loopback both ends of each connection are counted.", ""]
    svg_chart("Server RSS per connection", "bytes per connection", mem, os.path.join(dirname, "memory-per-conn.svg"))
    svg_chart("Kernel slab per connection (both ends)", "bytes per connection", kern, os.path.join(dirname, "kernel-per-conn.svg"))
    svg_chart("Fan-out completion p99 (publish → last subscriber)", "ms", fan, os.path.join(dirname, "fanout-p99.svg"))
    env = os.path.join(dirname, "env.md")
    if os.path.exists(env):
        lines += ["## machine", "", open(env).read()]
    with open(os.path.join(dirname, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("compare", "capacity"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    {"compare": compare, "capacity": capacity}[sys.argv[1]](sys.argv[2])
