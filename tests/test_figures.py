"""`evaluate.py figures`: missing inputs skipped with one line naming the command that makes them, the same bytes on
a rerun. Every figure drawn from the smoke demo's outputs: tests/test_evaluate.py, test_demo_smoke_runs_end_to_end."""
import os

import pytest

import evaluate as ev
from helpers import DEMO_FIGURES, STUDY_FIGURES, assert_drawn


def test_figures_skip_what_is_missing_and_redraw_the_same_bytes(tmp_path, capsys):
    """Without the demo's and the study's folders only the dead-leaves figure is drawn; each other one is skipped
    with one line naming the file it lacks and the command that makes it. A rerun writes the same bytes."""
    out = tmp_path / "figs"
    args = ["figures", "--demo", str(tmp_path / "no-demo"), "--study", str(tmp_path / "no-study"), "--out", str(out)]
    ev.main(args)
    log = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["freqwarm_input.png"]
    assert_drawn(out / "freqwarm_input.png")
    skipped = [line for line in log.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 8, log
    for name in DEMO_FIGURES:
        line = next(line for line in skipped if name in line)
        assert f"{tmp_path / 'no-demo'}" in line and f"`bash demo.sh {tmp_path / 'no-demo'}` makes it" in line
    for name in STUDY_FIGURES:
        line = next(line for line in skipped if name in line)
        assert f"`python study.py --setting cpu --out {tmp_path / 'no-study'} --parts " in line
    first = (out / "freqwarm_input.png").read_bytes()
    ev.main(args)
    assert (out / "freqwarm_input.png").read_bytes() == first


@pytest.mark.parametrize("argv,msg", [(["--subsets", "2"], "--subsets must be >= 3"),
                                      (["--n", "5"], "cannot fill --subsets 4")])
def test_figures_refuses_too_few_subsets(argv, msg, tmp_path):
    with pytest.raises(ev.UserError, match=msg):
        ev.main(["figures", "--out", str(tmp_path), *argv])
