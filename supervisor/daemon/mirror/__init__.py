"""Checkpoints copied to object storage, restored on a fresh machine, and one machine
training a job at a time (`checkpoint.mirror:`).

  layout.py    where things live in the store: data, commit objects, lease objects (pure)
  policy.py    what to upload next, what the store keeps, whether to restore, the lease (pure)
  transfer.py  the mirror's own threads: bounded per-job queues, taken round-robin
  upload.py    one checkpoint into the store (blocking, on a mirror thread)
  restore.py   one checkpoint out of the store into the checkpoint dir (blocking)
  lease.py     the lease objects (blocking)
  jobmirror.py one job's mirror on the daemon's loop: what job.py calls, what status shows
"""
