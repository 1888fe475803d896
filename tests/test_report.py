"""`prefpipe report`: the plots are written and readable, and the summary names the winner the numbers pick."""

import json
import math

from prefpipe.evaluation.report import write_report


def make_run(d, name, loss_type, beta, gen_acc=None, pref_acc=None, steps=12):
    r = d / name
    r.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {"split": "train", "step": s, "loss": math.log(2) - 0.01 * s * beta, "acc": min(1, 0.05 * s),
               "margin": 0.02 * s * beta}
        if loss_type == "sft":
            rec = {"split": "train", "step": s, "loss": 1.0 - 0.01 * s, "nll": 1.0 - 0.01 * s}
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"split": "eval", "step": steps, "loss": 0.1, "acc": 0.9, "margin": 9.0}))
    (r / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    final = json.loads(lines[steps - 1])
    (r / "result.json").write_text(json.dumps({"name": name, "dir": name, "loss_type": loss_type, "beta": beta,
                                               "steps": steps, "final": final}))
    if gen_acc is not None:
        n = 200
        (r / "eval_gen.json").write_text(json.dumps({"accuracy": gen_acc, "correct": round(gen_acc * n), "n": n}))
    if pref_acc is not None:
        (r / "eval_pref.json").write_text(json.dumps({"acc": pref_acc, "margin": 0.5}))


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
    (d / "reference" / "eval_gen.json").write_text(json.dumps({"accuracy": 0.5, "correct": 100, "n": 200}))
    (d / "cache").mkdir()  # not a run: ignored

    r = run_cli("report", d)
    assert r.exit_code == 0, r.output
    assert is_png(d / "curves.png") and is_png(d / "beta.png")
    md = (d / "summary.md").read_text()
    assert "**Best run: dpo-beta0.3** (downstream accuracy 70.0%; the SFT model scores 50.0%, a change of " \
           "+20.0 points)" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| SFT model (reference) |")
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
    make_run(d2, "ipo-beta0.1", "ipo", 0.1, steps=5)
    make_run(d2, "ipo-beta0.5", "ipo", 0.5, steps=8)
    res = write_report(d2)
    assert (res["best"], res["basis"], res["value"]) == ("ipo-beta0.5", "final reward accuracy", 0.4)
    res = write_report(d2, only=["ipo-beta0.1"])  # the pipeline reports only its own runs
    assert res["best"] == "ipo-beta0.1" and "ipo-beta0.5" not in res["markdown"]
    assert is_png(d2 / "curves.png") and is_png(d2 / "beta.png")


def test_report_errors_are_one_line(tmp_path, run_cli):
    r = run_cli("report", tmp_path / "missing")
    assert r.exit_code == 2 and "no such runs directory" in r.output
    r = run_cli("report", tmp_path)
    assert r.exit_code == 2 and "no training runs here" in r.output
    make_run(tmp_path, "dpo-beta0.1", "dpo", 0.1)
    (tmp_path / "dpo-beta0.1" / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    r = run_cli("report", tmp_path)
    assert r.exit_code == 2 and "row 2: not valid JSON" in r.output and "Traceback" not in r.output
