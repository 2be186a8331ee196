"""write_report: the files of a report, what the page holds, and that a browser renders it."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from browser import CHROMIUM, chromium, rendered_images
from finite.diagnosis.finding import PLOTS, Evidence, Finding
from finite.monitor import History, Monitor, Table
from finite.report import FINDING_FIELDS, make_plots, write_report
from finite.scaling import LossScaler

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed (pip install 'finite[plot]')",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
POISONED_STEP = 12


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- fixtures


def monitored_run(steps: int = 24) -> History:
    """A tiny MLP trained in float16 statistics with a loss scaler; one step poisoned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = LossScaler(init_scale=2.0**8)
    generator = torch.Generator().manual_seed(1)
    with Monitor(
        model, optimizer, scaler=scaler, precision="float16", histograms_every=5
    ) as monitor:
        for step in range(steps):
            x = torch.randn(16, 4, generator=generator)
            loss = (model(x) - x[:, :1]).square().mean()
            if step == POISONED_STEP:
                loss = loss * math.inf
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            monitor.step(loss)
        return monitor.history


def example_findings() -> list[Finding]:
    return [
        Finding(
            code="nonfinite_loss",
            severity="critical",
            title="The loss became inf at step 12",
            evidence=(
                Evidence("loss inf at step 12", step=12, value=math.inf, plot="loss"),
                Evidence("the scaler skipped step 12", step=12, plot="loss_scale"),
            ),
            cause="The loss code multiplied by inf.",
            fix="Find the operation with finite.locate.",
            references=(
                "Micikevicius et al., Mixed Precision Training, https://arxiv.org/abs/1710.03740",
            ),
        ),
        Finding(
            code="exploding_gradients",
            severity="warning",
            title="Gradient norm <grew> 100x & more",
            evidence=(
                Evidence(
                    "norm of 2.weight",
                    step=3,
                    module="2.weight",
                    value=float("nan"),
                    plot="grad_norm_heatmap",
                ),
                Evidence("no plot for this one", value=1.5),
            ),
            cause="No clipping.",
            fix="Clip at 1.0.",
        ),
    ]


@pytest.fixture(scope="module")
def history() -> History:
    return monitored_run()


@pytest.fixture(scope="module")
def report_dir(history, tmp_path_factory) -> Path:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install 'finite[plot]')")
    out = tmp_path_factory.mktemp("report")
    write_report(history, example_findings(), out, clip_threshold=1.0)
    return out


def records(steps: int, rank: int = 0, params: bool = True) -> list[dict]:
    """Hand-made history.jsonl step records: a decreasing loss, one parameter."""
    out = []
    for step in range(steps):
        record = {
            "step": step,
            "rank": rank,
            "loss": 1.0 / (step + 1),
            "loss_scale": math.nan,
            "skipped": False,
            "measured": True,
            "grad_norm": 0.5,
            "nonfinite_grads": 0,
        }
        if params:
            record["params"] = {
                "w": {
                    "numel": 4,
                    "grad_norm": 0.5,
                    "grad_nonfinite": 0,
                    "weight_norm": 2.0,
                    "update_norm": 0.01,
                    "update_ratio": 0.005,
                }
            }
        out.append(record)
    return out


class PageParser(HTMLParser):
    """Tags, attributes, ids and the anchors inside each finding of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.ids: list[str] = []
        self.finding_links: dict[str, list[str]] = {}
        self._finding: str | None = None
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if attributes.get("id"):
            self.ids.append(attributes["id"])
        if tag == "article" and (attributes.get("id") or "").startswith("finding-"):
            self._finding, self._depth = attributes["id"], 0
            self.finding_links[self._finding] = []
        elif self._finding is not None:
            if tag == "a":
                self.finding_links[self._finding].append(attributes.get("href") or "")
        if self._finding is not None and tag == "article":
            self._depth += 1

    def handle_endtag(self, tag):
        if self._finding is not None and tag == "article":
            self._depth -= 1
            if self._depth == 0:
                self._finding = None


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


def strict_json(text: str):
    def reject(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=reject)


def equal_with_nan(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype == object or b.dtype == object:
        return a.shape == b.shape and a.tolist() == b.tolist()
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


# ---------------------------------------------------------------------------- files


@needs_matplotlib
def test_the_report_directory_holds_the_page_findings_history_and_a_png_per_plot(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert names == {"report.html", "findings.json", "history.jsonl"} | {f"{p}.png" for p in PLOTS}
    for plot in PLOTS:
        assert (report_dir / f"{plot}.png").read_bytes().startswith(PNG_SIGNATURE)


@needs_matplotlib
def test_write_report_returns_the_path_of_the_page(history, tmp_path):
    assert write_report(history, [], tmp_path / "a" / "b") == tmp_path / "a" / "b" / "report.html"


@needs_matplotlib
def test_findings_json_is_strict_json_with_every_finding_in_order(report_dir):
    data = strict_json((report_dir / "findings.json").read_text(encoding="utf-8"))
    assert [list(item) for item in data] == [list(FINDING_FIELDS)] * 2
    assert data[0] == {
        "code": "nonfinite_loss",
        "severity": "critical",
        "title": "The loss became inf at step 12",
        "evidence": [
            {
                "text": "loss inf at step 12",
                "step": 12,
                "module": None,
                "value": None,  # strict JSON has no inf
                "plot": "loss",
            },
            {
                "text": "the scaler skipped step 12",
                "step": 12,
                "module": None,
                "value": None,
                "plot": "loss_scale",
            },
        ],
        "cause": "The loss code multiplied by inf.",
        "fix": "Find the operation with finite.locate.",
        "references": [
            "Micikevicius et al., Mixed Precision Training, https://arxiv.org/abs/1710.03740"
        ],
    }
    assert data[1]["evidence"][0]["value"] is None
    assert data[1]["evidence"][1] == {
        "text": "no plot for this one",
        "step": None,
        "module": None,
        "value": 1.5,
        "plot": None,
    }


@needs_matplotlib
def test_findings_given_as_dicts_are_written_like_findings(history, tmp_path):
    dicts = [finding.to_dict() for finding in example_findings()]
    dicts[1]["evidence"][1]["value"] = -math.inf  # a hand-made dict may hold one
    write_report(history, dicts, tmp_path)
    written = strict_json((tmp_path / "findings.json").read_text(encoding="utf-8"))
    assert [item["title"] for item in written] == [f.title for f in example_findings()]
    assert written[1]["evidence"][1]["value"] is None


@needs_matplotlib
def test_history_jsonl_reads_back_into_the_same_history(history, report_dir):
    back = History.from_jsonl(report_dir / "history.jsonl")
    assert back.format == "float16" and back.bins == history.bins
    for table in ("steps", "modules", "params", "histograms"):
        original, read = getattr(history, table), getattr(back, table)
        assert read.columns == original.columns
        for column in original.columns:
            assert equal_with_nan(read[column], original[column]), (table, column)
    assert back.events == history.events
    assert len(back.steps) == 24 and len(back.events) == 1  # the run itself was recorded


@needs_matplotlib
def test_every_finding_diagnose_makes_is_in_the_page_and_in_findings_json(history, tmp_path):
    from finite.diagnosis import diagnose

    findings = diagnose(history)
    assert findings  # the poisoned step gives at least one finding
    write_report(history, findings, tmp_path)
    written = strict_json((tmp_path / "findings.json").read_text(encoding="utf-8"))
    assert [item["code"] for item in written] == [f.code for f in findings]
    assert [item["title"] for item in written] == [f.title for f in findings]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    ids = parse(page).ids
    assert [f"finding-{i}" for i in range(len(findings))] == [
        i for i in ids if i.startswith("finding-")
    ]
    for finding in findings:
        assert f"{finding.code}</span>" in page


# ---------------------------------------------------------------------------- the page


@needs_matplotlib
def test_the_page_shows_every_finding_with_its_cause_fix_and_references(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    for finding in example_findings():
        assert f"{finding.code}</span>" in page
        for text in (finding.cause, finding.fix):
            assert text in page
    assert "Gradient norm &lt;grew&gt; 100x &amp; more" in page  # escaped, not markup
    assert "arxiv.org/abs/1710.03740" in page


@needs_matplotlib
def test_findings_come_first_in_the_given_order(report_dir):
    ids = parse((report_dir / "report.html").read_text(encoding="utf-8")).ids
    assert ids.index("findings") < ids.index("finding-0") < ids.index("finding-1")
    assert ids.index("finding-1") < ids.index("plots")


@needs_matplotlib
def test_each_evidence_links_to_the_section_of_its_plot(report_dir):
    parser = parse((report_dir / "report.html").read_text(encoding="utf-8"))
    assert parser.finding_links["finding-0"] == ["#plot-loss", "#plot-loss_scale"]
    assert parser.finding_links["finding-1"] == ["#plot-grad_norm_heatmap"]
    assert {f"plot-{name}" for name in PLOTS} <= set(parser.ids)
    internal = [a.get("href") for tag, a in parser.tags if tag == "a"]
    assert all(href.startswith("#") and href[1:] in parser.ids for href in internal)


@needs_matplotlib
def test_the_page_has_no_external_url_and_no_script(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    parser = parse(page)
    assert not [tag for tag, _ in parser.tags if tag in ("script", "link", "iframe", "object")]
    for tag, attributes in parser.tags:
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            value = attributes.get(name)
            if value is not None:
                assert value.startswith(("#", "data:image/png;base64,")), (tag, name, value)
    assert not re.search(r"(?i)https?:|ftp:|url\(|@import", page)


@needs_matplotlib
def test_the_images_on_the_page_are_the_pngs_in_the_directory(report_dir):
    parser = parse((report_dir / "report.html").read_text(encoding="utf-8"))
    images = [a["src"] for tag, a in parser.tags if tag == "img"]
    embedded = sorted(base64.b64decode(src.split(",", 1)[1]) for src in images)
    files = sorted((report_dir / f"{name}.png").read_bytes() for name in PLOTS)
    assert embedded == files


@needs_matplotlib
def test_the_pngs_are_not_blank_and_carry_no_address(report_dir):
    from matplotlib.image import imread

    for name in PLOTS:
        data = (report_dir / f"{name}.png").read_bytes()
        assert b"http" not in data
        pixels = imread(io.BytesIO(data))[..., :3]
        assert pixels.std() > 0.05, name
        assert (pixels.min(axis=2) < 0.5).mean() > 0.001, name  # some dark ink


@needs_matplotlib
def test_the_non_finite_event_is_on_the_page(history, report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert (
        f"step {POISONED_STEP}: forward pass made inf/NaN first in &#x27;&lt;loss&gt;&#x27;" in page
    )


# ---------------------------------------------------------------------------- partial histories


@needs_matplotlib
def test_an_empty_history_gives_a_report_with_every_plot_omitted_and_a_note(tmp_path):
    write_report(History(), [], tmp_path)
    assert not list(tmp_path.glob("*.png"))
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count('<p class="omitted">Not plotted: ') == len(PLOTS)
    assert "No findings" in page
    assert strict_json((tmp_path / "findings.json").read_text(encoding="utf-8")) == []
    assert len(History.from_jsonl(tmp_path / "history.jsonl").steps) == 0


@needs_matplotlib
def test_a_history_without_parameters_plots_only_the_step_columns(tmp_path):
    history = History("bfloat16")
    history.extend(records(10, params=False))
    write_report(history, [], tmp_path)
    assert {p.stem for p in tmp_path.glob("*.png")} == {"loss", "grad_norm"}
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Not plotted: no loss scaler was monitored" in page
    assert "Not plotted: no histograms were recorded" in page


@needs_matplotlib
def test_a_missing_column_omits_its_plot_with_a_note_naming_it():
    class NoLoss(History):
        @property
        def steps(self) -> Table:
            table = super().steps
            return Table({c: table[c] for c in table.columns if c != "loss"})

    history = NoLoss("float16")
    history.extend(records(5))
    plots = {plot.name: plot for plot in make_plots(history)}
    assert plots["loss"].png is None
    assert "'loss'" in plots["loss"].note
    assert plots["grad_norm"].png is not None and plots["update_ratio"].png is not None


@needs_matplotlib
def test_a_history_of_non_finite_values_still_gives_a_report(tmp_path):
    history = History("float16")
    rows = records(6)
    for row in rows[3:]:
        row.update(loss=math.inf, grad_norm=math.nan, nonfinite_grads=1)
        row["params"]["w"].update(grad_norm=math.inf, update_ratio=math.nan)
    history.extend(rows)
    write_report(history, [], tmp_path)
    assert {p.stem for p in tmp_path.glob("*.png")} == {
        "loss",
        "grad_norm",
        "grad_norm_heatmap",
        "update_ratio",
    }
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "3 steps without a finite loss" in page


@needs_matplotlib
def test_several_ranks_are_plotted_for_the_lowest_with_a_note():
    history = History("float16")
    history.extend(records(4, rank=1) + records(4, rank=0))
    plots = {plot.name: plot for plot in make_plots(history)}
    assert "rank 0 of 2 ranks shown" in plots["loss"].note


@needs_matplotlib
def test_a_png_left_by_an_earlier_report_is_removed_when_its_plot_is_omitted(history, tmp_path):
    write_report(history, [], tmp_path)
    assert (tmp_path / "histograms.png").exists()
    write_report(History(), [], tmp_path)
    assert not list(tmp_path.glob("*.png"))


class OneMinusP(nn.Module):
    """``1 - sigmoid(x)`` for large ``x``: cancellation, in half precision all signal is lost."""

    def forward(self, x):
        return 1.0 - torch.sigmoid(x)


def precision_report():
    from finite.diagnosis.compare_precision import compare_precision

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), OneMinusP(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].bias.fill_(9.0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    return compare_precision(model, (x, y), nn.functional.mse_loss)


@needs_matplotlib
def test_a_precision_report_shows_its_verdict_dtypes_and_modules(history, tmp_path):
    report = precision_report()
    write_report(history, [], tmp_path, precision_report=report)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    section = page[page.index('id="precision"') : page.index('id="plots"')]
    header = "<tr><th>dtype</th><th>loss</th><th>loss error</th><th>gradient error</th>"
    assert header in section
    for dtype in report.dtypes:
        assert f"<tr><td>{dtype}</td>" in section
    assert report.keep_in_float32  # the cancellation is there to be named
    kept = section.split("Keep in float32:</span> ", 1)[1].split("</p>", 1)[0]
    assert kept == ", ".join(report.keep_in_float32)
    worst = report.rows[0]
    assert f"<td>{worst['dtype']}</td><td>{worst['module']}</td><td>{worst['type']}</td>" in section
    if report.precision_problem:
        verdict = "A precision problem: fails in"
    elif report.reference_failed:
        verdict = "Not a precision problem"
    else:
        verdict = "No dtype fails on this batch."
    assert verdict in section


def test_a_precision_report_without_to_dict_is_refused(history, tmp_path):
    with pytest.raises(TypeError, match="precision_report must be a PrecisionReport"):
        write_report(history, [], tmp_path / "out", precision_report=[1, 2])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        (
            {"history": {"steps": []}},
            TypeError,
            "history must be a finite.monitor.History, got dict",
        ),
        ({"findings": 3}, TypeError, "findings must be an iterable of Finding, got int"),
        ({"findings": "oops"}, TypeError, "findings must be an iterable of Finding, got str"),
        ({"findings": [1.0]}, TypeError, r"findings\[0\] must be a Finding or a dict, got float"),
        ({"findings": [{"code": "x"}]}, ValueError, r"findings\[0\] lacks the keys"),
        ({"out_dir": 7}, TypeError, "out_dir must be a str or os.PathLike, got int"),
        ({"clip_threshold": -1.0}, ValueError, "clip_threshold must be finite and > 0, got -1.0"),
        ({"clip_threshold": "1"}, TypeError, "clip_threshold must be a number or None, got str"),
    ],
)
def test_bad_arguments_are_named_in_the_error_and_nothing_is_written(
    arguments, error, match, tmp_path
):
    call = {"history": History(), "findings": [], "out_dir": tmp_path / "out", **arguments}
    with pytest.raises(error, match=match):
        write_report(**call)
    assert not (tmp_path / "out").exists()


def test_without_matplotlib_write_report_names_the_extra_and_writes_nothing(monkeypatch, tmp_path):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'finite[plot]'")):
        write_report(History(), [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- in a browser


@pytest.mark.slow
@needs_matplotlib
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_chromium_renders_the_page_with_every_plot_decoded(report_dir, tmp_path):
    from matplotlib.image import imread

    images, broken, _ = rendered_images(report_dir / "report.html", tmp_path / "profile")
    assert (images, broken) == (len(PLOTS), 0)

    screenshot = tmp_path / "page.png"
    chromium(
        f"--screenshot={screenshot}",
        "--window-size=1200,2000",
        (report_dir / "report.html").as_uri(),
        profile=tmp_path / "profile",
    )
    pixels = imread(screenshot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05  # not one colour
    # The plots' blue lines and bars (matplotlib's tab:blue, #1f77b4) are on screen.
    blue = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.3) & (pixels[..., 1] > 0.35)
    assert blue.sum() > 500
