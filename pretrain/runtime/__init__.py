"""A job's life around the loop: the run dir's lock and files (``rundir``), stop signals
and the watchdog (``signals``), and ``status.json`` (``status``)."""
