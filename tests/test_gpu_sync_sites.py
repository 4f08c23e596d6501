"""benchmarks/gpu_sync_sites.py's book-keeping, run on the CPU: which phase and whose code a sync warning is booked
to. The syncs are planted warnings with the sync-debug text (a CPU has no CUDA syncs to find); the GPU run itself is
in benchmarks/RESULTS.md."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

from revacnn import ReVACNNCallback
from revacnn.telemetry import probes

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_sync_sites.py"
_spec = importlib.util.spec_from_file_location("revacnn_benchmark_gpu_sync_sites", _PATH)
sync_sites = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sync_sites
_spec.loader.exec_module(sync_sites)

SYNC = "called a synchronizing CUDA operation"


def test_each_sync_is_booked_to_its_phase_and_to_the_revacnn_frame_that_made_it(tmp_path, monkeypatch):
    calls = {"hook": 0, "validation": 0}
    channel_abs_sum = probes.channel_abs_sum
    publish_validation = ReVACNNCallback._publish_validation

    def syncing_hook(output, channels_first):  # called from the forward hook, probes.FilterProbe._hook.record
        calls["hook"] += 1
        warnings.warn(SYNC)
        return channel_abs_sum(output, channels_first)

    def syncing_validation(self, trainer, pl_module):
        calls["validation"] += 1
        warnings.warn(SYNC)
        return publish_validation(self, trainer, pl_module)

    monkeypatch.setattr(probes, "channel_abs_sum", syncing_hook)
    monkeypatch.setattr(ReVACNNCallback, "_publish_validation", syncing_validation)
    sites = sync_sites.SyncSites(sync_sites.Phase())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = sites.showwarning
        sync_sites.fit("revacnn", 25, str(tmp_path), sites, accelerator="cpu")

    assert calls["hook"] == 25 * 4 and calls["validation"] == 1  # 4 monitored layers, every step; step 20
    booked = {(phase, owner, where.split(":")[0], where.split(" in ")[1]): times
              for (phase, owner, where, _thread), times in sites.count.items()}
    # the innermost frame of revacnn's own: the planted functions are this file's, so their callers are named
    assert booked == {("training loop", "revacnn", "revacnn/telemetry/probes.py", "record"): 100,
                      ("validation", "revacnn", "revacnn/callback.py", "<lambda>"): 1}
    assert sites.phase.name == "fit end"
