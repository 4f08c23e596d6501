"""A laptop's install: ``pip install ".[dash]"`` into a fresh virtual environment gets a dashboard that serves a
recorded run and reads recordings, without torch or Lightning (principle 4: the dashboard side never imports
torch). The static check (nothing under ``dashboard/`` imports torch) is in test_analysis.py; this one installs."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
import venv
from pathlib import Path

from browser_support import free_port, sigint_as_in_a_terminal
from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from helpers import quiet_trainer, wait_for

REPO = Path(__file__).resolve().parents[1]


def record_a_run(root: Path) -> Path:
    callback = ReVACNNCallback(filters_every=2, snapshot_every=4, run_dir=root / "logs" / "run")
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[callback],
                            num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=16))
    return callback.run_dir


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def test_the_dash_extra_alone_serves_and_reads_a_recording_without_torch(tmp_path):
    run_dir = record_a_run(tmp_path)
    env_dir = tmp_path / "laptop"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{REPO}[dash]"],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr

    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                               check=True).stdout.lower()
    assert not [line for line in installed.splitlines()
                if line.split("==")[0] in ("torch", "pytorch-lightning", "lightning", "torchvision")], installed
    read = subprocess.run([str(python), "-c", (
        "import sys; from revacnn.recording.reader import open_run; import revacnn_dash.app; "
        f"run = open_run({str(run_dir)!r}); print(run.scalars()['step'].tolist(), run.snapshot_steps(), "
        "'torch' in sys.modules)")], capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    assert read.stdout.split() == ["[1,", "2,", "3,", "4]", "[1,", "4]", "False"], read.stdout

    port = free_port()
    log = tmp_path / "dash.log"
    process = subprocess.Popen([str(env_dir / "bin" / "revacnn-dash"), "--logdir", str(tmp_path / "logs"), "--port",
                                str(port), "--no-umap-warmup"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=sigint_as_in_a_terminal,
                               env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
    try:
        wait_for(lambda: f"127.0.0.1:{port}" in log.read_text() or process.poll() is not None, timeout=60)
        assert process.poll() is None, log.read_text()
        assert "<title>" in fetch(f"http://127.0.0.1:{port}/")
        assert '"run-select"' in fetch(f"http://127.0.0.1:{port}/_dash-layout")
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
    assert "Traceback" not in log.read_text(), log.read_text()

