#!/usr/bin/env python3
"""Lines up each write's steps by Raft log index, from a node log with `ballast::timing` events.

For every entry of one container it finds when the proposal was made (`proposal answered` less
its `client_write_us`), when the log writer queued and took it (`log append`: `queue_us`,
`first_index`), when its record was written, when it was applied (`entries applied`) and when
the proposal was answered; then prints the percentiles of each step. With a start index it
also prints 30 entries from there, each step in ms from the first entry's proposal. Entries
the writer appended in one batch share its times (queued: the batch's first append's), so a
later entry of a batch can show a negative proposed -> queued.

Not a benchmark of record: a tool for reading where a write's time goes, by hand.

    benches/hand/write-lineup.py node.log [start_index] [container]
"""
import collections
import datetime
import re
import sys


def timestamp(text):
    return datetime.datetime.strptime(text[:26], "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0


def main():
    path = sys.argv[1]
    start_index = int(sys.argv[2]) if len(sys.argv) > 2 else None
    container = sys.argv[3] if len(sys.argv) > 3 else "1"
    steps = collections.defaultdict(dict)
    with open(path, errors="replace") as log:
        for line in log:
            if "ballast::timing" not in line:
                continue
            at = timestamp(line.split()[0])
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            if fields.get("container") != container:
                continue
            if "log append" in line and "first_index" in fields:
                index = int(fields["first_index"])
                written = at
                taken = written - (int(fields["append_us"]) + int(fields["detach_us"])) / 1e6
                queued = taken - int(fields["queue_us"]) / 1e6
                for offset in range(int(fields["record_count"])):
                    steps[index + offset].update(queued=queued, taken=taken, written=written)
            elif "entries applied" in line and "first_index" in fields:
                index = int(fields["first_index"])
                for offset in range(int(fields["entry_count"])):
                    steps[index + offset]["applied"] = at
            elif "proposal answered" in line:
                index = int(fields["index"])
                steps[index].update(
                    answered=at, proposed=at - int(fields["client_write_us"]) / 1e6
                )
    order = ("proposed", "queued", "taken", "written", "applied", "answered")
    complete = [(index, steps[index]) for index in sorted(steps)
                if all(name in steps[index] for name in order)]
    print(f"{len(complete)} entries of container {container} with every step")
    for before, after in zip(order, order[1:]):
        values = [(step[after] - step[before]) * 1e3 for _, step in complete]
        if values:
            print(f"  {before:>8} -> {after:<8} p10 {percentile(values, .1):6.2f}"
                  f"  p50 {percentile(values, .5):6.2f}  p90 {percentile(values, .9):6.2f}"
                  f"  max {max(values):7.2f} ms")
    if start_index is not None:
        shown = [(index, step) for index, step in complete if index >= start_index][:30]
        if shown:
            origin = shown[0][1]["proposed"]
            for index, step in shown:
                print(index, " ".join(f"{name}={(step[name] - origin) * 1e3:7.2f}" for name in order))


main()
