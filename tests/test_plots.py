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
    assert small.legends[0].get_window_extent().x0 >= small.axes[-1].get_window_extent().x1


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
