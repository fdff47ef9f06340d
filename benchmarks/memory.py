"""The memory of a command and every process it starts, together: `zoo convert` and its PyTorch
reference process, as the machine holds them (Linux, from /proc).

`run_sampled(command)` runs the command while a thread reads, every `interval` seconds, the
resident set (RSS) of the command's process and of each of its descendants from
`/proc/PID/stat`, and their sum; the peak of that sum is the figure reported. Pages two
processes share (their libraries) count in each, as the kernel counts them in each RSS; files
the processes read or write count only where they are mapped (page cache is not RSS). Each
process's own peak as the kernel keeps it (`VmHWM`, read at every sample) bounds what a peak
shorter than the interval could add: their sum is reported beside it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


def _processes() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, RSS bytes)} of every process, from one read of `/proc/PID/stat` each."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # after the command name, which may hold spaces
        out[int(entry.name)] = (int(fields[1]), int(fields[21]) * PAGE)
    return out


def _tree(root: int, processes: dict[int, tuple[int, int]]) -> list[int]:
    """`root` and its descendants among `processes`."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in processes:
            found.append(pid)
            todo += children.get(pid, [])
    return found


def _high_water(pid: int) -> int | None:
    """The process's peak RSS as the kernel keeps it (`VmHWM`), bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _label(pid: int, root: int) -> str:
    if pid == root:
        return "parent"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    return "reference" if "converters.reference" in command else "other"


@dataclass
class Sampled:
    """A command's run: its output lines and the memory of its process tree over time.

    Attributes:
        returncode: the command's exit status.
        seconds: its wall time.
        samples: (seconds since start, {role: RSS bytes}) per sample; roles `parent` (the
            command's process), `reference` (converters.reference children), `other`.
        lines: (seconds since start, line) of its stdout and stderr together.
        high_water: {role: the largest `VmHWM` of a process of that role}.
        found: {path: size} of files matching `watch` seen during the run.
    """

    returncode: int
    seconds: float
    samples: list[tuple[float, dict[str, int]]]
    lines: list[tuple[float, str]]
    high_water: dict[str, int] = field(default_factory=dict)
    found: dict[str, int] = field(default_factory=dict)

    def peak(self, role: str | None = None, start: float = 0.0, end: float = float("inf")) -> int:
        """The largest RSS of `role` (None: all roles summed) over the samples in [start, end)."""
        values = [sum(by.values()) if role is None else by.get(role, 0) for t, by in self.samples if start <= t < end]
        return max(values, default=0)

    def steps(self) -> list[tuple[str, float, float]]:
        """(name, start, end) of each `-> STEP ...` / `done in` pair the command printed, with
        `start-up` before the first and `exit` after the last."""
        spans, opened, last = [], None, 0.0
        for t, line in self.lines:
            text = line.strip()
            if text.startswith("-> "):
                if t > last:
                    spans.append(("start-up" if not spans else "between steps", last, t))
                opened = (text[3:].removesuffix(" ...").strip(), t)
            elif text.startswith("done in") and opened is not None:
                spans.append((opened[0], opened[1], t))
                opened, last = None, t
        spans.append(("exit", last, self.seconds + 1.0))
        return spans


def run_sampled(
    command: list[str],
    *,
    env: dict | None = None,
    cwd: Path | None = None,
    interval: float = 0.05,
    watch: tuple[Path, str] | None = None,
) -> Sampled:
    """Run `command` to its end, sampling its process tree's RSS every `interval` seconds.

    Args:
        watch: (folder, glob pattern): files to note the size of as they appear (a file the
            command writes and removes again before it ends).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, high_water, found, labels = [], {}, {}, {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            tick = time.perf_counter()
            by: dict[str, int] = {}
            processes = _processes()
            for pid in _tree(proc.pid, processes):
                if pid not in labels:
                    labels[pid] = _label(pid, proc.pid)
                role = labels[pid]
                by[role] = by.get(role, 0) + processes[pid][1]
                hwm = _high_water(pid)
                if hwm is not None:
                    high_water[role] = max(high_water.get(role, 0), hwm)
            samples.append((tick - start, by))
            if watch is not None:
                for path in watch[0].glob(watch[1]):
                    try:
                        found[str(path)] = path.stat().st_size
                    except OSError:
                        pass
            done.wait(max(0.0, interval - (time.perf_counter() - tick)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        done.set()
        sampler.join()
    return Sampled(proc.returncode, time.perf_counter() - start, samples, lines, high_water, found)
