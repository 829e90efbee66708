"""The plan's pilot rules: which learning rates a pilot hands to the confirmatory arms."""

from __future__ import annotations

import json

import pytest

from ctxdistill.errors import CtxDistillError
from ctxdistill.experiments.pilots import bracketing_lrs, lowest_lr_reaching, main, pilot_gains


def summary(base: float, runs: list[tuple[str, float, float]]) -> dict:
    ev = lambda v: {"metrics": {"knowledge.mcq_loglik": {"value": v}}}  # noqa: E731
    return {"domains": {"pilot": {"baseline": ev(base),
                                  "runs": [ev(v) | {"run": {"method": m, "lr": lr, "seed": 1}} for m, lr, v in runs]}}}


def test_gains_are_points_over_the_pilots_own_baseline_and_averaged_over_seeds():
    s = summary(0.20, [("sdft", 1e-4, 0.30), ("sdft", 1e-4, 0.34), ("sdft", 3e-5, 0.22)])
    gains = pilot_gains(s, "pilot")
    assert list(gains["sdft"]) == [3e-5, 1e-4]  # increasing lr
    assert gains["sdft"][1e-4] == pytest.approx(12.0) and gains["sdft"][3e-5] == pytest.approx(2.0)
    with pytest.raises(CtxDistillError, match="no evaluated baseline"):
        pilot_gains(s, "other")


def test_the_bracket_is_the_first_adjacent_pair_around_the_target_else_the_two_nearest():
    assert bracketing_lrs({3e-5: 2.0, 1e-4: 12.0, 3e-4: 20.0, 1e-3: 30.0}, 16)[0] == [1e-4, 3e-4]
    assert bracketing_lrs({3e-5: 2.0, 1e-4: 16.0, 3e-4: 20.0}, 16)[0] == [3e-5, 1e-4]  # a gain equal to the target brackets it
    lrs, why = bracketing_lrs({3e-5: 1.0, 1e-4: 3.0, 3e-4: 8.0, 1e-3: 6.0}, 16)
    assert lrs == [3e-4, 1e-3] and "no adjacent pair brackets +16" in why
    with pytest.raises(CtxDistillError, match="at least two"):
        bracketing_lrs({1e-4: 3.0}, 16)


def test_the_lowest_lr_at_which_every_method_reaches_the_threshold():
    gains = {"disc": {1e-5: 4.0, 3e-5: 11.0, 1e-4: 20.0}, "ft": {1e-5: 6.0, 3e-5: 9.0, 1e-4: 25.0}}
    assert lowest_lr_reaching(gains, 10)[0] == 1e-4  # at 3e-5 FT gains only +9
    assert lowest_lr_reaching(gains, 30)[0] is None


def test_the_command_prints_the_choice_and_fails_in_one_line(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(summary(0.2, [("sdft", 3e-5, 0.22), ("sdft", 1e-4, 0.32), ("sdft", 3e-4, 0.40)])))
    assert main([str(path), "--domain", "pilot", "--bracket", "16"]) == 0
    assert "sdft: lrs [0.0001, 0.0003]: their gains +12.0 and +20.0 bracket +16" in capsys.readouterr().out
    assert main([str(path), "--domain", "missing", "--all-reach", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctxdistill: error: ") and err.count("\n") == 1
