"""`prefpipe report`: the plots are written and readable, and the summary names the winner the numbers pick."""

import json
import math

import pytest

from prefpipe import rundir
from prefpipe.evaluation.report import load_runs, plot_beta, plot_curves, write_report

LAST_EVAL = ({"loss": 0.1, "acc": 0.9, "margin": 9.0},)


def make_run(d, name, loss_type, beta, gen_acc=None, pref_acc=None, steps=12, evals=LAST_EVAL, eval_every=None):
    """A fake run: train acc 0.05 * step (so the last step's acc is 0.05 * steps), margin 0.02 * step * beta, and
    one in-training evaluation per entry of `evals` (every `eval_every` steps, else the last one at the end)."""
    r = d / name
    r.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {"split": "train", "step": s, "loss": math.log(2) - 0.01 * s * beta, "acc": min(1, 0.05 * s),
               "margin": 0.02 * s * beta}
        if loss_type == "sft":
            rec = {"split": "train", "step": s, "loss": 1.0 - 0.01 * s, "nll": 1.0 - 0.01 * s}
        lines.append(json.dumps(rec))
    for i, ev in enumerate(evals, start=1):
        at = i * eval_every if eval_every else steps
        lines.append(json.dumps({"split": "eval", "step": at, **ev}))
    (r / rundir.METRICS).write_text("\n".join(lines) + "\n")
    final = json.loads(lines[steps - 1])
    (r / rundir.RESULT).write_text(json.dumps({"name": name, "dir": name, "loss_type": loss_type, "beta": beta,
                                               "steps": steps, "final": final}))
    if gen_acc is not None:
        n = 200
        (r / rundir.EVAL_GEN).write_text(json.dumps({"accuracy": gen_acc, "correct": round(gen_acc * n), "n": n}))
    if pref_acc is not None:
        (r / rundir.EVAL_PREF).write_text(json.dumps({"acc": pref_acc, "margin": 0.5}))


def is_png(path) -> bool:
    import matplotlib.image as mpimg
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
    img = mpimg.imread(path)
    return img.shape[0] > 200 and img.shape[1] > 400


def test_report_writes_plots_and_names_the_winner(tmp_path, run_cli):
    d = tmp_path / "runs"
    make_run(d, "dpo-beta0.1", "dpo", 0.1, gen_acc=0.60)
    make_run(d, "dpo-beta0.3", "dpo", 0.3, gen_acc=0.70)
    make_run(d, "dpo-beta0.05", "dpo", 0.05, gen_acc=0.55)
    make_run(d, "kto-beta0.1", "kto", 0.1, gen_acc=0.62)
    make_run(d, "orpo", "orpo", 0.1, gen_acc=0.65)
    make_run(d, "sft", "sft", 0.1, gen_acc=0.64)
    (d / "reference").mkdir()
    (d / "reference" / rundir.EVAL_GEN).write_text(json.dumps({"accuracy": 0.5, "correct": 100, "n": 200}))
    (d / "cache").mkdir()  # not a run: ignored

    r = run_cli("report", d)
    assert r.exit_code == 0, r.output
    assert is_png(d / "curves.png") and is_png(d / "beta.png")
    md = (d / "summary.md").read_text()
    # Wilson 95% of 140/200 by hand: (0.7 + z²/400 ± z sqrt(0.21/200 + z²/160000)) / (1 + z²/200) = 63.3%, 75.9%
    assert "**Best run: dpo-beta0.3** (downstream accuracy 70.0%, 140/200, 95% CI 63.3–75.9%; the SFT model " \
           "scores 50.0%, a change of +20.0 points); within noise of the runner-up orpo (65.0%, 130/200; " \
           "Fisher exact p = " in md
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| SFT model (reference) |")
    lo, hi = wilson_by_hand(100, 200)  # the SFT model's own accuracy has its interval too
    assert rows[0].endswith(f"| 50.0% | 100 / 200 | {100 * lo:.1f}–{100 * hi:.1f}% |") and f"{100 * lo:.1f}" == "43.1"
    order = [row.split("|")[1].strip() for row in rows[1:]]
    assert order == ["**dpo-beta0.3** ★", "orpo", "sft", "kto-beta0.1", "dpo-beta0.1",
                     "dpo-beta0.05"]
    assert "| orpo | orpo | – | 12 |" in md  # beta does not apply to orpo
    assert "140 / 200" in md


def test_winner_falls_back_to_held_out_then_training_accuracy(tmp_path):
    d = tmp_path / "runs"
    make_run(d, "dpo-beta0.1", "dpo", 0.1, pref_acc=0.8)
    make_run(d, "dpo-beta0.3", "dpo", 0.3, pref_acc=0.6)
    res = write_report(d)
    assert (res["best"], res["basis"]) == ("dpo-beta0.1", "held-out reward accuracy")
    d2 = tmp_path / "runs2"
    make_run(d2, "ipo-beta0.1", "ipo", 0.1, steps=5, evals=())
    make_run(d2, "ipo-beta0.5", "ipo", 0.5, steps=8, evals=())
    res = write_report(d2)
    assert (res["best"], res["basis"], res["value"]) == ("ipo-beta0.5", "final train-step per-token reward accuracy",
                                                         0.4)
    res = write_report(d2, only=["ipo-beta0.1"])  # the pipeline reports only its own runs
    assert res["best"] == "ipo-beta0.1" and "ipo-beta0.5" not in res["markdown"]
    assert is_png(d2 / "curves.png") and is_png(d2 / "beta.png")


def test_report_errors_are_one_line(tmp_path, run_cli):
    r = run_cli("report", tmp_path / "missing")
    assert r.exit_code == 2 and "no such runs directory" in r.output
    r = run_cli("report", tmp_path)
    assert r.exit_code == 2 and "no training runs here" in r.output
    make_run(tmp_path, "dpo-beta0.1", "dpo", 0.1)
    (tmp_path / "dpo-beta0.1" / rundir.METRICS).write_text('{"step": 1}\n{oops\n')
    r = run_cli("report", tmp_path)
    assert r.exit_code == 2 and "row 2: not valid JSON" in r.output and "Traceback" not in r.output


def two_runs(d, x: dict, y: dict):
    """dpo-beta0.1 (X, 5 steps: last-step acc 0.25) and dpo-beta0.3 (Y, 12 steps: last-step acc 0.6)."""
    make_run(d, "dpo-beta0.1", "dpo", 0.1, steps=5, **x)
    make_run(d, "dpo-beta0.3", "dpo", 0.3, steps=12, **y)


@pytest.mark.parametrize("x, y, best, basis, value", [
    # every level points at a different run than the level below it, so the level used decides the winner
    (dict(gen_acc=0.6, pref_acc=0.5, evals=({"acc": 0.5},)), dict(gen_acc=0.5, pref_acc=0.9, evals=({"acc": 0.95},)),
     "dpo-beta0.1", "downstream accuracy", 0.6),
    (dict(pref_acc=0.7, evals=({"acc": 0.5},)), dict(pref_acc=0.6, evals=({"acc": 0.95},)),
     "dpo-beta0.1", "held-out reward accuracy", 0.7),
    (dict(evals=({"acc": 0.3}, {"acc": 0.8})), dict(evals=({"acc": 0.9}, {"acc": 0.7})),  # the last eval counts
     "dpo-beta0.1", "in-training eval reward accuracy", 0.8),
    (dict(evals=()), dict(evals=()), "dpo-beta0.3", "final train-step reward accuracy", 0.6),
])
def test_ranking_prefers_downstream_then_held_out_then_eval_then_last_step(tmp_path, x, y, best, basis, value):
    d = tmp_path / "runs"
    two_runs(d, x, y)
    res = write_report(d)
    assert (res["best"], res["basis"]) == (best, basis)
    assert res["value"] == pytest.approx(value)
    md = (d / "summary.md").read_text()
    assert f"**Best run: {best}** ({basis} {100 * value:.1f}%" in md


def test_ranking_reads_result_json_eval_and_leaves_out_runs_without_the_basis(tmp_path):
    d = tmp_path / "runs"
    two_runs(d, dict(evals=()), dict(evals=()))
    res = json.loads((d / "dpo-beta0.1" / rundir.RESULT).read_text())
    (d / "dpo-beta0.1" / rundir.RESULT).write_text(json.dumps({**res, "eval": {"step": 5, "acc": 0.75}}))
    make_run(d, "dpo-beta1", "dpo", 1.0, steps=20, evals=())  # last-step acc 1.0 but never evaluated
    res = write_report(d)
    assert (res["best"], res["basis"], res["value"]) == ("dpo-beta0.1", "in-training eval reward accuracy", 0.75)
    md = (d / "summary.md").read_text()
    assert "Not ranked (no in-training eval reward accuracy): dpo-beta1, dpo-beta0.3." in md


def test_orpo_accuracy_is_not_ranked_against_reward_accuracy(tmp_path):
    d = tmp_path / "runs"
    make_run(d, "dpo-beta0.1", "dpo", 0.1, evals=({"acc": 0.7},))
    make_run(d, "orpo", "orpo", 0.1, steps=20, evals=({"acc": 0.99},))  # a_c > a_r: another quantity
    res = write_report(d)
    assert (res["best"], res["basis"], res["value"]) == ("dpo-beta0.1", "in-training eval reward accuracy", 0.7)
    assert "Not ranked (no in-training eval reward accuracy): orpo." in res["markdown"]
    d2 = tmp_path / "orpo-only"
    make_run(d2, "orpo", "orpo", 0.1, evals=({"acc": 0.99},))
    assert write_report(d2)["basis"] == "in-training eval ORPO accuracy"


def test_losses_whose_accuracy_means_the_same_are_ranked_and_drawn_together(tmp_path):
    """The meaning of a loss's acc comes from its registry entry, so a dpo + robust sweep (both reward accuracy)
    ranks both runs and shares one plot column; ipo's per-token accuracy is another basis. (With the report's own
    table of five losses, robust had no entry: it was left out of the ranking and drawn on its own.)"""
    from prefpipe.evaluation.plots import curve_panels
    from prefpipe.evaluation.runs import load_runs as loaded
    d = tmp_path / "runs"
    make_run(d, "dpo-beta0.1", "dpo", 0.1, evals=({"acc": 0.7},))
    make_run(d, "robust-beta0.1", "robust", 0.1, evals=({"acc": 0.8},))
    make_run(d, "ipo-beta0.1", "ipo", 0.1, evals=({"acc": 0.95},))
    res = write_report(d)
    assert (res["best"], res["basis"], res["value"]) == ("robust-beta0.1", "in-training eval reward accuracy", 0.8)
    assert "Not ranked (no in-training eval reward accuracy): ipo-beta0.1." in res["markdown"]
    titles = [col[0].title for col in zip(*curve_panels(loaded(d)[0]))]
    assert titles == ["dpo, robust", "ipo"]


def test_a_tie_at_the_top_has_no_winner(tmp_path, run_cli):
    d = tmp_path / "runs"
    make_run(d, "dpo-beta0.1", "dpo", 0.1, gen_acc=0.7)
    make_run(d, "dpo-beta0.3", "dpo", 0.3, gen_acc=0.6)
    make_run(d, "kto-beta0.1", "kto", 0.1, gen_acc=0.7)
    res = write_report(d)
    assert (res["best"], res["basis"], res["value"]) == (None, "downstream accuracy", 0.7)
    assert res["tied"] == ["dpo-beta0.1", "kto-beta0.1"]
    md = (d / "summary.md").read_text()
    assert "**No single best run (tie between dpo-beta0.1, kto-beta0.1 at downstream accuracy 70.0%)**." in md
    assert "Best run" not in md and "★" not in md
    # the pipeline logs the headline: it names the tie, never a winner
    assert res["headline"] == "No single best run (tie between dpo-beta0.1, kto-beta0.1 at downstream accuracy 70.0%)"
    r = run_cli("report", d)
    assert r.exit_code == 0 and "No single best run" in r.output


def lines_by_label(fig) -> dict:
    """label -> [(axes, Line2D)] over every panel of a figure."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out.setdefault(line.get_label(), []).append((ax, line))
    return out


def legend_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def sweep(d):
    """dpo at β 1, 10, 3 (names sort as text in that order), ipo at β 2, and orpo; evals at steps 4, 8, 12."""
    evals = ({"loss": 0.5, "acc": 0.6, "margin": 3.0}, {"loss": 0.4, "acc": 0.7, "margin": 6.0},
             {"loss": 0.3, "acc": 0.8, "margin": 9.0})
    for name, lt, beta in (("dpo-beta1", "dpo", 1.0), ("dpo-beta10", "dpo", 10.0), ("dpo-beta3", "dpo", 3.0),
                           ("ipo-beta2", "ipo", 2.0), ("orpo", "orpo", 0.1)):
        make_run(d, name, lt, beta, pref_acc=0.5 + beta / 100, evals=evals, eval_every=4)
    return load_runs(d)[0]


def test_legends_are_in_numeric_beta_order_on_every_panel(tmp_path):
    runs = sweep(tmp_path)
    fig = plot_curves(runs, tmp_path / "curves.png")
    for ax in fig.axes:
        assert ax.get_lines() and ax.get_legend() is not None, ax.get_ylabel()
    dpo_panels = [ax for ax, _ in lines_by_label(fig)["dpo-beta1"]]
    assert len(dpo_panels) == 3  # loss, accuracy, margin
    for ax in dpo_panels:
        assert [t for t in legend_labels(ax) if "eval" not in t] == ["dpo-beta1", "dpo-beta3", "dpo-beta10"]
    fig = plot_beta(runs, None, tmp_path / "beta.png")
    assert len(fig.axes) >= 3
    for ax in fig.axes:
        assert ax.get_legend() is not None, ax.get_title()
    held_out = next(ax for ax in fig.axes if ax.get_title() == "held-out reward accuracy")
    assert legend_labels(held_out) == ["dpo", "ipo", "orpo (no β)"]
    dpo_line = next(line for line in held_out.get_lines() if line.get_label() == "dpo")
    assert list(dpo_line.get_xdata()) == [1.0, 3.0, 10.0]
    assert list(dpo_line.get_ydata()) == pytest.approx([0.51, 0.53, 0.60])


def test_eval_curves_are_dashed_in_their_runs_colour(tmp_path):
    runs = sweep(tmp_path)
    lines = lines_by_label(plot_curves(runs, tmp_path / "curves.png"))
    for name in ("dpo-beta3", "ipo-beta2", "orpo"):
        train, ev = lines[name], lines[f"{name} (eval)"]
        assert len(ev) == 3  # loss, accuracy, margin
        for (ax_t, t), (ax_e, e) in zip(train, ev):
            assert ax_t is ax_e and e.get_linestyle() == "--" and t.get_linestyle() == "-"
            assert e.get_color() == t.get_color()
            assert list(e.get_xdata()) == [4, 8, 12]
    acc_eval = [line for ax, line in lines["dpo-beta3 (eval)"] if "accuracy" in ax.get_ylabel()]
    assert list(acc_eval[0].get_ydata()) == pytest.approx([0.6, 0.7, 0.8])


def test_margins_are_divided_by_beta_and_losses_by_their_step_one_value(tmp_path):
    runs = sweep(tmp_path)
    lines = lines_by_label(plot_curves(runs, tmp_path / "curves.png"))

    def panel(label, ylabel_part):
        return next(line for ax, line in lines[label] if ylabel_part in ax.get_ylabel())

    steps = range(1, 13)
    # make_run logs margin 0.02 * step * beta: divided by beta, every dpo run shows 0.02 * step
    for name, beta in (("dpo-beta1", 1.0), ("dpo-beta3", 3.0), ("dpo-beta10", 10.0)):
        assert list(panel(name, "margin").get_ydata()) == pytest.approx([0.02 * s for s in steps])
        assert list(panel(f"{name} (eval)", "margin").get_ydata()) == pytest.approx([3 / beta, 6 / beta, 9 / beta])
    # orpo's margin (a_c - a_r) has no beta in it: plotted as logged
    assert list(panel("orpo", "a_c − a_r").get_ydata()) == pytest.approx([0.002 * s for s in steps])
    # loss ln2 - 0.01 * step * beta, over its step-1 value
    first = math.log(2) - 0.02
    assert list(panel("ipo-beta2", "loss").get_ydata()) == pytest.approx(
        [(math.log(2) - 0.02 * s) / first for s in steps])


def test_orpo_accuracy_is_not_on_a_reward_accuracy_axis(tmp_path):
    runs = sweep(tmp_path)
    make_run(tmp_path, "sft", "sft", 0.1)
    runs = load_runs(tmp_path)[0]
    lines = lines_by_label(plot_curves(runs, tmp_path / "curves.png"))
    orpo_axes = {id(ax) for ax, _ in lines["orpo"]}
    for name in ("dpo-beta1", "ipo-beta2"):
        assert not orpo_axes & {id(ax) for ax, _ in lines[name]}
    orpo_acc = [ax for ax, _ in lines["orpo"] if "accuracy" in ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in orpo_acc] == ["ORPO accuracy (a_c > a_r, per-token log-probs)"]
    dpo_acc = [ax for ax, _ in lines["dpo-beta1"] if "accuracy" in ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in dpo_acc] == ["reward accuracy"]
    assert len(lines["sft"]) == 1  # sft logs a loss only
    fig = plot_beta(runs, None, tmp_path / "beta.png")
    for ax in fig.axes:
        labels = {line.get_label() for line in ax.get_lines()}
        if ax.get_title() != "held-out reward accuracy":
            assert not {"orpo (no β)", "sft (no β)"} & labels, ax.get_title()


# ---------------------------------------------------------------- uncertainty of the ranking

Z95 = 1.959963984540054  # the 97.5% point of the standard normal


def wilson_by_hand(k, n):
    p = k / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n ** 2)) / (1 + Z95 ** 2 / n)
    return centre - half, centre + half


def test_wilson_interval_and_exact_tests_match_hand_values():
    from prefpipe.evaluation.stats import fisher_exact, mcnemar_exact, wilson_interval
    for k, n in ((5, 20), (4, 20), (18, 20), (140, 200)):
        assert wilson_interval(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)
    assert wilson_interval(5, 20) == pytest.approx((0.1119, 0.4687), abs=1e-4)  # published tables
    assert wilson_interval(0, 20)[0] == 0 and wilson_interval(0, 20)[1] > 0.1  # not Wald's zero width
    assert mcnemar_exact(14, 0) == pytest.approx(2 * 0.5 ** 14)
    assert mcnemar_exact(1, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(6, 1) == pytest.approx(2 * (1 + 7) / 2 ** 7)  # P(X <= 1 | Bin(7, 1/2)), both tails
    assert fisher_exact(3, 4, 1, 4) == pytest.approx(34 / 70)  # Fisher's tea tasting, two-sided
    assert fisher_exact(5, 20, 4, 20) == pytest.approx(1.0)


def gen_run(d, name, right: int, n: int = 20, verdicts=True, beta=0.1):
    """A dpo run whose downstream evaluation got questions 0 .. right-1 of n right."""
    make_run(d, name, "dpo", beta)
    (d / name / rundir.EVAL_GEN).write_text(json.dumps({"accuracy": right / n, "correct": right, "n": n,
                                                        "data": "heldout.jsonl"}))
    if verdicts:
        (d / name / rundir.EVAL_GEN_ROWS).write_text("".join(
            json.dumps({"row": i + 1, "question": f"q{i}", "correct": i < right}) + "\n" for i in range(n)))


@pytest.mark.parametrize("verdicts, test", [(True, "exact McNemar"), (False, "Fisher exact")])
def test_five_of_twenty_against_four_is_within_noise(tmp_path, verdicts, test):
    d = tmp_path / "runs"
    gen_run(d, "dpo-beta0.1", 5, verdicts=verdicts)
    gen_run(d, "dpo-beta0.3", 4, verdicts=verdicts, beta=0.3)
    res = write_report(d)
    lo, hi = wilson_by_hand(5, 20)
    assert res["best"] == "dpo-beta0.1"  # still the best estimate ...
    assert res["noise"]["within_noise"] and res["noise"]["test"] == test  # ... but not told apart
    assert res["noise"]["p"] == pytest.approx(1.0)  # one discordant question; or Fisher on 5/20 vs 4/20
    assert (f"**Best run: dpo-beta0.1** (downstream accuracy 25.0%, 5/20, 95% CI {100 * lo:.1f}–{100 * hi:.1f}%); "
            f"within noise of the runner-up dpo-beta0.3 (20.0%, 4/20; {test} p = 1.000)." in res["markdown"])
    lo4, hi4 = wilson_by_hand(4, 20)
    assert f"| 20.0% | 4 / 20 | {100 * lo4:.1f}–{100 * hi4:.1f}% |" in res["markdown"]


def test_eighteen_of_twenty_against_four_is_a_clear_win(tmp_path):
    d = tmp_path / "runs"
    gen_run(d, "dpo-beta0.1", 4)
    gen_run(d, "dpo-beta0.3", 18, beta=0.3)
    res = write_report(d)
    # paired: questions 4..17 only the best got right, none only the runner-up: p = 2 / 2^14
    assert res["noise"]["p"] == pytest.approx(2 * 0.5 ** 14) and not res["noise"]["within_noise"]
    assert "ahead of the runner-up dpo-beta0.1 (20.0%, 4/20) beyond noise (exact McNemar p = 0.00012)" \
        in res["markdown"]
    assert "within noise" not in res["headline"]
    d2 = tmp_path / "unpaired"
    gen_run(d2, "dpo-beta0.1", 4, verdicts=False)
    gen_run(d2, "dpo-beta0.3", 18, verdicts=False, beta=0.3)
    res = write_report(d2)
    assert res["noise"]["test"] == "Fisher exact" and res["noise"]["p"] < 1e-3
    assert "beyond noise" in res["headline"]


# ---------------------------------------------------------------- what the plots are built from

def test_short_runs_are_not_smoothed_and_the_title_says_so(tmp_path):
    from prefpipe.evaluation.plots import curve_panels, curves_title
    make_run(tmp_path, "dpo-beta0.1", "dpo", 0.1, steps=10)
    runs = load_runs(tmp_path)[0]
    fig = plot_curves(runs, tmp_path / "curves.png")
    title = fig._suptitle.get_text()
    assert "tenth" not in title and "moving average" not in title and "unsmoothed" in title
    acc = next(s for s in curve_panels(runs)[1][0].series if s.label == "dpo-beta0.1")
    assert acc.ys == pytest.approx([0.05 * s for s in range(1, 11)])  # as logged
    make_run(tmp_path, "dpo-beta0.3", "dpo", 0.3, steps=40)
    runs = load_runs(tmp_path)[0]
    grid = curve_panels(runs)
    assert curves_title(grid) == "Training curves (solid: train, mean of the last 1–4 steps (a tenth of each " \
                                 "run); dashed: in-training eval)"
    acc = next(s for s in grid[1][0].series if s.label == "dpo-beta0.3")
    raw = [min(1, 0.05 * s) for s in range(1, 41)]
    assert acc.ys == pytest.approx([sum(raw[max(0, i - 3):i + 1]) / len(raw[max(0, i - 3):i + 1])
                                    for i in range(40)])


def kto_with_one_sided_batches(d, name="kto-beta0.1", steps=10, last_margin=None):
    """A KTO run whose even steps (and the last one, unless `last_margin`) had one label only: no margin."""
    make_run(d, name, "kto", 0.1, steps=steps, gen_acc=0.3, evals=())
    recs = [json.loads(line) for line in (d / name / rundir.METRICS).read_text().splitlines()]
    for rec in recs:
        if rec["split"] == "train" and (rec["step"] % 2 == 0 or rec["step"] == steps):
            rec["margin"] = rec["r_chosen"] = None
    recs[steps - 1]["margin"] = last_margin
    (d / name / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = json.loads((d / name / rundir.RESULT).read_text())
    (d / name / rundir.RESULT).write_text(json.dumps({**res, "final": recs[steps - 1]}))


def test_kto_margin_has_no_gap_where_a_batch_had_one_label(tmp_path):
    from prefpipe.evaluation.plots import curve_panels
    kto_with_one_sided_batches(tmp_path)
    runs = load_runs(tmp_path)[0]
    margin = next(s for s in curve_panels(runs)[2][0].series if s.label == "kto-beta0.1")
    assert margin.xs == [1, 3, 5, 7, 9]  # the steps with a margin, joined
    assert margin.ys == pytest.approx([0.02 * s for s in (1, 3, 5, 7, 9)])  # margin / β = 0.02 * step
    lines = lines_by_label(plot_curves(runs, tmp_path / "curves.png"))
    drawn = next(line for ax, line in lines["kto-beta0.1"] if "margin" in ax.get_ylabel())
    assert not any(math.isnan(y) for y in drawn.get_ydata())


def test_beta_png_has_no_empty_panel(tmp_path):
    from prefpipe.evaluation.plots import beta_panels
    for name, beta, acc in (("dpo-beta1", 1.0, 0.4), ("dpo-beta3", 3.0, 0.5)):
        make_run(tmp_path, name, "dpo", beta, gen_acc=acc, evals=())
    kto_with_one_sided_batches(tmp_path)  # its last train step has no margin: nothing for a KTO margin panel
    make_run(tmp_path, "orpo", "orpo", 0.1, gen_acc=0.45, evals=())
    runs = load_runs(tmp_path)[0]
    grid = beta_panels(runs, None, None)
    panels = [p for row in grid for p in row]
    assert all(p is not None and p.series for p in panels)
    assert [p.title for p in panels] == ["downstream accuracy", "dpo: last train step",
                                         "kto: last train step", "dpo: last train step"]
    fig = plot_beta(runs, None, tmp_path / "beta.png")
    assert len(fig.axes) == len(panels) and all(ax.get_lines() for ax in fig.axes)
