"""``torchrun ... -m finite doctor train.py``: every rank records, rank 0 reports them all.

When the script ends, each rank has diagnosed its own monitors (with its model, optimizer
and scaler at hand). The ranks then exchange their results through a key-value store,
not a collective: the script may have destroyed its process group, and ranks that ended
differently (one raised, the others finished) must not wait on each other in a
collective. The store is, in this order:

1. torchrun's own store (``TORCHELASTIC_USE_AGENT_STORE=True``): a client
   ``TCPStore`` on ``MASTER_ADDR:MASTER_PORT``, which the torchrun agent keeps alive for
   the whole run, whether or not the script's process group still exists;
2. otherwise the store of the script's default process group, while it is initialised.

Each rank sets its pickled, zlib-compressed reports under its own key; rank 0 waits for
every rank (up to ``timeout`` seconds: a rank that does not answer is listed as missing),
combines them with :func:`combine_reports`, writes the report, and sets a *done* key;
the other ranks wait for it before they exit, so that torchrun does not stop rank 0 while
it writes because another rank exited with an error. With no store at all (a launcher
other than torchrun, and a destroyed process group), or when rank 0 does not answer,
each rank writes its own report to ``DIR/rank<k>/``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch.distributed as dist

from finite.diagnosis import SEVERITIES, Evidence, Finding
from finite.doctor.session import ModelReport
from finite.monitor import History

__all__ = [
    "GATHER_TIMEOUT_S",
    "Gathered",
    "NoStore",
    "combine_reports",
    "gather_reports",
    "rank_disagreement",
    "world",
]

#: Seconds rank 0 waits for the other ranks' results (and they for rank 0's report).
GATHER_TIMEOUT_S = 120.0

_PREFIX = "finite-doctor"


class NoStore(RuntimeError):
    """No store to exchange results through: neither torchrun's nor a process group's."""


@dataclass
class Gathered:
    """Rank 0's view after the exchange: the combined reports and who answered.

    Call :meth:`release` once the report is written: the other ranks wait for it.
    """

    reports: list[ModelReport]
    ranks: list[int]
    missing: list[int] = field(default_factory=list)
    store: Any = field(default=None, repr=False)
    prefix: str = ""

    def release(self) -> None:
        """Tell the other ranks that rank 0 is done (they may exit now)."""
        if self.store is not None:
            self.store.set(f"{self.prefix}/done", b"1")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: from an initialised process group, else
    from the ``RANK``/``WORLD_SIZE`` variables torchrun sets; ``(0, 1)`` without either."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _store(timeout: float) -> tuple[Any, str]:
    """The store to exchange through and the key prefix of this run (see module doc)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"{_PREFIX}/{run}/{restart}"
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and host and port:
        try:
            store = dist.TCPStore(
                host,
                int(port),
                is_master=False,
                timeout=timedelta(seconds=timeout),
                wait_for_workers=False,
            )
            return store, prefix
        except (RuntimeError, ValueError):
            pass
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store(), prefix
    raise NoStore("no torchrun store and no initialised process group")


def _pack(reports: Sequence[ModelReport], status: int) -> bytes:
    parts = [
        {
            "name": report.name,
            "format": report.history.format,
            "bins": report.history.bins,
            "records": report.history.records(),
            "events": list(report.history.events),
            "findings": list(report.findings),
            "clip_threshold": report.clip_threshold,
        }
        for report in reports
    ]
    return zlib.compress(pickle.dumps({"status": status, "reports": parts}))


def _unpack(blob: bytes) -> list[ModelReport]:
    data = pickle.loads(zlib.decompress(blob))  # written by this run's own ranks
    reports = []
    for part in data["reports"]:
        history = History(part["format"], part["bins"])
        history.extend(part["records"], part["events"])
        reports.append(ModelReport(part["name"], history, part["findings"], part["clip_threshold"]))
    return reports


def gather_reports(
    reports: Sequence[ModelReport],
    *,
    rank: int,
    world_size: int,
    status: int = 0,
    timeout: float = GATHER_TIMEOUT_S,
) -> Gathered | bool:
    """Exchange every rank's reports; rank 0 gets them combined.

    Returns
    -------
    Gathered or bool
        On rank 0, the :class:`Gathered` reports. On another rank, True once rank 0 has
        written the report, False when it did not say so within ``timeout`` (write this
        rank's own report then).

    Raises
    ------
    NoStore
        When there is no store to exchange through (write each rank's own report).
    """
    store, prefix = _store(timeout)
    store.set(f"{prefix}/rank{rank}", _pack(reports, status))
    done = f"{prefix}/done"
    if rank != 0:
        try:
            store.wait([done], timedelta(seconds=timeout))
        except RuntimeError:
            return False
        return True
    per_rank: dict[int, list[ModelReport]] = {0: list(reports)}
    missing = []
    for other in range(1, world_size):
        key = f"{prefix}/rank{other}"
        try:
            store.wait([key], timedelta(seconds=timeout))
            per_rank[other] = _unpack(store.get(key))
        except RuntimeError:
            missing.append(other)
    return Gathered(combine_reports(per_rank), sorted(per_rank), missing, store, prefix)


# ---------------------------------------------------------------------- combining
def combine_reports(per_rank: Mapping[int, Sequence[ModelReport]]) -> list[ModelReport]:
    """One report per model over all ranks: the histories concatenated (told apart by
    their ``rank`` column), the findings tagged with the ranks they hold on, and a
    ``rank_disagreement`` finding when the ranks saw inf/NaN differently.

    Models are matched by name (every rank runs the same script, so builds the same
    models in the same order).
    """
    names: list[str] = []
    for reports in per_rank.values():
        names.extend(r.name for r in reports if r.name not in names)
    combined = []
    for name in names:
        of_model = {
            rank: next(r for r in reports if r.name == name)
            for rank, reports in sorted(per_rank.items())
            if any(r.name == name for r in reports)
        }
        history = History.concat([r.history for r in of_model.values()])
        findings = _tag_findings({rank: r.findings for rank, r in of_model.items()})
        disagreement = rank_disagreement({rank: r.history for rank, r in of_model.items()})
        if disagreement is not None:
            findings.insert(_position(findings, disagreement), disagreement)
        threshold = next(
            (r.clip_threshold for r in of_model.values() if r.clip_threshold is not None), None
        )
        combined.append(ModelReport(name, history, findings, threshold))
    return combined


def _ranks_text(ranks: Sequence[int], world: Sequence[int]) -> str:
    if len(world) > 1 and list(ranks) == list(world):
        return f"all {len(world)} ranks"
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(str(r) for r in ranks)


def _tag_findings(per_rank: Mapping[int, Sequence[Finding]]) -> list[Finding]:
    """Findings of every rank, each titled with the ranks it holds on; one finding for
    the ranks whose finding has the same code and title (its evidence of the lowest)."""
    ranks = sorted(per_rank)
    groups: dict[tuple[str, str], list[tuple[int, Finding]]] = {}
    for rank in ranks:
        for finding in per_rank[rank]:
            groups.setdefault((finding.code, finding.title), []).append((rank, finding))
    tagged = []
    for members in groups.values():
        holders = [rank for rank, _ in members]
        finding = members[0][1]
        tagged.append(
            (
                holders[0],
                dataclasses.replace(
                    finding, title=f"{_ranks_text(holders, ranks)}: {finding.title}"
                ),
            )
        )
    tagged.sort(key=lambda item: (*_order(item[1]), item[0]))
    return [finding for _, finding in tagged]


def _order(finding: Finding) -> tuple[int, float]:
    step = finding.first_step
    return SEVERITIES.index(finding.severity), float("inf") if step is None else float(step)


def _position(findings: list[Finding], new: Finding) -> int:
    key = _order(new)
    return next((i for i, f in enumerate(findings) if _order(f) > key), len(findings))


@dataclass(frozen=True)
class _FirstBad:
    step: int
    phase: str  # "input", "forward", "backward" or "gradient" (a flag with no event)
    origin: str | None
    origin_type: str | None

    def text(self) -> str:
        where = f" in {self.origin!r} ({self.origin_type})" if self.origin else ""
        if self.phase == "gradient":
            return f"first inf/NaN gradients at step {self.step}"
        if self.phase == "loss":
            return f"first inf/NaN loss at step {self.step}"
        return f"inf/NaN first in the {self.phase} pass at step {self.step}{where}"


def _first_bad(history: History) -> _FirstBad | None:
    """Where one rank's history first shows inf/NaN, or None when it never does."""
    order = {"input": 0, "forward": 1, "backward": 2}
    events = sorted(history.events, key=lambda e: (e.step, order.get(e.phase, 3)))
    first = events[0] if events else None
    steps = history.steps
    flagged = None
    if len(steps):
        loss = steps["loss"].astype(float)
        grads = steps["nonfinite_grads"]
        bad = np.isinf(loss) | (grads > 0)
        if bad.any():
            index = int(np.argmax(bad))
            phase = "gradient" if grads[index] > 0 else "loss"
            flagged = _FirstBad(int(steps["step"][index]), phase, None, None)
    if first is not None and (flagged is None or first.step <= flagged.step):
        return _FirstBad(first.step, first.phase, first.origin, first.origin_type)
    return flagged


def rank_disagreement(per_rank: Mapping[int, History]) -> Finding | None:
    """A finding when the ranks did not see inf/NaN alike; None when they did.

    The ranks disagree when some saw inf/NaN and others none, or when some made it in
    their own forward pass (or got it as input) while the others first saw it in their
    gradients: with data parallelism each rank runs its own batch, and the gradient
    all-reduce carries one rank's inf/NaN to every rank.
    """
    ranks = sorted(per_rank)
    if len(ranks) < 2:
        return None
    first = {rank: _first_bad(per_rank[rank]) for rank in ranks}
    bad = [r for r in ranks if first[r] is not None]
    if not bad:
        return None
    earliest = min(first[r].step for r in bad)  # type: ignore[union-attr]
    makers = [
        r
        for r in bad
        if first[r].step == earliest and first[r].phase in ("input", "forward", "loss")  # type: ignore[union-attr]
    ]
    clean = [r for r in ranks if first[r] is None]
    if not clean and (not makers or len(makers) == len(ranks)):
        return None  # every rank saw it, and alike
    sources = makers or bad
    evidence = []
    for rank in ranks:
        seen = first[rank]
        evidence.append(
            Evidence(
                f"rank {rank}: {seen.text()}" if seen else f"rank {rank}: no inf/NaN",
                step=seen.step if seen else None,
                module=seen.origin if seen else None,
            )
        )
    source = sources[0]
    made = first[source]
    assert made is not None
    title = (
        f"Ranks disagree: inf/NaN started on {_ranks_text(sources, ranks)} "
        f"at step {made.step}" + (f" ({made.phase} pass, {made.origin!r})" if made.origin else "")
    )
    return Finding(
        code="rank_disagreement",
        severity="warning",
        title=title,
        evidence=tuple(evidence),
        cause=(
            "The ranks run the same model on different batches. Inf/NaN made by one "
            "rank's forward pass (or its input data) reaches the other ranks only through "
            "the gradient all-reduce: the averaged gradient turns their weights inf/NaN, "
            "so they see it one step later (the monitor measures each rank's own "
            "gradients, before the all-reduce), or not at all when nothing is averaged."
        ),
        fix=(
            f"Look at what is particular to {_ranks_text(sources, ranks)} at step "
            f"{made.step}: its batch (data shard, padding, an empty or corrupt sample) or "
            "a code path that only that rank takes; the findings tagged with that rank "
            "name the module."
        ),
    )
