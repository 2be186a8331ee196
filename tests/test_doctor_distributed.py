"""`torchrun -m finite doctor`: every rank records, rank 0 writes one report of them all.

The end-to-end test launches two gloo ranks on the CPU with torchrun on a data-parallel
script whose rank 1 alone gets a corrupt sample; the report must name rank 1 and the
module that made the NaN. The other tests state how rank results are combined, on
hand-written histories.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from finite.diagnosis import Evidence, Finding
from finite.doctor.distributed import combine_reports, rank_disagreement
from finite.doctor.session import ModelReport
from finite.monitor import History, NonfiniteEvent

SCRIPTS = Path(__file__).parent / "doctor_scripts"


def rank_history(rank, losses, events=()):
    """One rank's history: a step per loss, and events given as (step, phase, origin, type)."""
    history = History("float32")
    history.extend(
        [
            {"step": step, "rank": rank, "loss": loss, "grad_norm": 1.0, "nonfinite_grads": 0}
            for step, loss in enumerate(losses)
        ],
        [
            NonfiniteEvent(step, phase, origin, kind, rank=rank)
            for step, phase, origin, kind in events
        ],
    )
    return history


def test_disagreement_names_the_rank_whose_forward_pass_made_the_nan():
    finding = rank_disagreement(
        {
            0: rank_history(0, [1.0, 0.9, 0.8, float("nan")], [(3, "forward", "1", "Linear")]),
            1: rank_history(1, [1.0, 0.9, float("nan")], [(2, "forward", "0", "Sqrt")]),
        }
    )
    assert finding is not None and finding.code == "rank_disagreement"
    assert "started on rank 1 at step 2" in finding.title
    assert "'0'" in finding.title
    assert [e.text.split(":")[0] for e in finding.evidence] == ["rank 0", "rank 1"]


def test_disagreement_when_only_one_rank_saw_inf():
    finding = rank_disagreement(
        {0: rank_history(0, [1.0, 0.9]), 1: rank_history(1, [1.0, float("inf")])}
    )
    assert finding is not None
    assert "rank 1" in finding.title
    assert finding.evidence[0].text == "rank 0: no inf/NaN"


def test_no_disagreement_when_every_rank_made_the_nan_alike():
    nan_at_1 = [(1, "forward", "0", "Sqrt")]
    same = {r: rank_history(r, [1.0, float("nan")], nan_at_1) for r in (0, 1)}
    assert rank_disagreement(same) is None
    assert rank_disagreement({r: rank_history(r, [1.0, 0.5]) for r in (0, 1)}) is None


def test_findings_are_tagged_with_their_ranks_and_merged_when_alike():
    def finding(title, severity="warning"):
        return Finding("some_rule", severity, title, (Evidence("x", step=1),))

    per_rank = {
        0: [ModelReport("Net", rank_history(0, [1.0]), [finding("shared"), finding("zero")])],
        1: [ModelReport("Net", rank_history(1, [1.0]), [finding("shared")])],
    }
    (report,) = combine_reports(per_rank)
    titles = [f.title for f in report.findings]
    assert titles == ["all 2 ranks: shared", "rank 0: zero"]
    assert sorted(set(report.history.steps["rank"].tolist())) == [0, 1]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_torchrun_report_is_written_once_by_rank_0_and_names_the_rank_that_made_the_nan(
    tmp_path,
):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "finite",
            "doctor",
            "--out",
            "rep",
            str(SCRIPTS / "ddp_one_rank_nan.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=80,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = tmp_path / "rep"
    assert (report / "report.html").is_file()
    assert run.stderr.count("finite doctor: report written to") == 1
    assert sorted(p.name for p in report.iterdir() if p.is_dir()) == []  # no per-rank folders
    lines = [json.loads(line) for line in (report / "history.jsonl").read_text().splitlines()]
    assert {line["rank"] for line in lines if line["kind"] == "step"} == {0, 1}
    findings = json.loads((report / "findings.json").read_text())
    disagreement = next(f for f in findings if f["code"] == "rank_disagreement")
    assert disagreement["title"].startswith("Ranks disagree: inf/NaN started on rank 1 at step 2")
    assert "'module.0'" in disagreement["title"]  # the Sqrt inside DistributedDataParallel
    first = findings[0]
    assert first["title"].startswith("rank 1: ") and first["code"] == "nonfinite_loss"
