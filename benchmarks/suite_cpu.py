"""Where the test suite's CPU goes: run pytest and add up the CPU time of every process it starts.

    python benchmarks/suite_cpu.py [pytest arguments, e.g. -q --durations=20]

The suite starts a local Ray, a multi-node cluster in a child pytest (tests/cluster/test_multinode.py)
and with them dozens of Ray worker, actor and system processes that are not children pytest waits
for, so ``time`` cannot see their CPU. This samples ``/proc`` every half second while the suite runs:
each process first seen after the start, its last title (Ray names a worker's process by what it
runs: ``ray::IDLE``, ``ray::RayTrainWorker``...) and its last CPU time (user + system). Processes of
the multi-node cluster are told apart by the ``RAY_TMPDIR`` the child gives them (``pm-ray-``). A
process that ends between two samples loses its last half second; processes that were running
before the start (another job) are left out, but their load still slows the suite. Linux only.

Prints the wall time, the machine's busy and idle CPU-seconds over the run (``/proc/stat``), and the
CPU-seconds per process title, the multi-node cluster's marked ``MN``.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
MULTINODE_TMP = b"RAY_TMPDIR=/tmp/pm-ray-"  # tests/cluster/test_multinode.py's prefix for the child's Ray


def machine_seconds() -> tuple[float, float]:
    """Busy and idle CPU-seconds of the whole machine so far (``/proc/stat``'s first line)."""
    user, nice, system, idle, iowait, irq, softirq, *_ = (int(v) for v in open("/proc/stat").readline().split()[1:])
    return (user + nice + system + irq + softirq) / TICK, (idle + iowait) / TICK


def title_of(cmdline: str) -> str:
    """One group per kind of process: ``ray::RayTrainWorker.shutdown`` is ``ray::RayTrainWorker``."""
    if cmdline.startswith("ray::"):  # an actor's title ends in the method it runs: drop it, keep the class
        return re.sub(r"\.\w+$", "", cmdline.split()[0])
    words = cmdline.split()
    if not words:
        return "(no title)"
    if "python" in os.path.basename(words[0]):
        return " ".join([os.path.basename(words[0])] + [os.path.basename(w) for w in words[1:3]])
    return os.path.basename(words[0])


class Sampler:
    def __init__(self):
        self.before = {pid for pid in os.listdir("/proc") if pid.isdigit()}
        self.seen: dict[str, list] = {}  # pid -> [title, cpu seconds, multinode]

    def sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid in self.before:
                continue
            try:
                stat = open(f"/proc/{pid}/stat").read()
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
                if pid not in self.seen:
                    multinode = MULTINODE_TMP in open(f"/proc/{pid}/environ", "rb").read()
                    self.seen[pid] = ["", 0.0, multinode]
            except OSError:  # ended, or not ours to read
                continue
            fields = stat.rsplit(")", 1)[1].split()
            entry = self.seen[pid]
            entry[0] = title_of(cmdline) if cmdline else entry[0]
            entry[1] = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime

    def table(self) -> list[tuple[str, float, int]]:
        groups: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
        for title, cpu, multinode in self.seen.values():
            group = groups[("MN " if multinode else "") + (title or "(no title)")]
            group[0] += cpu
            group[1] += 1
        return sorted(((name, cpu, n) for name, (cpu, n) in groups.items()), key=lambda row: -row[1])


def main(argv: list[str]) -> int:
    sampler = Sampler()
    busy0, idle0 = machine_seconds()
    started = time.perf_counter()
    suite = subprocess.Popen([sys.executable, "-m", "pytest", *(argv or ["-q"])])
    while suite.poll() is None:
        sampler.sample()
        time.sleep(0.5)
    sampler.sample()
    wall = time.perf_counter() - started
    busy1, idle1 = machine_seconds()
    rows = sampler.table()
    print(f"\npytest exited {suite.returncode} after {wall:.0f} s; the machine: {busy1 - busy0:.0f} CPU-s busy, "
          f"{idle1 - idle0:.0f} CPU-s idle ({os.cpu_count()} CPUs)")
    total = sum(cpu for _, cpu, _ in rows)
    multinode = sum(cpu for name, cpu, _ in rows if name.startswith("MN "))
    print(f"processes the suite started: {total:.0f} CPU-s, {multinode:.0f} of them the multi-node cluster's (MN)\n")
    print("| CPU-s | processes | title |\n|---|---|---|")
    for name, cpu, n in rows:
        if cpu >= 1:
            print(f"| {cpu:.1f} | {n} | {name} |")
    return suite.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
