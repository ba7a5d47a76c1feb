#!/usr/bin/env python3
"""scripts/auth-bench.sh's reports → markdown tables (stdout) and OUT/summary.json.

    bench/scripts/auth_results.py [--foreign-max PCT] [--with-retried] OUT

--foreign-max PCT: the disturbed limit (default 5 % of a core); --with-retried: also
count the disturbed tries auth-bench.sh repeated (logs/*.disturbed*.json).

OUT/starts/starts__<config>__r<k>.json: herald-bench --starts reports;
OUT/fanout/fanout__<config>__r<k>.json: fan-out subscriber runs. Medians over rounds
with (min–max); ratios are <config> ÷ noauth of the medians. Invalid runs (softnet
drops, retransmits) are listed and left out. Standard library only.
"""

import glob
import json
import os
import statistics
import sys


def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# A run is left out as disturbed when CPU time of other programs on the machine over
# the run exceeded this share of one core (see foreign()), or 40 ms (4 clock ticks of
# /proc/stat's resolution over two CPUs) for short runs.
FOREIGN_MAX_PCT = 5.0
FOREIGN_MIN_MS = 40.0


def is_disturbed(fo):
    return fo is not None and fo["foreign_ms"] > max(FOREIGN_MIN_MS, fo["wall_ms"] * FOREIGN_MAX_PCT / 100)


def foreign(out, tag):
    """From logs/TAG.cpu (auth-bench.sh's cpu_mark): the machine's busy time over the run
    (user+nice+system+irq+softirq of all CPUs, /proc/stat) less herald's schedstat run
    time and the load generator's CPU (its rusage), as % of one core over the wall time;
    steal % of all CPUs separately. None without the file."""
    path = os.path.join(out, "logs", tag + ".cpu")
    if not os.path.exists(path):
        return None
    m = {"before": {}, "after": {}}
    for line in open(path):
        w = line.split()
        if len(w) < 3:
            continue
        m[w[0]][w[1]] = w[2:]
    b, a = m["before"], m["after"]
    hz = os.sysconf("SC_CLK_TCK")

    def ticks(d, i):
        return sum(int(d["cpu"][k]) for k in i)

    busy_ms = (ticks(a, (0, 1, 2, 5, 6)) - ticks(b, (0, 1, 2, 5, 6))) * 1000 / hz
    steal_ms = (ticks(a, (7,)) - ticks(b, (7,))) * 1000 / hz
    wall_ms = (int(a["wall_ns"][0]) - int(b["wall_ns"][0])) / 1e6
    srv_ms = (float(a["herald_ns"][0]) - float(b["herald_ns"][0])) / 1e6

    lg_ms = (sum(map(int, a["children_ticks"])) - sum(map(int, b["children_ticks"]))) * 1000 / hz
    other = busy_ms - srv_ms - lg_ms
    ncpu = len([k for k in a if k.startswith("cpu") and k != "cpu"]) or 1
    return {
        "wall_ms": wall_ms,
        "busy_ms": busy_ms,
        "server_ms": srv_ms,
        "loadgen_ms": lg_ms,
        "foreign_ms": other,
        "foreign_pct_of_core": 100 * other / wall_ms if wall_ms > 0 else 0.0,
        "steal_pct": 100 * steal_ms / (wall_ms * ncpu) if wall_ms > 0 else 0.0,
    }


def load(out, wl, with_retried=False):
    runs, invalid, disturbed = {}, [], []
    files = glob.glob(os.path.join(out, wl, "*.json"))
    if with_retried:
        files += glob.glob(os.path.join(out, "logs", wl + "__*.disturbed*.json"))
    for f in sorted(files):
        r = json.load(open(f))
        tag = os.path.basename(f)[:-5]
        cfg = tag.split("__")[1]
        r["_foreign"] = foreign(out, tag)
        if not r.get("valid", False):
            invalid.append(f"{tag}: {'; '.join(r.get('invalid_reasons', []))}")
            continue
        fo = r["_foreign"]
        if is_disturbed(fo):
            disturbed.append(f"{tag} ({fo['foreign_pct_of_core']:.0f} % of a core)")
            continue
        runs.setdefault(cfg, []).append(r)
    return runs, invalid, disturbed


def stat(runs, path):
    v = [x for x in (get(r, path) for r in runs) if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt(s, f="{:.2f}"):
    if s is None:
        return "–"
    return f"{f.format(s['median'])} ({f.format(s['min'])}–{f.format(s['max'])})"


def ratio(s, base):
    if s is None or base is None or not base["median"]:
        return None
    return s["median"] / base["median"]


ORDER = ["noauth", "hs256", "es256"]
NAMES = {
    "noauth": "no auth",
    "hs256": "HS256 (--auth-secret-file)",
    "es256": "ES256 (--auth-keys PEM)",
}

STARTS = [
    ("starts/s", "starts.per_second", "{:,.0f}"),
    ("server CPU µs/start", "starts.server_cpu_us_per_start", "{:.1f}"),
    ("starts per server CPU-s", "starts.server_starts_per_cpu_second", "{:,.0f}"),
    ("server core busy µs/start", "starts.server_cores_busy_us_per_start", "{:.1f}"),
    ("loadgen CPU µs/start", "starts.loadgen_cpu_us_per_start", "{:.1f}"),
    ("connect→head p50 µs", "starts.head_us.p50", "{:,.0f}"),
    ("connect→head p99 µs", "starts.head_us.p99", "{:,.0f}"),
]
FANOUT = [
    ("server CPU µs/delivery", "publish.server_cpu_us_per_delivery", "{:.2f}"),
    ("server core busy µs/delivery", "publish.server_cores_busy_us_per_delivery", "{:.2f}"),
    ("deliveries/s", "publish.deliveries_per_s", "{:,.0f}"),
    ("fan-out p99 ms", "publish.fanout_completion_us.p99", "{:,.0f}"),
    ("latency p99 µs", "publish.latency_us.p99", "{:,.0f}"),
    ("server RSS B/subscriber", "memory.server_rss_per_conn_bytes", "{:,.0f}"),
    ("connect/s (10k with tokens)", "connect.per_second", "{:,.0f}"),
    ("loadgen CPU µs/delivery", "publish.loadgen_cpu_us_per_delivery", "{:.2f}"),
]


def table(runs, rows, ratio_keys, paired_key, title):
    cfgs = [c for c in ORDER if c in runs] + sorted(c for c in runs if c not in ORDER)
    lines = [f"### {title}", ""]
    lines.append("| configuration | rounds | " + " | ".join(r[0] for r in rows) + " |")
    lines.append("|---|---|" + "---|" * len(rows))
    summary = {}
    for c in cfgs:
        stats = {name: stat(runs[c], path) for name, path, _ in rows}
        summary[c] = stats
        cells = [fmt(stats[name], f) for name, _, f in rows]
        if "fan-out p99 ms" in stats and stats["fan-out p99 ms"]:
            s = stats["fan-out p99 ms"]
            cells[[r[0] for r in rows].index("fan-out p99 ms")] = fmt(
                {k: (v / 1e3 if k != "n" else v) for k, v in s.items()}, "{:,.0f}")
        lines.append(f"| {NAMES.get(c, c)} | {len(runs[c])} | " + " | ".join(cells) + " |")
    lines.append("")
    base = summary.get("noauth")
    if base:
        lines.append("Ratios to no auth (medians):")
        lines.append("")
        for c in cfgs:
            if c == "noauth":
                continue
            parts = []
            for k in ratio_keys:
                q = ratio(summary[c][k], base[k])
                if q is not None:
                    d = summary[c][k]["median"] - base[k]["median"]
                    parts.append(f"{k} **{q:.3f}×** ({d:+.2f})")
            lines.append(f"- {NAMES.get(c, c)}: " + "; ".join(parts))
        lines.append("")
        # Paired: each round's run ÷ the same round's no-auth run, where both were kept.
        name = paired_key
        path = dict((r[0], r[1]) for r in rows)[name]
        # Rounds by label (a retried run's label is its round's); several tries: median.
        by_round = {}
        for c in cfgs:
            acc = {}
            for r in runs[c]:
                acc.setdefault(r["label"].rsplit("__r", 1)[-1], []).append(get(r, path))
            by_round[c] = {k: statistics.median(v) for k, v in acc.items()}
        for c in cfgs:
            if c == "noauth":
                continue
            q = [by_round[c][k] / by_round["noauth"][k] for k in by_round[c]
                 if k in by_round["noauth"] and by_round["noauth"][k]]
            if q:
                lines.append(f"- paired by round, {name}, {NAMES.get(c, c)} ÷ no auth: median "
                             f"**{statistics.median(q):.3f}×** ({min(q):.3f}–{max(q):.3f}, {len(q)} rounds)")
        lines.append("")
    return lines, summary


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--disturbed":
        # auth-bench.sh: exit 0 if run TAG in OUT was disturbed.
        fo = foreign(sys.argv[2], sys.argv[3])
        if fo:
            print(f"foreign CPU {fo['foreign_pct_of_core']:.1f} % of a core, steal {fo['steal_pct']:.1f} %")
        sys.exit(0 if is_disturbed(fo) else 1)
    global FOREIGN_MAX_PCT
    args = sys.argv[1:]
    with_retried = "--with-retried" in args
    args = [a for a in args if a != "--with-retried"]
    if len(args) == 3 and args[0] == "--foreign-max":
        FOREIGN_MAX_PCT = float(args[1])
        args = args[2:]
    out = args[0]
    lines, summary = [], {}
    for wl, rows, keys, paired, title in [
        ("starts", STARTS, ["starts/s", "server CPU µs/start"], "server CPU µs/start",
         "Stream starts (connect, subscribe, 200 head, close)"),
        ("fanout", FANOUT, ["server CPU µs/delivery", "server core busy µs/delivery"],
         "server CPU µs/delivery", "Fan-out CPU, auth off vs on"),
    ]:
        runs, invalid, disturbed = load(out, wl, with_retried)
        if not runs and not invalid and not disturbed:
            continue
        t, s = table(runs, rows, keys, paired, title)
        lines += t
        if invalid:
            lines += ["Left out (INVALID): " + ", ".join(invalid), ""]
        if disturbed:
            lines += [f"Left out (other programs used > {FOREIGN_MAX_PCT:.0f} % of a core during the run): "
                      + ", ".join(disturbed), ""]
        fo = [r["_foreign"]["foreign_pct_of_core"] for rs in runs.values() for r in rs if r["_foreign"]]
        if fo:
            lines += [f"Foreign CPU in the runs kept: {min(fo):.1f}–{max(fo):.1f} % of a core.", ""]
        warn = sorted({w for rs in runs.values() for r in rs for w in r.get("warnings", [])})
        if warn:
            lines += ["Warnings in these runs: " + " / ".join(warn), ""]
        summary[wl] = s
    print("\n".join(lines))
    if FOREIGN_MAX_PCT != 5.0 or with_retried:
        return  # another view: summary.json stays the default one
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
