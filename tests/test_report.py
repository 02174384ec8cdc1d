"""The report (``aimspax-like report RUN``): files, a self-contained page, strict JSON, numbers.

The finished tiny campaign is shared (session fixture, read-only): each test that writes a
report copies it first. Runs that are still going, were killed or hold analysis points are
made up from synthetic events, which is also how the report must cope with logs it does not
fully understand.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aimspax_like.analysis import correlation, series
from aimspax_like.analysis.report import make_report, write_report
from aimspax_like.analysis.run_record import load_run
from aimspax_like.analysis.strict_json import dumps_strict
from aimspax_like.analysis.summary import write_summary
from aimspax_like.cli import main
from aimspax_like.errors import RunDirectoryError

PNG = b"\x89PNG\r\n\x1a\n"


def strict_loads(text: str) -> object:
    """json.loads that refuses Infinity/NaN (what JavaScript and jq refuse too)."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


class _Page(HTMLParser):
    """Collects every attribute that can load something: img src, link href, script src, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.loads: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        if tag in ("script", "link", "iframe", "source", "video", "audio", "embed", "object"):
            self.loads.append(f"{tag} {values}")
        for key in ("src", "href", "data"):
            value = values.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.loads.append(f"{tag} {key}={value}")


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _synthetic_run(folder: Path, n_points: int = 40, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """A run directory of a killed campaign: campaign.yaml and events only (no results, no summary)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "campaign.yaml").write_text("seed: 1\nal:\n  analysis_every: 10\n")
    t = 1.0e9
    events: list[dict] = [{"t": t, "event": "campaign_start", "phases": ["idg", "al"], "resume": False},
                          {"t": t + 1, "event": "executor_started", "kind": "thread", "n_workers": 2},
                          {"t": t + 2, "event": "phase_start", "phase": "al", "trajectories": 2}]
    delta = rng.uniform(0.02, 0.5, n_points)
    error = 1.3 * delta + rng.normal(0, 0.05, n_points)
    for k in range(n_points):
        t += 1.0
        trajectory, step = k % 2, 10 * (k // 2 + 1)
        threshold = "inf" if k < 4 else 0.2
        events.append({"t": t, "event": "uncertainty", "trajectory": trajectory, "step": step,
                       "delta": float(delta[k]), "threshold": threshold})
        events.append({"t": t, "event": "label_submitted", "phase": "analysis", "label": k,
                       "trajectory": trajectory, "step": step, "delta": float(delta[k]), "threshold": threshold})
        events.append({"t": t + 0.5, "event": "label_done", "phase": "analysis", "label": k,
                       "trajectory": trajectory, "wall_s": 0.1})
        events.append({"t": t + 0.5, "event": "analysis_point", "phase": "al", "source": "analysis", "label": k,
                       "trajectory": trajectory, "step": step, "delta": float(delta[k]), "threshold": threshold,
                       "true_error": float(error[k]), "train_size": 10 + k // 4})
        if k % 4 == 3:
            events.append({"t": t + 0.6, "event": "training_round", "phase": "al", "epochs": 1,
                           "train_size": 10 + k // 4,
                           "members": [{"member": m, "valid_force_mae": 0.3 / (k + 1) + 0.01 * m,
                                        "valid_energy_mae_per_atom": 0.01} for m in range(2)]})
    events.append({"t": t + 1, "event": "label_failed", "phase": "al", "kind": "scf_not_converged", "retry": False})
    events.append({"t": t + 1, "event": "md_unstable", "trajectory": 0, "step": 5, "reason": "bond stretched"})
    (folder / "logs").mkdir()
    text = "".join(json.dumps(e) + "\n" for e in events)
    (folder / "logs/events.jsonl").write_text(text + '{"t": 1000000999.0, "event": "uncert')  # torn by a kill
    return folder, delta, error


# ----------------------------------------------------------------------------- the finished campaign


def test_campaign_end_writes_the_report(finished_campaign):
    run, _ = finished_campaign
    assert (run / "report/index.html").is_file()
    assert (run / "report/figures/learning_curves.png").read_bytes().startswith(PNG)
    names = {e["event"] for e in load_run(run).events}
    assert "report_failed" not in names


def test_report_files_are_valid_and_the_page_self_contained(finished_campaign, tmp_path):
    run = _copy(finished_campaign[0], tmp_path)
    report = make_report(run)
    assert report.index == run / "report/index.html" and report.markdown == run / "report/summary.md"
    assert {f.file.name for f in report.figures} >= {"trajectories.png", "learning_curves.png",
                                                      "labels_and_workers.png", "wall_time.png", "cpu_profile.png"}
    for figure in report.figures:
        assert figure.file.read_bytes().startswith(PNG), figure.file
        assert figure.caption and figure.title
    page = _Page()
    page.feed(report.index.read_text(encoding="utf-8"))
    assert len(page.images) == len(report.figures)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG)
    assert page.loads == [], page.loads  # nothing fetched: no scripts, style sheets, remote images
    markdown = report.markdown.read_text(encoding="utf-8")
    assert "## Test-set errors" in markdown and "figures/learning_curves.png" in markdown


def test_summary_json_is_strict(finished_campaign, tmp_path):
    strict_loads((finished_campaign[0] / "report/summary.json").read_text())
    # The AL threshold is infinite while it warms up: written as "inf", never as Infinity.
    write_summary(tmp_path, {**finished_campaign[1], "al": {**(finished_campaign[1].get("al") or {}),
                                                         "threshold": math.inf, "nan": math.nan}})
    text = (tmp_path / "summary.json").read_text()
    data = strict_loads(text)
    assert data["al"]["threshold"] == "inf" and data["al"]["nan"] is None
    assert "Infinity" not in text and "NaN" not in text
    assert strict_loads(dumps_strict({"a": [np.float64(-np.inf), np.int64(3)]})) == {"a": ["-inf", 3]}


def test_report_without_summary_and_with_a_torn_event_line(finished_campaign, tmp_path):
    run = _copy(finished_campaign[0], tmp_path)
    (run / "report/summary.json").unlink()
    with (run / "logs/events.jsonl").open("a") as log:
        log.write('{"t": 1.0, "event": "label_do')
    index = write_report(run)
    text = (run / "report/summary.md").read_text()
    assert "no summary yet" in text and load_run(run).status in ("stopped", "killed")
    assert index.read_text().count("data:image/png;base64,") >= 4


# ----------------------------------------------------------------------------- synthetic runs


def test_pearson_r_of_analysis_points_is_numpys(tmp_path):
    run, delta, error = _synthetic_run(tmp_path / "run")
    record = load_run(run)
    points = series.analysis_points(record.events)
    assert len(points) == len(delta)
    rows = correlation.per_trajectory(points)
    assert rows[-1]["trajectory"] is None
    assert rows[-1]["r"] == pytest.approx(np.corrcoef(delta, error)[0, 1], abs=1e-12)
    for row in rows[:-1]:
        mine = np.arange(len(delta)) % 2 == row["trajectory"]
        assert row["r"] == pytest.approx(np.corrcoef(delta[mine], error[mine])[0, 1], abs=1e-12)
    segments = correlation.segments(points)
    assert len(segments) == 5 and all(s.n >= 8 for s in segments)
    order = np.argsort(points.step, kind="stable")
    first = order[: segments[0].n]
    assert segments[0].r == pytest.approx(np.corrcoef(points.delta[first], points.true_error[first])[0, 1])
    assert correlation.pearson_r(np.ones(5), np.arange(5.0)) is None  # constant: no r, not NaN
    # The warm-up's "inf" threshold reads as no threshold, not as a number.
    assert np.isnan(points.threshold[:4]).all() and points.threshold[5] == 0.2


def test_report_of_a_killed_run_from_events_alone(tmp_path):
    run, delta, error = _synthetic_run(tmp_path / "run")
    report = make_report(run)
    names = {f.file.name for f in report.figures}
    assert {"error_vs_uncertainty.png", "correlation_segments.png", "trajectories.png",
            "learning_curves.png", "failures_and_guards.png"} <= names
    assert report.notes == []
    html = report.index.read_text()
    r = np.corrcoef(delta, error)[0, 1]
    assert f"<td>all</td><td>{len(delta)}</td><td>{r:.3f}</td>" in html
    assert load_run(run).status == "killed" and "no summary yet" in html


def test_validation_json_is_rendered(tmp_path):
    run, _, _ = _synthetic_run(tmp_path / "run")
    (run / "report").mkdir()
    Image.new("RGB", (40, 30), "white").save(run / "report/validation_parity.png")
    errors = {"frames": 6, "energy_mae_per_atom": 0.0012, "energy_rmse_per_atom": 0.002, "force_mae": 0.051,
              "force_rmse": 0.07, "stress_mae": None, "stress_rmse": None}
    (run / "report/validation.json").write_text(json.dumps({
        "model": "models/best.model", "test_set": {"source": "data/test.xyz", "frames": 6},
        "errors": {"per_temperature": [{"temperature_K": 300.0, **errors}], "all": {"temperature_K": None, **errors},
                   "per_element": [{"element": "Cu", "atoms": 24, "force_mae": 0.05, "force_rmse": 0.06}]},
        "stability": {"criterion": "no bond beyond 2x its length", "steps": 1000, "timestep_fs": 1.0, "runs": 2,
                      "per_temperature": [{"temperature_K": 300.0, "stable": 2, "runs": 2}]},
        "rdf": None,
        "figures": [{"file": "validation_parity.png", "caption": "parity of forces"},
                    {"file": "../../outside.png", "caption": "not inside report/: ignored"}],
    }))
    html = make_report(run).index.read_text()
    assert "Validation errors" in html and "<td>51.0</td>" in html and "<td>Cu</td>" in html
    assert "2 / 2" in html and "parity of forces" in html
    page = _Page()
    page.feed(html)
    assert page.loads == []


# ----------------------------------------------------------------------------- CLI


def test_cli_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "campaign.yaml" in err[0]
    assert list(folder.iterdir()) == []
    with pytest.raises(RunDirectoryError):
        make_report(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_cli_report_prints_the_paths_it_wrote(tmp_path, capsys):
    run, _, _ = _synthetic_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    assert printed[0] == run / "report/index.html"
    assert all(path.is_file() for path in printed)
