"""What the views read: the runs (``hub``), each run's bounded state (``state``), the I/O thread that feeds a live
run (``worker``), recorded runs replayed through the same state updates (``replay``) and the recordings the
analysis views read (``recordings``)."""
