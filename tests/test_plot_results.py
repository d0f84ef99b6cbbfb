"""tools/plot_results.py and megatron_vlm.experiments.plots: each figure type from a small
synthetic results table; the plotted points are the table's, the PNGs are written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megatron_vlm.experiments.plots import figure_data, pick_kinds, plot_table, render
from megatron_vlm.experiments.results_table import ResultsTable, read_table, write_csv

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def table_csv(tmp_path: Path, axes: list[str], rows: list[dict], metrics: list[str],
              name: str = "results.csv") -> Path:
    table = ResultsTable("synthetic_sweep", axes, metrics)
    for i, values in enumerate(rows):
        row = {"sweep": "synthetic_sweep", "run": f"run{i}", "status": "ok", "step": 10,
               "results": f"/r/{i}/results.json", **{m: None for m in metrics}}
        row.update(values)
        table.rows.append(row)
    return write_csv(table, tmp_path / name)


def checkpoint_table(tmp_path):
    rows = []
    for scale, offset in (("79m", 0.0), ("1b", 0.1)):
        for pct in (20, 40, 60, 80, 100):
            rows.append({"scale": scale, "text_checkpoint": pct,
                         "stable_score.vision": offset + pct / 1000,
                         "stable_score.text": offset + 0.3 - pct / 2000,
                         "vision.vqav2": 0.5 + pct / 1000, "text.arc_easy": 0.4})
    rows[2]["stable_score.vision"] = None  # not evaluated yet: left out of the plot
    return read_table(table_csv(tmp_path, ["scale", "text_checkpoint"], rows,
                                ["stable_score.vision", "stable_score.text", "vision.vqav2",
                                 "text.arc_easy"]))


def test_metric_against_text_checkpoint_plots_the_tables_points(tmp_path):
    table = checkpoint_table(tmp_path)
    assert pick_kinds(table) == ["text_checkpoint", "tasks"]
    data = figure_data(table, "text_checkpoint")
    assert [p.title for p in data.panels] == ["vision stable score", "text stable score"]
    for panel, metric in zip(data.panels, ("stable_score.vision", "stable_score.text")):
        assert [s.label for s in panel.series] == ["scale=79m", "scale=1b"]
        for series in panel.series:
            scale = series.label.split("=")[1]
            expected = sorted((r["text_checkpoint"], r[metric]) for r in table.rows
                              if r["scale"] == scale and r[metric] is not None)
            assert list(zip(series.x, series.y)) == expected
            assert series.hollow == [x == 100 for x in series.x]
    assert data.panels[0].series[0].x == [20, 40, 80, 100]  # the empty cell is left out
    fig = render(data, table.sweep)
    for ax, panel in zip(fig.axes, data.panels):
        drawn = [line.get_xydata().tolist() for line in ax.lines]
        assert drawn == [[[x, y] for x, y in zip(s.x, s.y)] for s in panel.series]
        assert ax.get_xlabel() == "text checkpoint (% of text pre-training)"
        assert ax.get_title() == panel.title and ax.get_ylabel() == "stable score"
        assert ax.get_legend() is not None
    assert "synthetic_sweep" in fig._suptitle.get_text()


@pytest.mark.parametrize("axis", ["image_ratio", "instruction_fraction", "finetune_epochs"])
def test_each_line_axis_is_its_own_figure(tmp_path, axis):
    values = {"image_ratio": [0.3, 0.05, 0.1], "instruction_fraction": [0.0, 0.5, 0.25],
              "finetune_epochs": [4, 1, 2]}[axis]
    rows = [{axis: v, "stable_score.vision": 0.2 + v / 10, "stable_score.text": 0.1 * i}
            for i, v in enumerate(values)]
    table = read_table(table_csv(tmp_path, [axis], rows, ["stable_score.vision",
                                                           "stable_score.text"]))
    assert pick_kinds(table) == [axis]  # no task columns: no task bars
    data = figure_data(table, axis)
    vision, text = data.panels
    assert vision.series[0].x == sorted(values)
    assert vision.series[0].y == [0.2 + v / 10 for v in sorted(values)]
    order = sorted(range(len(values)), key=lambda i: values[i])
    assert text.series[0].y == [0.1 * i for i in order]
    assert not any(vision.series[0].hollow)


def ablation_rows(vqa: str, arc: str) -> list[dict]:
    rows = []
    for k, (encoder, projector) in enumerate([("frozen", "mlp2"), ("frozen", "linear"),
                                              ("unfrozen", "mlp2"), ("unfrozen", "linear")]):
        rows.append({"text_checkpoint": 80, "encoder": encoder, "projector": projector,
                     "stable_score.vision": 0.40 + k / 100, "stable_score.text": 0.15 - k / 100,
                     vqa: 0.70 + k / 50, arc: 0.50 + k / 40, "text.other": 0.3})
    return rows


@pytest.mark.parametrize("vqa, arc", [("vision.vqav2", "text.arc_easy"),
                                      ("vision.shapesworld_vqa", "text.shapesworld_arith")])
def test_seed_ablation_compares_the_four_arms_on_four_metrics(tmp_path, vqa, arc):
    metrics = ["stable_score.vision", "stable_score.text", vqa, arc, "text.other"]
    path = table_csv(tmp_path, ["text_checkpoint", "encoder", "projector"],
                     ablation_rows(vqa, arc), metrics)
    table = read_table(path)
    assert pick_kinds(table) == ["ablation", "tasks"]
    data = figure_data(table, "ablation")
    assert [p.series[0].y for p in data.panels] == [
        [r[m] for r in table.rows] for m in ("stable_score.vision", "stable_score.text", vqa, arc)]
    cats = ["frozen / mlp2", "frozen / linear", "unfrozen / mlp2", "unfrozen / linear"]
    assert all(p.categories == cats and p.series[0].x == cats for p in data.panels)
    fig = render(data, table.sweep)
    for ax, panel in zip(fig.axes, data.panels):
        heights = [patch.get_height() for patch in ax.patches]
        assert heights == pytest.approx(panel.series[0].y)
        assert [t.get_text() for t in ax.get_xticklabels()] == cats


def test_tasks_figure_has_one_bar_per_grid_point_and_task(tmp_path):
    metrics = ["stable_score.vision", "stable_score.text", "vision.vqav2", "text.arc_easy",
               "text.other"]
    table = read_table(table_csv(tmp_path, ["text_checkpoint", "encoder", "projector"],
                                 ablation_rows("vision.vqav2", "text.arc_easy"), metrics))
    data = figure_data(table, "tasks")
    vision, text = data.panels
    assert vision.categories == ["vqav2"] and text.categories == ["arc_easy", "other"]
    assert [s.label for s in text.series] == [r["run"] for r in table.rows]
    assert [s.y for s in text.series] == [[r["text.arc_easy"], r["text.other"]]
                                          for r in table.rows]


def test_plot_results_writes_a_png_per_figure(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("plot_tool", REPO / "tools" / "plot_results.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    checkpoint_table(tmp_path)
    out = tmp_path / "plots"
    assert tool.main([str(tmp_path / "results.csv"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tasks.png", "text_checkpoint.png"]
    for png in out.iterdir():
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 5000
    assert tool.main([str(tmp_path / "results.csv"), "--out", str(out), "--kind",
                      "text_checkpoint", "--metrics", "vision.vqav2", "text.arc_easy"]) == 0
    with pytest.raises(ValueError, match="needs a finetune_epochs column"):
        tool.main([str(tmp_path / "results.csv"), "--out", str(out), "--kind",
                   "finetune_epochs"])
    with pytest.raises(ValueError, match="not columns of the table"):
        tool.main([str(tmp_path / "results.csv"), "--out", str(out), "--metrics", "vision.gqa"])
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / "results.csv"), "--out", str(out), "--kind", "scatter"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--help"])
    assert exit_.value.code == 0 and "--kind" in capsys.readouterr().out


def test_every_kind_renders_to_png(tmp_path):
    metrics = ["stable_score.vision", "stable_score.text", "vision.vqav2", "text.arc_easy",
               "text.other"]
    rows = [{**r, "finetune_epochs": 1 + i % 2, "image_ratio": 0.1 * (1 + i // 2)}
            for i, r in enumerate(ablation_rows("vision.vqav2", "text.arc_easy"))]
    table = read_table(table_csv(tmp_path, ["image_ratio", "encoder", "projector",
                                            "finetune_epochs"], rows, metrics))
    written = plot_table(table, tmp_path / "all", ["image_ratio", "finetune_epochs", "tasks",
                                                   "ablation"])
    assert [p.name for p in written] == ["image_ratio.png", "finetune_epochs.png", "tasks.png",
                                         "ablation.png"]
    assert all(p.read_bytes().startswith(PNG) for p in written)


def test_intervals_in_the_table_become_error_bars(tmp_path):
    """A metric's _lo/_hi columns (the 95% intervals of results.json) are drawn as error bars
    around exactly the table's points."""
    rows = []
    for i, pct in enumerate((20, 40, 60)):
        value = 0.1 * (i + 1)
        rows.append({"text_checkpoint": pct, "stable_score.vision": value,
                     "stable_score.vision_lo": value - 0.02, "stable_score.vision_hi": value + 0.05,
                     "vision.vqav2": 0.5, "vision.vqav2_lo": None, "vision.vqav2_hi": None})
    path = table_csv(tmp_path, ["text_checkpoint"], rows, ["stable_score.vision", "vision.vqav2"])
    table = read_table(path)
    assert table.metrics == ["stable_score.vision", "vision.vqav2"]
    (panel,) = figure_data(table, "text_checkpoint", ["stable_score.vision"]).panels
    (series,) = panel.series
    assert series.intervals == [pytest.approx((v - 0.02, v + 0.05)) for v in (0.1, 0.2, 0.3)]
    fig = render(figure_data(table, "text_checkpoint", ["stable_score.vision"]), "s")
    (ax,) = fig.axes
    bars = [c for c in ax.collections if c.get_segments()]
    assert [tuple(seg[:, 1]) for seg in bars[0].get_segments()] == [
        pytest.approx((v - 0.02, v + 0.05)) for v in (0.1, 0.2, 0.3)]
    tasks = figure_data(table, "tasks")
    assert tasks.panels[0].series[0].intervals == [None]  # vqav2 has no interval
    assert plot_table(table, tmp_path / "plots", ["tasks"])[0].read_bytes().startswith(PNG)


def test_a_malformed_table_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("sweep,run,text_checkpoint,stable_score.vision\ns,a,20,0.1\ns,b,40,high\n")
    with pytest.raises(ValueError, match=r"bad.csv: line 3, column stable_score.vision: 'high'"):
        read_table(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_table(tmp_path / "none.csv")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a sweep results table"):
        read_table(tmp_path / "x.csv")
