"""The examples run as the docs say to run them (shortened), so they do not rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_steering_experiment_widens_at_a_plateau_without_changing_the_function(tmp_path):
    """examples/steering_experiment.py (docs/img/steering_experiment.png): three real fits, the widen command sent
    over the control socket of the first while it trains."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "steering_experiment.py"), "--epochs", "2",
                             "--min-step", "20", "--window", "10", "--out", str(tmp_path / "out"),
                             "--root", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "steering_experiment.json").read_text())
    assert summary["init"] == "net2net" and summary["epochs"] == 2
    assert 20 <= summary["widen_sent_at_step"] <= summary["widen_applied_at_step"]
    assert abs(summary["output_change_at_widen"]) < 1e-5       # Net2Net keeps the network's function
    for run in ("steered 20-20-20→21", "20-20-20 left alone", "20-20-21 from scratch"):
        assert 0 < summary[run]["final_val_acc"] <= 1, run
    assert (tmp_path / "out" / "steering_experiment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
