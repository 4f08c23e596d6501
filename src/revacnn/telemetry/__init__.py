"""What the callback measures: per-filter quantities on the device (``probes``), per-step scalars (``scalars``),
the one asynchronous device-to-host copy per publish (``transfer``) and the model's layer graph (``structure``)."""
