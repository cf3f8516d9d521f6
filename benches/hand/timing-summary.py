#!/usr/bin/env python3
"""Summarises the `ballast::timing` debug events of node logs (one summary per log file).

Run a node with RUST_LOG including `ballast::timing=debug`; each event then names its step and
carries durations in microseconds (`*_us`) and sizes. For every kind of event this prints the
count and, per field, the 50th and 90th percentiles, the maximum and the sum.

Not a benchmark of record: a tool for reading where a write's time goes, by hand.

    benches/hand/timing-summary.py node1.log node2.log ...
"""
import collections
import re
import sys


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0


def summarise(path):
    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    with open(path, errors="replace") as log:
        for line in log:
            if "ballast::timing: " not in line:
                continue
            text = line.split("ballast::timing: ", 1)[1]
            fields = dict(re.findall(r"(\w+)=(\S+)", text))
            kind = " ".join(word for word in text.split() if "=" not in word)
            if "rpc" in fields:
                kind += " " + fields["rpc"]
            for name, value in fields.items():
                if name.endswith("_us") or name in ("entry_count", "record_count", "payload_bytes", "data_bytes"):
                    try:
                        groups[kind][name].append(int(value))
                    except ValueError:
                        pass
    print(path)
    for kind, fields in groups.items():
        count = max(len(values) for values in fields.values())
        parts = []
        for name, values in fields.items():
            if name.endswith("_us"):
                label, scale, unit = name[:-3], 1000, " ms"
            elif name.endswith("_bytes"):
                label, scale, unit = name, 1 << 20, " MiB"
            else:
                label, scale, unit = name, 1, ""
            parts.append(
                f"{label} p50 {percentile(values, .5) / scale:.1f} p90 {percentile(values, .9) / scale:.1f}"
                f" max {max(values) / scale:.1f} sum {sum(values) / scale:.0f}{unit}"
            )
        print(f"  {kind}: n={count}: " + "; ".join(parts))


for argument in sys.argv[1:]:
    summarise(argument)
