"""What the callback measures and publishes: one run's telemetry (``session``), when each quantity is due
(``schedule``), per-filter quantities on the device (``probes``), the kept validation images (``validation``), the
messages built from them (``messages``, ``snapshot``), per-step scalars (``scalars``), the one asynchronous
device-to-host copy per publish (``transfer``) and the model's layer graph (``structure``)."""
