"""Launching a job: the spawn into its own cgroup (clone3 with CLONE_INTO_CGROUP where the C
launcher is built), signals through pidfds, reaping, and the cgroup tree itself."""
