#!/usr/bin/env python3
"""Plots and ratios from the JSON reports of pgws-load (as written by scripts/bench-load.sh).

    python3 bench/plot.py RESULTS_DIR [IMG_DIR]     PNGs: rss_vs_sockets, latency_vs_rate,
                                                    throughput_vs_peers (default docs/img)
    python3 bench/plot.py --ratios RESULTS_DIR      the ratio tables (text)
"""
import json
import pathlib
import sys

TARGETS = ["pgws", "nats", "node"]
COLORS = {"pgws": "tab:blue", "nats": "tab:green", "node": "tab:orange"}


def load(results):
    reports = []
    for p in sorted(pathlib.Path(results).glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except ValueError:
            continue
        if r.get("tool") == "pgws-load":
            r["_name"] = p.stem
            reports.append(r)
    return reports


def of(reports, mode, target=None, prefix=None):
    return [
        r
        for r in reports
        if r["mode"] == mode
        and (target is None or r["target"] == target)
        and (prefix is None or r["_name"].startswith(prefix))
    ]


def fig(r, key, default=None):
    return r["figures"].get(key, default)


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"


def ratios(reports):
    lines = []
    idle = {t: {r["params"]["sockets"]: r for r in of(reports, "idle", t, "idle-")} for t in TARGETS}
    if any(idle.values()):
        lines.append("idle: server RSS per socket (KiB), pgws vs peers")
        lines.append(f"  {'sockets':>8} {'pgws':>8} {'nats':>8} {'node':>8} {'pgws/nats':>10} {'pgws/node':>10}")
        for n in sorted(set().union(*[set(v) for v in idle.values()])):
            v = {t: fig(idle[t][n], "server_rss_per_socket_kib") if n in idle[t] else None for t in TARGETS}
            cell = lambda x: f"{x:8.2f}" if x is not None else f"{'-':>8}"
            lines.append(
                f"  {n:>8} {cell(v['pgws'])} {cell(v['nats'])} {cell(v['node'])}"
                f" {ratio(v['pgws'], v['nats']):>10} {ratio(v['pgws'], v['node']):>10}"
            )
    fan = {t: {r["params"]["rate_per_s"]: r for r in of(reports, "fanout", t, "fanout-")} for t in TARGETS}
    if any(fan.values()):
        lines.append("fanout: deliveries/s and p99 (ms) on one channel, pgws vs peers")
        lines.append(
            f"  {'rate':>6} {'offered':>9} {'pgws':>9} {'nats':>9} {'node':>9}"
            f" {'pgws/nats':>10} {'pgws/node':>10}  p99 pgws / nats / node"
        )
        for rate in sorted(set().union(*[set(v) for v in fan.values()])):
            rs = {t: fan[t].get(rate) for t in TARGETS}
            d = {t: fig(rs[t], "deliveries_per_s") if rs[t] else None for t in TARGETS}
            p = {t: ((fig(rs[t], "latency") or {}).get("p99_ms") if rs[t] else None) for t in TARGETS}
            offered = next(r for r in rs.values() if r)["params"]["offered_deliveries_per_s"]
            cell = lambda x: f"{x:9.0f}" if x is not None else f"{'-':>9}"
            lines.append(
                f"  {rate:>6g} {offered:>9.0f} {cell(d['pgws'])} {cell(d['nats'])} {cell(d['node'])}"
                f" {ratio(d['pgws'], d['nats']):>10} {ratio(d['pgws'], d['node']):>10}"
                f"  {p['pgws']} / {p['nats']} / {p['node']}"
            )
        best = {t: max((fig(r, "deliveries_per_s") or 0 for r in fan[t].values()), default=0) for t in TARGETS}
        lines.append(
            f"  best deliveries/s: pgws {best['pgws']:.0f}, nats {best['nats']:.0f}, node {best['node']:.0f};"
            f" pgws/nats {ratio(best['pgws'], best['nats'])}, pgws/node {ratio(best['pgws'], best['node'])}"
        )
    pub = {
        t: {
            (r["params"]["topics"], r["params"]["subscribers_per_topic"], r["params"]["rate_per_s"]): r
            for r in of(reports, "pubsub", t)
        }
        for t in ["pgws", "nats"]
    }
    if any(pub.values()):
        lines.append("pubsub: wspubsub fan-out, pgws vs nats-server (publishers on websockets in both)")
        lines.append(
            f"  {'topics x subs':>14} {'rate':>6} {'offered':>9} {'pgws':>9} {'nats':>9} {'pgws/nats':>10}"
            f"  {'p50 ms':>13} {'p99 ms':>15} {'cpu us/delivery':>17} {'cpu pgws/nats':>14}  lost"
        )
        for key in sorted(set(pub["pgws"]) | set(pub["nats"])):
            rs = {t: pub[t].get(key) for t in ["pgws", "nats"]}
            v = lambda t, k: fig(rs[t], k) if rs[t] else None
            q = lambda t, k: (v(t, "latency") or {}).get(k)
            offered = next(r for r in rs.values() if r)["params"]["offered_deliveries_per_s"]
            cell = lambda x, w, p=0: f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}}"
            lines.append(
                f"  {f'{key[0]} x {key[1]}':>14} {key[2]:>6g} {offered:>9.0f}"
                f" {cell(v('pgws', 'deliveries_per_s'), 9)} {cell(v('nats', 'deliveries_per_s'), 9)}"
                f" {ratio(v('pgws', 'deliveries_per_s'), v('nats', 'deliveries_per_s')):>10}"
                f"  {q('pgws', 'p50_ms')!s:>6} / {q('nats', 'p50_ms')!s:<5}"
                f" {q('pgws', 'p99_ms')!s:>7} / {q('nats', 'p99_ms')!s:<6}"
                f" {v('pgws', 'server_cpu_us_per_delivery')!s:>8} / {v('nats', 'server_cpu_us_per_delivery')!s:<6}"
                f" {ratio(v('pgws', 'server_cpu_us_per_delivery'), v('nats', 'server_cpu_us_per_delivery')):>14}"
                f"  {v('pgws', 'lost_deliveries')} / {v('nats', 'lost_deliveries')}"
            )
    lines.extend(one_vs_split(reports))
    lines.extend(history_cost(reports))
    for r in of(reports, "ingest", prefix="ingest-"):
        lines.append(
            f"ingest ({r['params']['sockets']} sockets): {fig(r, 'ingest_msgs_per_s'):.0f} msgs/s reaching NOTIFY,"
            f" baseline {fig(r, 'baseline_msgs_per_s'):.0f}/s, ratio {fig(r, 'ratio_to_baseline')}x"
        )
    for r in of(reports, "fanout", prefix="big-"):
        lat = fig(r, "latency") or {}
        lines.append(
            f"big: {fig(r, 'opened')} of {r['params']['sockets']} sockets over {len(r['params']['gateways'])}"
            f" gateways, deliveries {fig(r, 'deliveries')} of {fig(r, 'expected_deliveries')}, p99 {lat.get('p99_ms')} ms"
        )
    return "\n".join(lines)


def one_vs_split(reports):
    """The `one` phase: pgws in one process (`one-one-*`) against the split stack
    (`one-pgws-*`), run by run, and the ratios one / split."""
    runs = {}
    for r in reports:
        parts = r["_name"].split("-")
        if parts[0] != "one" or len(parts) < 3:
            continue
        shape, what = parts[1], parts[2]
        run = parts[-1] if parts[-1].startswith("run") else "-"
        if what == "ingest" and len(parts) > 4 and parts[3].startswith("audit"):
            what = "ingest-" + parts[3]
        runs.setdefault((what, run), {})[shape] = r
    lines = []
    if not runs:
        return lines
    lines.append("one process (pgws) vs split services (gateway + bridge + recorder + NATS), same run")
    for (what, run), by in sorted(runs.items()):
        split, one = by.get("pgws"), by.get("one")
        if what == "fanout":
            v = lambda r, k: fig(r, k) if r else None
            p = lambda r, k: (v(r, "latency") or {}).get(k)
            lines.append(
                f"  fanout {run}: deliveries/s split {v(split, 'deliveries_per_s')} one {v(one, 'deliveries_per_s')}"
                f" ({ratio(v(one, 'deliveries_per_s'), v(split, 'deliveries_per_s'))});"
                f" p50 ms {p(split, 'p50_ms')} / {p(one, 'p50_ms')}; p99 ms {p(split, 'p99_ms')} / {p(one, 'p99_ms')}"
                f" ({ratio(p(one, 'p99_ms'), p(split, 'p99_ms'))});"
                f" cpu us/delivery {v(split, 'server_cpu_us_per_delivery')} / {v(one, 'server_cpu_us_per_delivery')}"
                f" ({ratio(v(one, 'server_cpu_us_per_delivery'), v(split, 'server_cpu_us_per_delivery'))})"
            )
        elif what.startswith("ingest-audit"):
            v = lambda r, k: fig(r, k) if r else None
            lines.append(
                f"  ingest {run}, one process, {what[7:].replace('audit', 'audit ')}: msgs/s reaching NOTIFY"
                f" {v(one, 'ingest_msgs_per_s')}, baseline {v(one, 'baseline_msgs_per_s')}"
            )
        elif what == "ingest":
            v = lambda r, k: fig(r, k) if r else None
            lines.append(
                f"  ingest {run}: msgs/s reaching NOTIFY split {v(split, 'ingest_msgs_per_s')} one {v(one, 'ingest_msgs_per_s')}"
                f" ({ratio(v(one, 'ingest_msgs_per_s'), v(split, 'ingest_msgs_per_s'))});"
                f" baseline {v(split, 'baseline_msgs_per_s')} / {v(one, 'baseline_msgs_per_s')};"
                f" exact {v(split, 'exact_msgs_per_s')} ({v(split, 'exact')}) / {v(one, 'exact_msgs_per_s')} ({v(one, 'exact')})"
                f" ({ratio(v(one, 'exact_msgs_per_s'), v(split, 'exact_msgs_per_s'))})"
            )
        elif what == "idle":
            v = lambda r: fig(r, "server_rss_per_socket_kib") if r else None
            lines.append(
                f"  idle {parts_sockets(split or one)} sockets: RSS per socket KiB split gateway {v(split)}"
                f" one {v(one)} ({ratio(v(one), v(split))})"
            )
    return lines


def history_cost(reports):
    """The `history` phase: the split stack without a history (`history-off-*`), with it
    (`history-on-*`) and with resuming sockets (`history-resume-*`), run by run, against off."""
    runs = {}
    for r in reports:
        parts = r["_name"].split("-")
        if parts[0] != "history" or len(parts) < 4:
            continue
        mode, what, run = parts[1], parts[2], parts[-1]
        runs.setdefault((what, run), {})[mode] = r
    lines = []
    if runs:
        lines.append("history: off (PGWS_HISTORY_SECONDS=0) / on / on with resuming sockets, same run")
    v = lambda r, k: fig(r, k) if r else None
    p = lambda r, k: (v(r, "latency") or {}).get(k)
    for (what, run), by in sorted(runs.items()):
        off, on, res = by.get("off"), by.get("on"), by.get("resume")
        if what == "fanout":
            lines.append(
                f"  fanout {run}: deliveries/s {v(off, 'deliveries_per_s')} / {v(on, 'deliveries_per_s')}"
                f" / {v(res, 'deliveries_per_s')} ({ratio(v(on, 'deliveries_per_s'), v(off, 'deliveries_per_s'))},"
                f" {ratio(v(res, 'deliveries_per_s'), v(off, 'deliveries_per_s'))});"
                f" p99 ms {p(off, 'p99_ms')} / {p(on, 'p99_ms')} / {p(res, 'p99_ms')}"
                f" ({ratio(p(on, 'p99_ms'), p(off, 'p99_ms'))}, {ratio(p(res, 'p99_ms'), p(off, 'p99_ms'))});"
                f" cpu us/delivery {v(off, 'server_cpu_us_per_delivery')} / {v(on, 'server_cpu_us_per_delivery')}"
                f" / {v(res, 'server_cpu_us_per_delivery')}"
            )
        elif what == "ingest":
            lines.append(
                f"  ingest {run}: msgs/s reaching NOTIFY {v(off, 'ingest_msgs_per_s')} / {v(on, 'ingest_msgs_per_s')}"
                f" ({ratio(v(on, 'ingest_msgs_per_s'), v(off, 'ingest_msgs_per_s'))})"
            )
    return lines


def parts_sockets(r):
    return r["params"].get("sockets") if r else None


def plots(reports, img):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = pathlib.Path(img)
    img.mkdir(parents=True, exist_ok=True)

    # RSS vs sockets
    f, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for t in TARGETS:
        rs = sorted(of(reports, "idle", t), key=lambda r: r["params"]["sockets"])
        rs = [r for r in rs if fig(r, "server_rss_after_kib") is not None]
        if not rs:
            continue
        xs = [fig(r, "opened") for r in rs]
        a1.plot(xs, [(fig(r, "server_rss_after_kib") - fig(r, "server_rss_before_kib")) / 1024 for r in rs],
                "o-", color=COLORS[t], label=t)
        a2.plot(xs, [fig(r, "server_rss_per_socket_kib") for r in rs], "o-", color=COLORS[t], label=t)
    a2.axhline(8, color="grey", ls="--", lw=1, label="target 8 KiB")
    a1.set(xlabel="idle sockets", ylabel="server RSS growth (MiB)", title="Server RSS vs sockets")
    a2.set(xlabel="idle sockets", ylabel="KiB per socket", title="RSS per idle socket")
    a1.legend()
    a2.legend()
    f.tight_layout()
    f.savefig(img / "rss_vs_sockets.png", dpi=110)
    plt.close(f)

    # latency percentiles vs delivery rate
    f, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, prefix, title in [
        (axes[0], "fanout-", "one channel, 10,000 sockets"),
        (axes[1], "mixed-", "many channels of few sockets"),
    ]:
        for t in TARGETS:
            rs = sorted(of(reports, "fanout", t, prefix), key=lambda r: fig(r, "deliveries_per_s") or 0)
            rs = [r for r in rs if fig(r, "latency")]
            if not rs:
                continue
            xs = [fig(r, "deliveries_per_s") for r in rs]
            for q, style in [("p50_ms", ":"), ("p99_ms", "-"), ("p99_9_ms", "--")]:
                ax.plot(xs, [fig(r, "latency")[q] for r in rs], style, marker="o", ms=3,
                        color=COLORS[t], label=f"{t} {q[:-3].replace('_', '.')}")
        ax.axhline(5, color="grey", lw=1, ls="-.", label="5 ms")
        ax.set(xscale="log", yscale="log", xlabel="deliveries/s", title=title)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("pg_notify -> socket (ms)")
    f.tight_layout()
    f.savefig(img / "latency_vs_rate.png", dpi=110)
    plt.close(f)

    # throughput vs peers
    f, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    best = {}
    for t in TARGETS:
        rs = of(reports, "fanout", t, "fanout-")
        if rs:
            best[t] = max(fig(r, "deliveries_per_s") or 0 for r in rs)
    a1.bar(list(best), list(best.values()), color=[COLORS[t] for t in best])
    for i, v in enumerate(best.values()):
        a1.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    a1.set(ylabel="deliveries/s", title="Fan-out to 10,000 sockets, best of the rates")
    ing = of(reports, "ingest")
    if ing:
        r = ing[0]
        vals = [fig(r, "ingest_msgs_per_s"), fig(r, "baseline_msgs_per_s")]
        a2.bar(["pgws ingest", "1 NOTIFY/tx"], vals, color=["tab:blue", "tab:grey"])
        for i, v in enumerate(vals):
            a2.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
        a2.set(ylabel="messages/s reaching NOTIFY", title="Ingest")
    f.tight_layout()
    f.savefig(img / "throughput_vs_peers.png", dpi=110)
    plt.close(f)


def main(argv):
    if len(argv) >= 2 and argv[0] == "--ratios":
        print(ratios(load(argv[1])))
        return 0
    if not argv:
        print(__doc__)
        return 64
    reports = load(argv[0])
    plots(reports, argv[1] if len(argv) > 1 else "docs/img")
    print(ratios(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
