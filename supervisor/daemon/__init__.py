"""The supervising process: the event loop (loop.py, wiring only), each job's state machine
(job.py), the control verbs' handlers, the adapter to the checkpoint store (checkpoints.py),
the state DB, monitors, hooks, metrics, notices/ (sources of preemption notices) and launch/
(spawn into a cgroup, signal, reap)."""
