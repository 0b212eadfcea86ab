"""Figures people read: titles naming the setting, integer round ticks, seed bands, the target
and untuned-model lines, seconds and bytes on log axes, distinct client colours, and a
comparison's figures rebuilt from its runs without training."""

import csv
import json

import matplotlib.colors as mcolors
import numpy as np
import pytest
import yaml

from fedlora import plots
from fedlora.compare import MethodRun, rebuild_comparison, write_comparison
from fedlora.config import ConfigError
from fedlora.units import format_bytes


def _records(accs, sim=3.0, up=400_000, ranks=None):
    return [{"round": t + 1, "accuracy": a, "sim_seconds": sim * (10 if a < 0.6 else 1), "wall_seconds": 1.0,
             "uplink_bytes": up, "downlink_bytes": up, "server_seconds": 0.1, "client_cost_percent": 1.0,
             "train_loss": 1.0, "clients": [{"id": 0}], "ranks": ranks or {"0": 8.0}} for t, a in enumerate(accs)]


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions make, kept open for inspection instead of saved."""
    made = []

    def keep(fig, path):
        fig.canvas.draw()
        made.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return made


def _labels(ax):
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text()]


def test_round_axis_has_integer_ticks_and_a_setting_title(figures, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "seed": 1, "model": {"name": "tiny-llama"},
        "data": {"dataset": "ag_news", "partition": "label_skew", "labels_per_client": 2},
        "federation": {"num_clients": 20, "rounds": 3, "local_steps": 5}}))
    setting = plots.setting_caption([tmp_path])
    assert setting == "ag_news · label_skew (2 labels/client) · 20 clients · tiny-llama · 3 rounds × 5 local steps · seed 1"
    plots.accuracy_curves({"fedit": [_records([0.3, 0.5, 0.7])]}, tmp_path / "a.png", setting=setting)
    ax = figures[0].axes[0]
    assert all(float(x).is_integer() for x in ax.get_xticks())
    assert "20 clients" in ax.get_title() and "Test accuracy" in ax.get_title()


def test_seeds_give_a_mean_with_a_t_interval_band(figures, tmp_path):
    x, mean, lo, hi = plots.seed_band([([1, 2], [0.2, 0.4]), ([1, 2, 3], [0.4, 0.8, 0.9])])
    half = 12.7062 * np.array([0.1, 0.2])  # t(0.975, 1) · s/√2 with s/√2 = |a − b| / 2
    assert list(x) == [1, 2] and np.allclose(mean, [0.3, 0.6])
    assert np.allclose(lo, mean - half, atol=1e-4) and np.allclose(hi, mean + half, atol=1e-4)
    plots.accuracy_curves({"a": [_records([0.2, 0.4]), _records([0.4, 0.8])], "b": [_records([0.5, 0.6])]},
                          tmp_path / "a.png")
    ax = figures[0].axes[0]
    assert len(ax.collections) == 1  # one band: only "a" has several seeds
    assert "95% interval over seeds" in ax.get_title()


def test_time_to_accuracy_figure_has_target_seconds_on_log_axis_and_untuned_line(figures, tmp_path):
    runs = []
    for method, sim in (("hierfedlora", 2.0), ("aflora", 60.0)):
        d = tmp_path / "seed_0" / method
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records([0.5, 0.7, 0.8], sim)))
        (d / "summary.json").write_text(json.dumps({"method": method}))
        runs.append(MethodRun(method, 0, d))
    (tmp_path / "seed_0" / "aflora" / "untuned.json").write_text(json.dumps({"accuracy": 0.25, "loss": 1.4}))
    write_comparison(tmp_path, runs, ["hierfedlora", "aflora"], target=0.7)
    by_title = {f.axes[0].get_title().split("\n")[0]: f.axes[0] for f in figures if f.axes[0].get_title()}
    tta = by_title["Time to accuracy"]
    assert tta.get_xscale() == "log" and "(s" in tta.get_xlabel()
    assert all(label.endswith(" s") for label in _labels(tta))
    lines = {line.get_label(): line for line in tta.get_lines()}
    assert list(lines["target 0.7"].get_ydata()) == [0.7, 0.7]
    assert list(lines["untuned model 0.25"].get_ydata()) == [0.25, 0.25]
    uplink = by_title["Test accuracy by uplink traffic"]
    assert _labels(uplink) and all(label.endswith(("kB", "MB")) for label in _labels(uplink))
    assert "untuned model 0.25" in [line.get_label() for line in by_title["Test accuracy by round"].get_lines()]


def test_twenty_clients_get_distinct_colours_panels_per_rank_tier_and_legends_outside(figures, tmp_path):
    caps = [64, 16, 4, 4] * 5
    records = [{"round": t, "ranks": {str(c): cap - (t - 1) * (c % 3) / 10 for c, cap in enumerate(caps)}}
               for t in (1, 2, 3)]
    plots.ranks_per_client({"aflora": records}, tmp_path / "r.png")
    fig = figures[0]
    assert [ax.get_title() for ax in fig.axes] == [f"aflora: clients starting at rank {r}" for r in (64, 16, 4)]
    colours = [mcolors.to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines()]
    assert len(colours) == len(set(colours)) == 20
    for ax in fig.axes:  # each tier's legend lists its own clients, right of its panel
        legend = ax.get_legend()
        assert len(legend.get_texts()) == len(ax.get_lines())
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1
    assert all(float(x).is_integer() for x in fig.axes[-1].get_xticks())

    ten = [{"round": 1, "ranks": {str(c): float(2 ** (c % 5 + 2)) for c in range(10)}}]
    plots.ranks_per_client({"aflora": ten, "hetlora": ten}, tmp_path / "r10.png")
    small = figures[1]
    assert len(small.axes) == 2 and small.axes[0].get_yscale() == "log"  # few clients: one panel per method
    below = small.legends[0].get_window_extent()
    assert all(below.y1 <= ax.get_window_extent().y0 for ax in small.axes)  # one legend, under the panels


def test_byte_axes_read_in_kb_and_mb(figures, tmp_path):
    assert format_bytes(2_000_000, None) == "2 MB" and format_bytes(250_000) == "250.00 kB"
    series = {"run": [{"round": t, "uplink_bytes": 10 ** (4 + t)} for t in range(1, 4)]}
    plots.metric_by_round(series, "uplink_bytes", tmp_path / "u.png", "uplink", log=True, unit="bytes")
    labels = [t.get_text() for t in figures[0].axes[0].get_yticklabels() if t.get_text()]
    assert labels and all(label.endswith(("kB", "MB", "GB")) for label in labels)


def test_report_rebuilds_a_comparison_without_touching_its_runs(tmp_path):
    runs = []
    for method in ("fedit", "aflora"):
        d = tmp_path / "seed_0" / method
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records([0.5, 0.75, 0.8])))
        (d / "summary.json").write_text(json.dumps({"method": method}))
        runs.append(MethodRun(method, 0, d))
    write_comparison(tmp_path, runs, ["fedit", "aflora"], target=0.75,
                     command="fedlora compare c.yaml --methods fedit,aflora --target 0.75")
    before = (tmp_path / "comparison.md").read_text()
    stamp = (tmp_path / "seed_0" / "fedit" / "metrics.jsonl").stat().st_mtime_ns
    (tmp_path / "accuracy_vs_round.png").unlink()
    rebuild_comparison(tmp_path)
    assert (tmp_path / "comparison.md").read_text() == before  # same command, order and --target
    assert "Time to accuracy ≥ 0.7500" in before
    assert (tmp_path / "accuracy_vs_round.png").stat().st_size > 1000
    assert [r["method"] for r in csv.DictReader((tmp_path / "comparison.csv").open())] == ["fedit", "aflora"]
    assert (tmp_path / "seed_0" / "fedit" / "metrics.jsonl").stat().st_mtime_ns == stamp
    rebuild_comparison(tmp_path, target=0.8)
    assert "Time to accuracy ≥ 0.8000" in (tmp_path / "comparison.md").read_text()
    assert "vs fedit" in (tmp_path / "comparison.md").read_text()
    rebuild_comparison(tmp_path, reference="aflora")
    md = (tmp_path / "comparison.md").read_text()
    assert "vs aflora" in md and "vs fedit" not in md
    with pytest.raises(ConfigError, match="--reference flora: not a method of"):
        rebuild_comparison(tmp_path, reference="flora")
    (tmp_path / "comparison.md").write_text(before.replace("--target 0.75", "--target 0.7x"))
    with pytest.raises(ConfigError, match="comparison.md: its Command line's --target is damaged"):
        rebuild_comparison(tmp_path)
    rebuild_comparison(tmp_path, target=0.75, reference="aflora")  # given, a damaged record does not matter
    md = (tmp_path / "comparison.md").read_text()
    assert "--target 0.75 --reference aflora`" in md and "vs aflora" in md  # the command the tables follow
    rebuild_comparison(tmp_path)
    assert "vs aflora" in (tmp_path / "comparison.md").read_text()  # and a plain rebuild keeps it
    (tmp_path / "comparison.md").write_text('Command: `fedlora compare "unclosed`\n')
    with pytest.raises(ConfigError, match="Command line is damaged; give --target"):
        rebuild_comparison(tmp_path)


def test_report_tabulates_class_accuracy_and_the_worst_client_per_evaluated_round():
    from fedlora.report import class_table

    records = [{"round": 1, "train_loss": 1.0},  # not evaluated: no row
               {"round": 2, "class_accuracy": {"World": 0.5, "Business": None}, "worst_client_accuracy": 0.25,
                "worst_client": 6},
               {"round": 4, "class_accuracy": {"World": 0.75, "Sports": 1}}]
    lines = class_table(records)
    assert lines[1] == "| round | World | Business | Sports | worst client (which) |"
    assert lines[3:5] == ["| 2 | 0.5000 | – | – | 0.2500 (6) |", "| 4 | 0.7500 | – | 1.0000 | – |"]
    assert class_table([{"round": 1, "class_accuracy": "damaged"}]) == []


def test_untuned_reference_line_reads_only_an_accuracy(tmp_path):
    for content, expected in [('{"accuracy": 0.25}', 0.25), ('{"accuracy": "0.25"}', None),
                              ('{"accuracy": true}', None), ('{"accuracy": 7}', None), ("[0.25]", None)]:
        (tmp_path / plots.UNTUNED_FILE).write_text(content)
        assert plots.untuned_accuracy([tmp_path]) == expected, content


def test_one_evaluated_round_still_gets_integer_ticks(figures, tmp_path):
    recs = _records([0.3, 0.5])
    recs[0]["accuracy"] = None  # evaluated at round 2 only (eval_every: 2, two rounds)
    plots.accuracy_curves({"fedit": [recs]}, tmp_path / "a.png")
    ticks = [x for x in figures[0].axes[0].get_xticks() if 1 <= x <= 3]
    assert 2 in ticks and all(float(x).is_integer() for x in ticks)


def test_tuning_runs_are_labelled_validation(figures, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"validation_examples": 200}}))
    assert plots.scored_split([tmp_path]) == "validation"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"validation_examples": None}}))
    assert plots.scored_split([tmp_path]) == "test"
    plots.accuracy_curves({"fedit": [_records([0.3])]}, tmp_path / "a.png", split="validation")
    assert figures[0].axes[0].get_ylabel() == "validation accuracy"


def test_many_series_never_share_colour_and_style(figures, tmp_path):
    runs = {f"m{i}": [_records([0.3 + i / 100, 0.5])] for i in range(24)}  # a tuning grid
    plots.accuracy_curves(runs, tmp_path / "a.png")
    lines = figures[0].axes[0].get_lines()
    assert len({(mcolors.to_hex(line.get_color()), line.get_linestyle()) for line in lines}) == 24
    # with one evaluated round (tuning) a series is a single point: its marker must differ too
    assert len({(mcolors.to_hex(line.get_color()), line.get_marker()) for line in lines}) == 24


def test_no_series_looks_like_the_target_or_untuned_line(figures, tmp_path):
    """Those lines are black dashed and grey dotted; tab10's grey once drew series 17 grey
    dashed and series 27 grey dotted."""
    runs = {f"m{i}": [_records([0.3, 0.5])] for i in range(36)}
    plots.accuracy_curves(runs, tmp_path / "a.png", target=0.4, untuned=0.3)
    lines = figures[0].axes[0].get_lines()
    series, references = lines[:36], lines[36:]
    assert {mcolors.to_hex(line.get_color()) for line in references} == {"#000000", "#808080"}
    assert not {mcolors.to_hex(line.get_color()) for line in series} & {"#000000", "#808080", "#7f7f7f"}
    assert len({(mcolors.to_hex(line.get_color()), line.get_linestyle()) for line in series}) == 36


def test_the_rank_figure_names_the_one_seed_it_shows(figures, tmp_path):
    """It plots each ranked method's first seed (clients differ by seed); its caption once said
    every seed of the comparison."""
    runs = []
    for seed in (0, 1):
        for method in ("fedit", "aflora"):
            d = tmp_path / f"seed_{seed}" / method
            d.mkdir(parents=True)
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records([0.5, 0.8])))
            (d / "summary.json").write_text(json.dumps({"method": method}))
            (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "data": {"dataset": "ag_news"}}))
            runs.append(MethodRun(method, seed, d))
    write_comparison(tmp_path, runs, ["fedit", "aflora"], target=0.75)
    ranks = next(f for f in figures if f._suptitle is not None and f._suptitle.get_text().startswith("Rank"))
    accuracy = next(f for f in figures if f.axes[0].get_title().startswith("Test accuracy by round"))
    assert ranks._suptitle.get_text().endswith("seed 0") and "seeds 0,1" in accuracy.axes[0].get_title()


def test_the_speedup_figure_keeps_each_methods_colour_and_leaves_missed_targets_as_gaps(figures, tmp_path):
    runs = {m: [_records([0.3, 0.5])] for m in ("fedit", "hier", "slow")}
    plots.accuracy_curves(runs, tmp_path / "a.png")
    colour = {line.get_label().split()[0]: mcolors.to_hex(line.get_color()) for line in figures[0].axes[0].get_lines()}
    rows = [{"target": t, "method": m, "speedup": s, "speedup_low": lo, "speedup_high": hi, "paired_seeds": 2,
             "reached_seeds": 2 if s else 1}
            for t, m, s, lo, hi in ((0.4, "hier", 2.0, 1.5, 3.0), (0.45, "hier", None, None, None),
                                    (0.5, "hier", 1.8, 1.2, 2.5), (0.4, "slow", 0.5, 0.4, 0.6),
                                    (0.45, "slow", None, None, None), (0.5, "slow", None, None, None))]
    plots.speedup_by_target(rows, tmp_path / "s.png", "fedit", labels=list(runs))
    ax = figures[1].axes[0]
    drawn = {bars.get_label().split()[0]: bars for bars in ax.containers}  # each method's error bars
    assert mcolors.to_hex(drawn["hier"].lines[0].get_color()) == colour["hier"]
    assert mcolors.to_hex(drawn["slow"].lines[0].get_color()) == colour["slow"]
    np.testing.assert_array_equal(drawn["hier"].lines[0].get_ydata(), [2.0, np.nan, 1.8])  # a gap, no line across
    np.testing.assert_array_equal(drawn["slow"].lines[0].get_ydata(), [0.5, np.nan, np.nan])
    spans = [(seg[0][1], seg[-1][1]) for seg in drawn["hier"].lines[2][0].get_segments() if len(seg)]
    assert spans == [(1.5, 3.0), (1.2, 2.5)]  # the interval itself, not ± swapped; none at the gap
    parity = [line for line in ax.get_lines() if line.get_label() == "as fast as fedit"]
    assert ax.get_yscale() == "log" and list(parity[0].get_ydata()) == [1.0, 1.0]
    assert "95% t interval" in ax.get_title()


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_many_methods_over_seeds_get_a_panel_each_instead_of_overlapping_bands(figures, tmp_path):
    """Nine methods' 95% bands on one axis could not be told apart (issue 32)."""
    runs = {f"m{i}": [_records([0.5 + i / 50, 0.6 + s / 20 + i / 50]) for s in range(3)] for i in range(9)}
    plots.accuracy_curves(runs, tmp_path / "a.png", untuned=0.25, setting="ag_news · 10 clients")
    fig = figures[0]
    panels = _visible(fig)
    assert [ax.get_title() for ax in panels] == list(runs)
    for i, ax in enumerate(panels):
        assert len(ax.collections) == 1  # its own band only
        grey = [line for line in ax.get_lines() if mcolors.to_hex(line.get_color()) == mcolors.to_hex("0.82")]
        assert len(grey) == 8  # every other method's mean, for context
        own = [line for line in ax.get_lines() if line.get_label() == "mean of 3 seeds"]
        np.testing.assert_allclose(own[0].get_ydata(), [0.5 + i / 50 + 0.0, 0.6 + 0.05 + i / 50])  # the mean of 3 seeds
        assert "untuned model 0.25" in [line.get_label() for line in ax.get_lines()]
    assert len({ax.get_position().x0 for ax in panels}) == 3  # rows of three: readable at page width
    assert panels[0].get_shared_y_axes().joined(panels[0], panels[-1])  # one accuracy scale
    assert "95% interval over seeds" in fig._suptitle.get_text() and "10 clients" in fig._suptitle.get_text()
    plots.accuracy_curves(dict(list(runs.items())[:3]), tmp_path / "b.png")  # three: one panel, three bands
    assert len(_visible(figures[1])) == 1 and len(figures[1].axes[0].collections) == 3


def test_the_rank_figure_is_a_grid_that_names_overlapping_clients(figures, tmp_path):
    caps = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
    records = [{"round": t, "ranks": {str(c): float(cap) if cap <= 4 else cap * (1 - t * (c % 2 + 1) / 20)
                                      for c, cap in enumerate(caps)}} for t in (1, 2, 3, 4)]
    methods = {m: records for m in ("aflora", "aflora-no-ddr", "aflora-no-dlf", "aflora-data", "hetlora")}
    plots.ranks_per_client(methods, tmp_path / "r.png")
    fig = figures[0]
    panels = _visible(fig)
    assert [ax.get_title() for ax in panels] == list(methods)
    assert len({ax.get_position().x0 for ax in panels}) == 2  # two per row
    assert fig.get_size_inches()[0] <= 9  # not one row of five panels 30 inches wide
    labelled = [ax.xaxis.get_major_ticks()[0].label1.get_visible() for ax in panels]
    assert labelled == [False, False, False, True, True]  # the lowest panel of each column, none missing
    for ax in panels:  # the four rank-4 clients draw one line: named on it
        assert [t.get_text() for t in ax.texts] == ["clients 6–9 overlap"]
    assert "named on the line" in fig._suptitle.get_text()
    near = {"0": [(1, 64.0), (2, 63.9)], "1": [(1, 64.0), (2, 63.8)], "2": [(1, 4.0), (2, 4.0)]}
    assert plots._same_lines(near) == [["0", "1"]]  # 0.005 of a 64-to-4 log axis apart: one line
    assert plots._same_lines(near | {"2": [(1, 64.0), (2, 55.0)]}, log=False) == []  # on a 64-to-55 axis, apart
    assert plots._client_names(["2", "5"]) == "clients 2, 5"


def test_speedup_panels_mark_points_set_by_measured_server_seconds(figures, tmp_path):
    methods = ["aflora", "ffa", "flora", "flexlora"]
    rows = [{"target": t, "method": m, "speedup": s, "speedup_low": s / 2, "speedup_high": s * 2, "paired_seeds": 3,
             "reached_seeds": 3} for t in (0.6, 0.65) for m, s in zip(methods, (0.02, 0.9, 0.25, 0.16))]
    plots.speedup_by_target(rows, tmp_path / "s.png", "fedit", labels=["fedit", *methods],
                            server_share={"aflora": 0.95, "ffa": 0.01, "flora": 0.1, "flexlora": 0.53})
    fig = figures[0]
    panels = _visible(fig)
    assert [ax.get_title().split()[0] for ax in panels] == methods
    hollow = {ax.get_title().split()[0]: mcolors.to_hex(ax.containers[0].lines[0].get_markerfacecolor())
              for ax in panels}
    assert hollow["aflora"] == hollow["flexlora"] == "#ffffff" and "#ffffff" not in (hollow["ffa"], hollow["flora"])
    assert "measured server seconds" in panels[0].get_title() and "measured server seconds" not in panels[1].get_title()
    assert "hollow points (aflora, flexlora)" in fig._suptitle.get_text()
    for ax in panels:
        shown = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert shown == [] or "1×" in shown  # inner panels share the outer panels' labels
    labelled = [t.get_text() for t in panels[0].get_yticklabels() if t.get_text()]
    assert {"0.01×", "0.1×", "1×"} <= set(labelled)
    one = [r for r in rows if r["method"] == "flora"]  # a single method: one panel, its ticks labelled
    plots.speedup_by_target(one, tmp_path / "one.png", "fedit", server_share={"flora": 0.1})
    ticks = [t.get_text() for t in figures[1].axes[0].get_yticklabels() if t.get_text()]
    assert len(ticks) >= 3 and "1×" in ticks


def test_report_of_a_tuning_run_says_validation(figures, tmp_path):
    from fedlora.report import write_report
    from fedlora.runtime.outputs import write_metrics

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"validation_examples": 200}}))
    write_metrics(tmp_path, _records([0.4, 0.6]))
    text = write_report(tmp_path).read_text()
    assert "Validation accuracy" in text and "Test accuracy" not in text
    accuracy = next(f.axes[0] for f in figures if "accuracy" in f.axes[0].get_title().lower())
    assert accuracy.get_title().startswith("Validation accuracy") and accuracy.get_ylabel() == "validation accuracy"


def test_a_tuning_comparisons_figures_all_say_validation(figures, tmp_path):
    """Every accuracy axis of a comparison of tuning runs, the time-to-accuracy one included."""
    runs = []
    for method in ("fedit", "aflora"):
        d = tmp_path / "seed_0" / method
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"data": {"validation_examples": 200}}))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records([0.5, 0.8])))
        (d / "summary.json").write_text(json.dumps({"method": method}))
        runs.append(MethodRun(method, 0, d))
    write_comparison(tmp_path, runs, ["fedit", "aflora"], target=0.75)
    labels = [f.axes[0].get_ylabel() for f in figures if "accuracy" in f.axes[0].get_ylabel()]
    assert len(labels) == 3 and set(labels) == {"validation accuracy"}  # by round, by uplink, by time


def test_a_tuning_grid_of_single_points_is_a_labelled_dot_chart(figures, tmp_path):
    """Twenty-one points in one column matched to a 21-entry legend by colour could not be read."""
    runs = {f"m{i}-lr0.01": [[{**_records([0.4 + i / 100])[0], "round": 2}]] for i in range(21)}
    plots.accuracy_curves(runs, tmp_path / "a.png", split="validation")
    plots.accuracy_curves(runs, tmp_path / "u.png", x_key="uplink_bytes", x_unit="bytes", xlabel="uplink")
    by_round, by_uplink = figures[0].axes[0], figures[1].axes[0]
    assert [t.get_text() for t in by_round.get_yticklabels()] == list(runs)
    dots = [line for line in by_round.get_lines() if line.get_linestyle() == "None"]
    assert [float(d.get_xdata()[0]) for d in dots] == pytest.approx([0.4 + i / 100 for i in range(21)])
    assert by_round.texts[3].get_text() == "0.430 (round 2)" and by_round.get_xlabel() == "validation accuracy"
    assert by_uplink.texts[0].get_text() == "0.400 (400.00 kB)" and "uplink" in by_uplink.get_xlabel()
    assert by_round.get_legend() is None  # every dot is named on its row
