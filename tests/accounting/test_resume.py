"""Kill and resume: a run SIGKILLed after its step-4 checkpoint, resumed from it, continues its ledger."""

import json

import pytest

from wurst.train.accounting.cli import main
from wurst.train.accounting.ledger import read_checkpoint_ledger

pytestmark = pytest.mark.slow

BATCH = 4


@pytest.fixture(scope="module")
def at_checkpoint(killed_and_resumed):
    """The ledger the killed run's step-4 checkpoint holds."""
    return read_checkpoint_ledger(killed_and_resumed.root / "killed_checkpoint.ckpt")


def test_the_checkpoint_holds_the_ledger_up_to_its_step(at_checkpoint, step_sleep_s):
    assert (at_checkpoint.steps, at_checkpoint.samples, at_checkpoint.segments) == (4, 4 * BATCH, 1)
    assert at_checkpoint.device_hours * 3600 >= 4 * step_sleep_s["killed"]


def test_resumed_run_counts_steps_and_samples_from_the_checkpoint_on(killed_and_resumed):
    final = killed_and_resumed.ledger
    assert (final.steps, final.samples, final.segments) == (12, 12 * BATCH, 2)


def test_resumed_run_adds_its_hours_to_the_checkpoints(killed_and_resumed, at_checkpoint, step_sleep_s):
    final = killed_and_resumed.ledger
    added_s = (final.device_hours - at_checkpoint.device_hours) * 3600
    assert added_s >= 8 * step_sleep_s["resumed"]  # steps 5..12 of the resumed segment
    assert added_s <= killed_and_resumed.fit_wall_s[0]  # and nothing beyond the resumed fit


def test_resumed_run_adds_its_energy_and_co2_to_the_checkpoints(killed_and_resumed, at_checkpoint):
    final = killed_and_resumed.ledger
    assert final.energy_kwh > at_checkpoint.energy_kwh
    assert final.co2_kg == pytest.approx(final.energy_kwh * 1.2 * 0.37)


def test_report_reads_the_newest_checkpoint_of_a_run_without_export(killed_and_resumed, capsys):
    assert main(["report", str(killed_and_resumed.root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"].endswith("step=12.ckpt")
    assert (out["accounting"]["steps"], out["accounting"]["segments"]) == (12, 2)
