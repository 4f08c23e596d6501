"""The overhead budget: planning from measured costs (unit), and a real Trainer whose telemetry is made expensive
keeping within its budget (integration)."""

from __future__ import annotations

import time

import pytest
import torch

from revacnn.telemetry.budget import OverheadBudget, nice_at_least
from revacnn.wire.ledger import CpuLedger

PLAN = {"scalars_every": 1, "filters_every": 50, "snapshot_every": 500}


def run_steps(budget: OverheadBudget, steps: int, step_seconds: float, costs: dict[str, tuple[int, float]],
              clock: list[float]) -> None:
    """Feed ``steps`` steps of ``step_seconds`` bare time; ``costs[q] = (every, seconds)`` spent every that many
    steps on the training thread (added to the step's wall time, as the callback's work is)."""
    for _ in range(steps):
        clock[0] += step_seconds
        step = int(round(clock[0] / step_seconds))
        for quantity, (every, seconds) in costs.items():
            if step % every == 0:
                budget.spent(quantity, seconds)
                clock[0] += seconds
        budget.step_ended(clock[0])


@pytest.mark.parametrize("value,want", [(0.2, 1), (1, 1), (1.01, 2), (2.5, 3), (3.2, 5), (7, 10), (21, 30),
                                        (49, 50), (51, 100), (2001, 3000)])
def test_nice_cadences(value, want):
    assert nice_at_least(value) == want


def test_the_plan_keeps_the_measured_cost_within_the_budget():
    clock = [0.0]
    budget = OverheadBudget(0.02, dict(PLAN), replan_seconds=2.0)
    # a 0.1 s step; per-filter data costs 0.05 s, a snapshot 1 s, scalars 0.1 ms
    costs = {"scalars": (1, 1e-4), "filters": (1, 0.05), "snapshot": (1, 1.0)}
    for _ in range(30):
        plan = dict(budget.plan)
        run_steps(budget, 40, 0.1, {q: (plan[f"{q}_every"], s) for q, s in
                                    ((q, c[1]) for q, c in costs.items())}, clock)
    plan = budget.plan
    # planned: 0.75 · 0.02 · 0.1 s = 1.5 ms per step: 0.1 ms scalars, filters 50 ms / N ≤ 85 % of the rest,
    # snapshots the rest
    spent = 1e-4 / plan["scalars_every"] + 0.05 / plan["filters_every"] + 1.0 / plan["snapshot_every"]
    assert spent <= 0.75 * 0.02 * 0.1 * 1.25
    assert plan["scalars_every"] == 1
    assert plan["filters_every"] == 50                # 0.05 / (0.85 · 1.4 ms) = 42.0 → 50
    assert plan["snapshot_every"] == 3000             # 1 s / (1.4 ms − 50 ms / 50) = 2,500 → 3000
    assert budget.report()["cost"] == pytest.approx(spent / 0.1, rel=0.05)


def test_per_filter_data_takes_what_fixed_snapshots_leave():
    """A 0.1 s step, per-filter data at 10 ms, so 1.5 ms planned per step. Snapshots fixed by the user: off, the
    whole budget goes to per-filter data; every 100 steps at 100 ms (1 ms a step), per-filter data gets the
    0.5 ms they leave; every step at 10 ms (over budget on their own), it still gets 15 %."""
    for snapshot_cost, snapshot_every, want in ((0.0, 0, 10), (0.1, 100, 20), (0.01, 1, 50)):
        clock = [0.0]
        budget = OverheadBudget(0.02, {**PLAN, "snapshot_every": snapshot_every}, fixed={"snapshot_every"},
                                replan_seconds=2.0)
        for _ in range(30):
            costs = {"filters": (budget.plan["filters_every"], 0.01)}
            if snapshot_every:
                costs["snapshot"] = (snapshot_every, snapshot_cost)
            run_steps(budget, 100, 0.1, costs, clock)
        # 10 ms / 1.5 ms = 6.7 → 10; 10 ms / 0.5 ms = 20; 10 ms / (0.15 · 1.5 ms) = 44 → 50
        assert budget.plan["filters_every"] == want, (snapshot_every, budget.plan)
        assert budget.plan["snapshot_every"] == snapshot_every


def test_cheap_per_filter_data_is_refreshed_at_the_dashboards_rate_not_more():
    clock = [0.0]
    budget = OverheadBudget(0.02, dict(PLAN), replan_seconds=2.0)
    for _ in range(10):
        plan = dict(budget.plan)
        run_steps(budget, 300, 0.01, {"filters": (plan["filters_every"], 1e-5)}, clock)
    assert budget.plan["filters_every"] == 50    # 0.5 s / 10 ms: the budget would allow every step


def test_fixed_cadences_are_kept_and_background_cpu_counts():
    clock = [0.0]
    ledger = CpuLedger()
    budget = OverheadBudget(0.02, dict(PLAN), fixed={"filters_every"}, replan_seconds=2.0)
    budget.ledgers = [ledger]
    for _ in range(10):
        ledger.charge("snapshot", 5.0)   # each snapshot costs its writer 5 s of CPU
        run_steps(budget, 100, 0.1, {"filters": (50, 1.0), "snapshot": (500, 1e-3)}, clock)
    assert budget.plan["filters_every"] == 50   # fixed, however much it costs
    assert budget.report()["seconds"]["snapshot"] > 1.0
    assert budget.plan["snapshot_every"] >= 2 * 5.0 / (0.02 * 0.1)


def test_a_one_time_background_cost_does_not_stay_in_the_estimate():
    """The recorder's first per-filter step creates every layer's files (~1.5 s for a ResNet-50): counted once, not
    averaged into every later occurrence, so the plan comes back to what the steady cost allows."""
    clock = [0.0]
    ledger = CpuLedger()
    budget = OverheadBudget(0.02, dict(PLAN), fixed={"snapshot_every"}, replan_seconds=2.0)
    budget.ledgers = [ledger]
    occurrences = 0
    for step in range(1, 20001):
        clock[0] += 0.1
        if step % budget.plan["filters_every"] == 0:
            budget.spent("filters", 0.01)
            clock[0] += 0.01
            ledger.charge("step", 5.0 if occurrences == 0 else 0.005)
            occurrences += 1
        budget.step_ended(clock[0])
    # steady cost 15 ms per occurrence: 0.015 / 1.5 ms = 10 (no snapshot has cost anything: per-filter data gets
    # the whole budget); the 20 the warm-up chose is kept, as 10 would not fit with 10 % to spare. A run-long
    # average would hold 5 s / occurrences on top, and more than 30.
    assert budget.report()["seconds"]["filters"] == pytest.approx(0.015, rel=0.05)
    assert budget.plan["filters_every"] == 20


def test_one_stall_does_not_move_the_plan_and_a_lasting_change_does():
    """Per-filter data every few planning windows costs 30 ms (→ every 20 steps of 0.1 s within 1.5 ms a step). One
    measurement stalled at 200 ms (a busy machine) leaves the plan as it is; a lasting 60 ms moves it to 50 within a
    few measurements."""
    clock = [0.0]
    budget = OverheadBudget(0.02, {**PLAN, "snapshot_every": 0}, fixed={"snapshot_every"}, replan_seconds=2.0)
    occurrences, stalled_at, plans = 0, None, [0]
    for step in range(1, 4001):
        clock[0] += 0.1
        if step % budget.plan["filters_every"] == 0:
            occurrences += 1
            seconds = 0.06 if step > 2500 else 0.03
            if occurrences == 40:
                seconds, stalled_at = 0.2, step
            budget.spent("filters", seconds)
            clock[0] += seconds
        budget.step_ended(clock[0])
        plans.append(budget.plan["filters_every"])
    assert 500 < stalled_at < 1500
    assert set(plans[stalled_at - 100:2500]) == {20}   # before the stall and after it
    assert plans[-1] == 50                             # 0.06 / 1.5 ms = 40 → 50
    assert plans.index(50, 2500) - 2500 <= 200         # within a few measurements of the change


def test_a_dear_first_occurrence_is_followed_soon_by_a_second():
    """The first per-filter measurement costs 5 s (first calls), the next ones 10 ms: the plan measures again within a
    few dashboard refreshes instead of the ~5000 steps the first cost alone would space it by."""
    clock = [0.0]
    budget = OverheadBudget(0.02, dict(PLAN), fixed={"snapshot_every"}, replan_seconds=2.0)
    at = []
    for step in range(1, 3001):
        clock[0] += 0.1
        if step % budget.plan["filters_every"] == 0:
            seconds = 5.0 if not at else 0.01
            budget.spent("filters", seconds)
            clock[0] += seconds
            at.append(step)
        budget.step_ended(clock[0])
    assert at[0] == 50 and at[1] - at[0] <= 4 * 5    # 4 refreshes of 0.5 s at 0.1 s a step
    assert budget.plan["filters_every"] == 10      # 0.01 / 1.5 ms = 6.7 → 10 (the snapshots' fixed cadence costs nothing)


def test_without_a_budget_nothing_changes_but_the_cost_is_reported():
    clock = [0.0]
    budget = OverheadBudget(None, dict(PLAN), replan_seconds=2.0)
    run_steps(budget, 200, 0.1, {"filters": (50, 0.5)}, clock)
    assert budget.plan == PLAN
    assert budget.report()["cost"] == pytest.approx(0.5 / 50 / 0.1, rel=0.05)


def test_a_real_run_keeps_expensive_telemetry_within_its_budget(tmp_path, monkeypatch):
    """Per-filter measurement made to cost 30 ms: the budget spaces it out so that it costs ≤ 2 % of training (with
    the hysteresis' 25 %), and the heartbeat says so."""
    from conftest import Listener
    from helpers import quiet_trainer

    from revacnn import ReVACNNCallback
    from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
    from revacnn.telemetry.probes import FilterProbe

    measure = FilterProbe.measure

    def slow_measure(self):
        time.sleep(0.03)
        return measure(self)

    monkeypatch.setattr(FilterProbe, "measure", slow_measure)
    torch.manual_seed(0)
    callback = ReVACNNCallback(snapshot_every=0, record=False)
    listener = Listener(lambda: callback.connection_file).start()
    trainer = quiet_trainer(max_steps=300, callbacks=[callback], default_root_dir=tmp_path, limit_val_batches=0,
                            num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=32))
    messages = listener.join()
    schedules = [m.body["schedule"] for m in messages if m.type == "status" and "schedule" in m.body]
    assert schedules, "the heartbeat carries the schedule"
    last = schedules[-1]
    assert last["budget"] == 0.02 and last["snapshot_every"] == 0 and last["scalars_every"] == 1
    assert last["fixed"] == ["scalars_every", "snapshot_every"]   # scalars: every step, never thinned
    per_filter = sorted(m.body["step"] for m in messages if m.type == "step" and m.body.get("per_filter"))
    gaps = [b - a for a, b in zip(per_filter, per_filter[1:])]
    step_seconds = last["step_seconds"]
    # every measurement costs ≥ 30 ms: the plan's cadence keeps that within the budget (+25 % hysteresis); with
    # snapshots off, per-filter data may take all of it
    assert last["filters_every"] >= 0.03 / (0.02 * step_seconds) / 1.25
    assert gaps[-1] == last["filters_every"] or per_filter[-1] + last["filters_every"] > 300
    # what it costs is within the planned three quarters of the budget (+25 % hysteresis); the scalars, never thinned,
    # cost what they cost (~1 % of the demo's step) and come on top
    filters = last["seconds"]["filters"] / last["filters_every"] / step_seconds
    scalars = last["seconds"]["scalars"] / step_seconds
    assert filters <= 0.75 * 0.02 * 1.25, last
    assert last["cost"] == pytest.approx(filters + scalars, rel=0.01, abs=1e-4)
