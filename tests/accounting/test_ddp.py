"""A real two-process DDP fit (CPU, gloo): the ledger sums both ranks' time in the fit loop."""

import csv

import pytest

pytestmark = pytest.mark.slow

STEPS, BATCH, WORLD = 8, 4, 2  # tiny_fit.py: 8 optimizer steps, 4 samples per rank per step


def test_device_hours_are_the_sum_over_both_ranks(ddp_run):
    ledger = ddp_run.ledger
    assert ledger.world_size == WORLD and len(ledger.per_rank) == WORLD
    assert ledger.device_hours == pytest.approx(sum(r["device_hours"] for r in ledger.per_rank))


def test_device_hours_cover_every_ranks_training_and_no_more(ddp_run, step_sleep_s):
    device_s = ddp_run.ledger.device_hours * 3600
    assert device_s >= WORLD * STEPS * step_sleep_s["ddp"]  # each rank slept through each step
    assert device_s <= sum(ddp_run.fit_wall_s)  # ... inside each rank's trainer.fit


def test_device_hours_are_about_twice_the_fit_loops_wall_hours(ddp_run):
    ledger = ddp_run.ledger
    assert 1.8 <= ledger.device_hours / ledger.wall_hours <= 2.0


def test_samples_count_both_ranks_batches(ddp_run):
    assert ddp_run.ledger.samples == STEPS * BATCH * WORLD
    assert ddp_run.ledger.steps == STEPS


def test_energy_is_the_configured_cpu_wattage_times_device_hours(ddp_run):
    ledger = ddp_run.ledger  # tiny_fit.py: fallback_watts=50, pue=1.2, 0.37 kg/kWh
    assert (ledger.power_source, ledger.device_name) == ("configured", "cpu")
    assert ledger.energy_kwh == pytest.approx(ledger.device_hours * 0.050, rel=1e-3)
    assert ledger.co2_kg == pytest.approx(ledger.energy_kwh * 1.2 * 0.37)


def test_every_rank_finalizes_the_same_ledger(ddp_run):
    assert ddp_run.ledgers[0] == ddp_run.ledgers[1]


def test_the_figures_reach_the_trainers_loggers(ddp_run):
    with open(ddp_run.root / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("accounting/device_hours")]
    assert len(rows) >= 2  # running figures, then the final ones
    assert float(rows[-1]["accounting/device_hours"]) == pytest.approx(ddp_run.ledger.device_hours)
    assert float(rows[-1]["accounting/co2_kg"]) == pytest.approx(ddp_run.ledger.co2_kg)
    assert float(rows[-1]["accounting/samples_per_s"]) > 0
