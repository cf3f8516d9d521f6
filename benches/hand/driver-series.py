#!/usr/bin/env python3
"""The FUSE driver's node writes over time, from its `ballast::timing` events (`node write
answered`; the driver's log may carry colour codes, they are stripped): per window, the MB/s
answered and the writes in flight at the window's middle.

Not a benchmark of record: a tool for seeing how steadily writes flow, by hand.

    benches/hand/driver-series.py fuse.log [window_ms (20)] [first_window (0)] [windows (80)]
"""
import datetime
import re
import sys


def main():
    window = (float(sys.argv[2]) if len(sys.argv) > 2 else 20) / 1e3
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 80
    writes = []
    with open(sys.argv[1], errors="replace") as log:
        for line in log:
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)
            if "node write answered" not in line:
                continue
            at = datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").timestamp()
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            writes.append((at - int(fields["write_us"]) / 1e6, at, int(fields["length_bytes"])))
    if not writes:
        print("no `node write answered` events")
        return
    origin = min(sent for sent, _, _ in writes)
    for number in range(first, first + count):
        start = origin + number * window
        answered = sum(length for _, done, length in writes if start <= done < start + window)
        middle = start + window / 2
        in_flight = sum(1 for sent, done, _ in writes if sent <= middle < done)
        print(f"{number * window * 1e3:7.0f} ms {answered / window / 1e6:6.0f} MB/s"
              f"  in flight {in_flight:2d} " + "#" * in_flight)


main()
