"""Print the tables of docs/benchmarks.rst from a results file.

    python benchmarks/rst_tables.py [benchmarks/results/latest.json]

The page's figures are pasted from this output, so they are exactly those of
one run.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def table(header: list[str], rows: list[list[str]]) -> str:
    """A reStructuredText simple table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results" / "latest.json"
    res = json.loads(path.read_text())
    m = res["machine"]
    print(f".. machine: {m['cpu']}, {m['cpus']} CPUs, kernel {m['kernel']}, {m['glibc']}, "
          f"Python {m['python']}, {(m['cc'] or [''])[0]}, {m['valgrind']}")
    print(f".. date {res['date']}, commit {res.get('source', {}).get('commit')}, "
          f"native modified: {res.get('source', {}).get('native_modified')}, "
          f"{res['seconds_total']} s\n")

    if "c" in res:
        c = res["c"]
        names = {"a": "(a) no preload", "n": "(n) null interposer", "b": "(b) preload, no scope",
                 "c": "(c) own scope", "d": "(d) shared scope"}
        rows = []
        for case, d in c["cases"].items():
            row = [case.replace("/", ", ").replace("1t", "1 thread").replace("2t", "2 threads")]
            for v in names:
                if v not in d["ns_per_pair"]:
                    row.append("--")
                elif v == "a":
                    row.append(f"{d['ns_per_pair'][v]:.1f}")
                else:
                    row.append(f"{d['ns_per_pair'][v]:.1f} ({d['ratio'][v]:.2f}x)")
            rows.append(row)
            row = ["   fastest run"]
            for v in names:
                if v not in d.get("min_ns_per_pair", {}):
                    row.append("--")
                elif v == "a":
                    row.append(f"{d['min_ns_per_pair'][v]:.1f}")
                else:
                    row.append(f"{d['min_ns_per_pair'][v]:.1f} ({d['min_ratio'][v]:.2f}x)")
            rows.append(row)
        print(f"C pairs, CPU ns per pair, median of {c['repeats']}, "
              f"{c['pairs_per_thread']:,} pairs per thread\n")
        print(table(["case", *names.values()], rows) + "\n")

    if "callgrind" in res:
        cg = res["callgrind"]
        rows = []
        for pattern, case in cg["cases"].items():
            row = [pattern]
            for v in ("a", "n", "b", "c"):
                if v not in case:
                    row.append("--")
                elif v == "a":
                    row.append(f"{case[v]['instructions_per_pair']:.0f}")
                else:
                    row.append(f"{case[v]['instructions_per_pair']:.0f} ({case[v]['ratio']:.2f}x)")
            rows.append(row)
        print("Instructions per pair\n")
        print(table(["pattern", "(a) no preload", "(n) null interposer", "(b) preload, no scope",
                     "(c) own scope"], rows) + "\n")
        for pattern, added in cg["added_by_function"].items():
            print(f"Added instructions, c - a, {pattern}\n")
            print(table(["instructions", "function"],
                        [[f"{n:+.0f}", f"``{name}``"] for name, n in added.items()]) + "\n")

    if "rss" in res:
        rs = res["rss"]
        names = {"a": "(a) no preload", "n": "(n) null interposer", "b": "(b) preload, no scope",
                 "c": "(c) own scope"}
        rows = []
        for pattern, d in rs["cases"].items():
            row = [pattern]
            for v in names:
                mib = d["rss_bytes"][v] / 2**20
                row.append(f"{mib:.1f}" if v == "a" else f"{mib:.1f} ({d['ratio'][v]:.2f}x)")
            rows.append(row)
        print(f"Resident memory, MiB, {rs['blocks']:,} blocks held, median of {rs['repeats']}\n")
        print(table(["blocks", *names.values()], rows) + "\n")

    if "profile" in res:
        for pattern, case in res["profile"]["cases"].items():
            syms = list(dict.fromkeys([*case["c"]["ns_per_pair_by_symbol"],
                                       *case["a"]["ns_per_pair_by_symbol"]]))
            rows = []
            for k in syms:
                a = case["a"]["ns_per_pair_by_symbol"].get(k, 0.0)
                cc = case["c"]["ns_per_pair_by_symbol"].get(k, 0.0)
                if "kernel" in k or max(a, cc) < 0.1:
                    continue
                rows.append([f"``{k}``", f"{a:.2f}", f"{cc:.2f}"])
            print(f"perf profile, {pattern}: a {case['a']['reported_ns_per_pair']:.2f}, "
                  f"c {case['c']['reported_ns_per_pair']:.2f} ns per pair\n")
            print(table(["function", "(a) ns/pair", "(c) ns/pair"], rows) + "\n")

    for key in ("python", "python_numpy"):
        if key not in res:
            continue
        p = res[key]
        labels = {
            "plain": "no preload",
            "preload": "preload, no scope",
            "task": "preload, ``task`` scope with a budget",
            "tracemalloc": "``tracemalloc.start()``",
            "memray": "``memray.Tracker``",
            "malloc": "``PYTHONMALLOC=malloc``",
            "malloc+task": "``PYTHONMALLOC=malloc``, preload, ``task`` scope",
        }
        rows = []
        for v, label in labels.items():
            if v not in p["seconds"]:
                continue
            pr = p["paired_ratios"][v]
            row = [label, f"{p['seconds'][v]:.3f}", f"{p['ratio'][v]:.2f}x",
                   f"{statistics.median(pr):.2f}x ({pr[0]:.2f}-{pr[-1]:.2f})",
                   f"{p['min_ratio'][v]:.2f}x" if "min_ratio" in p else "--",
                   f"{p['wall_ratio'][v]:.2f}x"]
            if "maxrss_bytes" in p:
                row.append(f"{p['maxrss_bytes'][v] / 2**20:.1f} ({p['maxrss_ratio'][v]:.2f}x)")
            rows.append(row)
        head = ["variant", "CPU s", "ratio", "per-repeat ratio (range)", "fastest-run ratio",
                "wall ratio"]
        if "maxrss_bytes" in p:
            head.append("peak RSS, MiB")
        print(f"Python ({p.get('kind', 'objects')}), CPU s, median of {p['repeats']}, "
              f"scale {p['scale']}\n")
        print(table(head, rows) + "\n")
        task = p["last_run"].get("task", {}).get("scope", {})
        print(f".. task scope: {task}\n")

    if "py_instructions" in res:
        pi = res["py_instructions"]
        plain = pi["variants"]["plain"]["per_round"]
        rows = []
        for v, d in pi["variants"].items():
            rows.append([v, f"{d['per_round'] / 1e6:.1f} M", f"{d['per_round'] / plain:.4f}",
                         f"{d.get('charged_allocations_per_round', 0):,}" if v.endswith("task") else "--",
                         f"{d['startup'] / 1e6:.0f} M"])
        print("Python instructions per round\n")
        print(table(["variant", "per round", "ratio", "allocations charged", "start-up"], rows) + "\n")
        if "added_per_charged_allocation" in pi:
            print(f".. added per charged allocation: {pi['added_per_charged_allocation']:.1f}\n")


if __name__ == "__main__":
    main()
