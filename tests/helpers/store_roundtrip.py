"""One checkpoint through a real store and back, as the daemon's mirror threads do it
(upload_entry, the commit object, restore_entry), plus the lease's create-if-absent. Run as
a subprocess by tests/integration/test_mirror_stores.py with the store's environment set
(gcsfs reads STORAGE_EMULATOR_HOST at import). Prints one JSON object."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from trainsup.checkpoint.dirhandle import DirHandle
from trainsup.checkpoint.objectstore import Store
from trainsup.daemon.mirror import layout, lease, restore, upload


def main() -> None:
    url, src, dst, options, bucket = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    store = Store(url, options)
    if bucket and not store.fs.exists(bucket):
        store.fs.mkdir(bucket)
    out: dict = {"listed_empty": store.listdir("") == []}
    src_h, dst_h = DirHandle.open(src), DirHandle.open(dst, create=True)
    key = layout.entry_key("step-00000007", 7, 0.0)
    prog = upload.Progress()
    entry = upload.upload_entry(store, src_h, name="step-00000007", rel="step-00000007", members=(), key=key,
                                step=7, created=1.0, reason="periodic", resume="step-00000007", holder="t",
                                rate=None, progress=prog, journal_dir=None, may_commit=lambda: True)
    out["uploaded_bytes"] = prog.done
    body = store.read_bytes(layout.commit_rel(key), layout.MAX_COMMIT_BYTES)
    got = layout.parse_commit(key, body) if body else None
    out["commit_ok"] = got == entry
    rel = restore.restore_entry(store, dst_h, entry, "auto", 4, upload.Progress())
    out["restored"] = rel
    out["same"] = all((src / f.rel).read_bytes() == (dst / f.rel).read_bytes() for f in entry.files)
    out["no_temp"] = not [n for n in os.listdir(dst) if n.startswith(restore.TMP_PREFIX)]
    out["lease_first"] = lease.take(store, 1, "m1", 10.0)
    out["lease_second"] = lease.take(store, 1, "m2", 10.0)
    view = lease.read_newest(store)
    out["lease_holder"] = view.holder if view else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
