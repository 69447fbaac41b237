"""What runs inside a Slurm allocation: the allocation as `trainsup run` sees it, the job
step's leader (step.py) and one rank's wrapper (task.py)."""
