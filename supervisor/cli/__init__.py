"""The `trainsup` command: argument parsing and printing (main), text rendering, plots, the
demo, and `trainsup slurm`. Talks to the daemon through control/client.py only."""
