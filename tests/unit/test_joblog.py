"""The per-job log: size cap with rotation, tail across the rotation boundary."""

from trainsup.daemon.joblog import JobLog


def test_log_rotates_at_the_cap_and_keeps_n_backups(tmp_path):
    log = JobLog(tmp_path / "job.log", max_bytes=1000, backups=2)
    for i in range(300):
        log.write(f"line {i:04d}\n".encode())      # 10 bytes a line: 3000 bytes in all
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["job.log", "job.log.1", "job.log.2"]
    assert all((tmp_path / f).stat().st_size <= 1000 for f in files)
    assert (tmp_path / "job.log").read_text().splitlines()[-1] == "line 0299"


def test_tail_reaches_into_the_previous_file(tmp_path):
    log = JobLog(tmp_path / "job.log", max_bytes=100, backups=1)
    for i in range(15):
        log.write(f"line {i:04d}\n".encode())
    assert log.tail(12).splitlines() == [f"line {i:04d}" for i in range(3, 15)]
    assert log.tail(0) == ""


def test_a_full_disk_drops_output_without_raising(tmp_path, caplog):
    log = JobLog(tmp_path / "missing" / "job.log")
    (tmp_path / "missing").write_text("a file where the log dir should be")
    log.write(b"hello\n")
    log.write(b"again\n")
    assert caplog.text.count("cannot write") == 1
