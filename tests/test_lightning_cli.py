"""The callback configured from LightningCLI's command line, as a user of ``LightningCLI`` adds it."""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.recording.reader import open_run


class DemoModule(ClassifierModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(ReVACNNNet(), lr=lr)


def test_lightning_cli_configures_the_callback_from_its_arguments(tmp_path):
    cli = LightningCLI(DemoModule, DigitsDataModule, args=[
        "fit", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=revacnn.ReVACNNCallback",
        "--trainer.callbacks.filters_every=2", "--trainer.callbacks.snapshot_every=0",
        "--trainer.callbacks.layers=[net.conv2, net.fc]"])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ReVACNNCallback))
    run = open_run(callback.run_dir)
    assert run.status()["state"] == "finished"
    assert run.layer_names() == ["net.conv2", "net.fc"]
    assert list(run.filter_series("net.conv2", "grad_abs_mean")["step"]) == [1, 2, 4]  # the first step, then every 2
    assert run.snapshot_steps() == []
