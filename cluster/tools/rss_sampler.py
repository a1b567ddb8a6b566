"""RSS of every replica process of an app over a whole run (a daemon thread), and its PNG plot.

Replicas come and go during a chaos run (killed, replaced), so the thread re-lists them every few
samples and finds each new one's pid through the actor itself. Only replicas on this machine's Ray
node can be sampled (a pid means nothing elsewhere); the others are counted in `remote_replicas`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

RELIST_EVERY = 4  # samples between listings of the app's replicas


@dataclass(frozen=True)
class RssSample:
    t_s: float  # seconds since the sampler started
    replica: str  # "<deployment>#<replica id>"
    pid: int
    rss_mb: float


@dataclass(frozen=True)
class Boundary:
    """A scenario's span on the same clock as the samples."""

    scenario: str
    start_s: float
    end_s: float


@dataclass
class RssTrace:
    period_s: float
    samples: list[RssSample] = field(default_factory=list)
    boundaries: list[Boundary] = field(default_factory=list)
    remote_replicas: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RssSummary:
    replica: str
    pid: int
    first_mb: float
    max_mb: float
    last_mb: float
    seconds: float  # how long it was sampled


class RssSampler:
    def __init__(self, app: str, period_s: float):
        self.app = app
        self.trace = RssTrace(period_s=period_s)
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._processes: dict[str, object] = {}  # replica label -> psutil.Process
        self._thread = threading.Thread(target=self._run, name="chaos-rss", daemon=True)

    def now(self) -> float:
        return time.perf_counter() - self._started

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> RssTrace:
        self._stop.set()
        self._thread.join(10)
        return self.trace

    def mark(self, scenario: str, start_s: float, end_s: float) -> None:
        self.trace.boundaries.append(Boundary(scenario, start_s, end_s))

    def _run(self) -> None:
        count = 0
        while not self._stop.is_set():
            if count % RELIST_EVERY == 0:
                self._relist()
            self._sample()
            count += 1
            self._stop.wait(self.trace.period_s)

    def _relist(self) -> None:
        import psutil
        import ray

        from cluster.tools.replicas import list_replicas, replica_process

        try:
            replicas = list_replicas(self.app)
            node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # Ray going down at the end of a run
            return
        for replica in replicas:
            if replica.label in self._processes or replica.label in self.trace.remote_replicas:
                continue
            try:
                where = replica_process(replica, timeout_s=2.0)
            except Exception:  # still starting (its __init__ is loading the model) or already gone: next time
                continue
            if where.node_id != node_id:
                self.trace.remote_replicas.append(replica.label)
                continue
            try:
                self._processes[replica.label] = psutil.Process(where.pid)
            except psutil.NoSuchProcess:
                continue

    def _sample(self) -> None:
        import psutil

        t_s = self.now()
        for label, process in list(self._processes.items()):
            try:
                # A killed replica lingers as a zombie (RSS 0) until Ray reaps it: not a sample.
                rss = 0 if process.status() == psutil.STATUS_ZOMBIE else process.memory_info().rss
            except psutil.Error:
                rss = 0
            if rss == 0:  # gone: its replacement is a new label
                del self._processes[label]
                continue
            self.trace.samples.append(RssSample(t_s=t_s, replica=label, pid=process.pid, rss_mb=rss / 2**20))


def summarize(trace: RssTrace) -> list[RssSummary]:
    by_replica: dict[str, list[RssSample]] = {}
    for sample in trace.samples:
        by_replica.setdefault(sample.replica, []).append(sample)
    return [RssSummary(replica=label, pid=samples[0].pid, first_mb=samples[0].rss_mb,
                       max_mb=max(s.rss_mb for s in samples), last_mb=samples[-1].rss_mb,
                       seconds=samples[-1].t_s - samples[0].t_s)
            for label, samples in sorted(by_replica.items())]


def plot_rss(trace: RssTrace, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    by_replica: dict[str, list[RssSample]] = {}
    for sample in trace.samples:
        by_replica.setdefault(sample.replica, []).append(sample)
    for label, samples in sorted(by_replica.items()):
        ax.plot([s.t_s for s in samples], [s.rss_mb for s in samples], label=label, linewidth=1.2)
    for index, boundary in enumerate(trace.boundaries):
        ax.axvspan(boundary.start_s, boundary.end_s, color=f"C{index % 10}", alpha=0.07)
        ax.axvline(boundary.start_s, color="grey", linestyle="--", linewidth=0.8)
        # Staggered: short scenarios sit close together.
        ax.text(boundary.start_s, 0.99 - 0.2 * (index % 2), f" {boundary.scenario}", rotation=90, va="top",
                ha="left", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(title)
    if by_replica:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
