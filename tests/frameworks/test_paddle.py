"""PaddlePaddle: the Model.fit callback under a real daemon; PaddleOCR-style helpers."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap

from conftest import wait_for
from fw import REPO, job_log, last_step, need, need_daemon_format, resumed_lines, scenario, wait_steps, write_job

need("paddle")


def paddle_ckpts(d):
    st = d / "latest.states"
    try:
        with open(st, "rb") as f:
            step = int(pickle.load(f)["global_step"])
    except (OSError, EOFError, pickle.UnpicklingError, KeyError):
        return {}
    return {d / "latest": step}


def test_paddle_checkpoint_wait_sigkill_preempt_start(daemon):
    need_daemon_format("paddle")
    write_job(daemon, "paddle", "train_paddle.py", "--sleep-per-step", "0.02")
    scenario(daemon, "paddle", paddle_ckpts, startup=240)


OCR_LOOP = textwrap.dedent("""
    import os, paddle
    import trainsup
    from trainsup.integrations.paddle import save_model, load_model, resume_prefix
    paddle.seed(0)
    net = paddle.nn.Linear(4, 1)
    opt = paddle.optimizer.Adam(learning_rate=1e-2, parameters=net.parameters())
    best = load_model(resume_prefix(), net, opt)
    step = best.get("global_step", 0)
    print("start", best.get("start_epoch", 0), step, flush=True)
    x = paddle.ones([2, 4])
    for epoch in range(best.get("start_epoch", 0), 1000):
        for _ in range(5):
            loss = net(x).mean(); loss.backward(); opt.step(); opt.clear_grad(); step += 1
            if trainsup.save_requested():
                save_model(net, opt, os.environ["TRAINSUP_CHECKPOINT_DIR"], "latest", epoch=epoch, global_step=step,
                           best_model_dict={"acc": 0.5})
        if epoch % 2 == 0:
            save_model(net, opt, os.environ["TRAINSUP_CHECKPOINT_DIR"], f"iter_epoch_{epoch}", epoch=epoch,
                       global_step=step, is_best=epoch == 0)
        print("epoch", epoch, step, flush=True)
        if os.environ.get("STOP_AT") == str(epoch):
            break
""")


def test_paddleocr_style_helpers_save_atomically_and_resume_the_newest_prefix(tmp_path):
    """save_model writes PaddleOCR's prefix groups; SIGTERM saves `latest` and exits 143;
    a local run resumes from the newest complete group with load_model."""
    script = tmp_path / "ocr_loop.py"
    script.write_text(OCR_LOOP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    env.update(PYTHONPATH=str(REPO), TRAINSUP_CHECKPOINT_DIR=str(tmp_path / "out"), GLOG_minloglevel="2")
    p = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("epoch 5"):
            p.send_signal(signal.SIGTERM)
            break
    rest = p.stdout.read()
    assert p.wait(120) == 143, rest
    out = tmp_path / "out"
    names = sorted(os.listdir(out))
    assert {"latest.pdopt", "latest.pdparams", "latest.states", "iter_epoch_0.pdparams", "iter_epoch_4.states",
            "best_model"} <= set(names), names
    assert not [n for n in names if n.startswith(".")], f"temp files left: {names}"
    with open(out / "latest.states", "rb") as f:
        st = pickle.load(f)
    assert st["best_model_dict"] == {"acc": 0.5} and st["global_step"] >= 30
    env["STOP_AT"] = str(st["epoch"])
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == f"start {st['epoch'] + 1} {st['global_step']}"


def test_paddle_model_fit_resumes_the_epoch_instead_of_repeating_finished_ones(daemon):
    """Found with a 6-epoch Model.fit preempted in epoch 2: the relaunch's fit() started at
    epoch 0 again and TrainsupCallback.on_epoch_begin overwrote the restored epoch, so every
    finished epoch ran again and later saves carried a wrong epoch. Each epoch must finish
    exactly once across the preemption, and the run end with its last one."""
    need_daemon_format("paddle")
    ckpt = write_job(daemon, "pdfit", "train_paddle.py", "--epochs", "5", "--sleep-per-step", "0.02")
    daemon.start()

    def done() -> list[int]:
        return [int(e) for e in re.findall(r"^epoch (\d+) done$", job_log(daemon, "pdfit"), re.M)]

    wait_for(lambda: len(done()) >= 2, 240, "pdfit: two epochs")
    wait_steps(daemon, "pdfit", last_step(daemon, "pdfit") + 3)    # inside the next epoch
    r = daemon.cli("preempt", "pdfit", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    daemon.wait_state("pdfit", "preempted", timeout=60)
    saved = paddle_ckpts(ckpt)[ckpt / "latest"]
    with open(ckpt / "latest.states", "rb") as f:
        preempted_in = pickle.load(f)["epoch"]
    assert preempted_in == done()[-1] + 1, (preempted_in, done())
    assert daemon.cli("start", "pdfit").returncode == 0
    daemon.wait_state("pdfit", "finished", timeout=240)
    assert done() == [0, 1, 2, 3, 4], f"epochs finished: {done()}"
    assert resumed_lines(daemon, "pdfit")[-1] == str(ckpt / "latest")
    assert last_step(daemon, "pdfit") > saved


MIXED_SAVES = textwrap.dedent("""
    import os, pickle, shutil, sys, paddle
    paddle.seed(0)
    net = paddle.nn.Linear(4, 1)
    opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=net.parameters())
    x = paddle.randn([8, 4])
    out = sys.argv[1]

    def save(d, step):          # PaddleOCR's save_model: in place, .pdopt, .pdparams, .states last
        os.makedirs(d, exist_ok=True)
        paddle.save(opt.state_dict(), os.path.join(d, "latest.pdopt"))
        paddle.save(net.state_dict(), os.path.join(d, "latest.pdparams"))
        with open(os.path.join(d, "latest.states"), "wb") as f:
            pickle.dump({"epoch": 0, "global_step": step, "best_model_dict": {}}, f, protocol=2)

    for step in range(1, 711):
        loss = net(x).mean(); loss.backward(); opt.step(); opt.clear_grad()
        if step in (700, 710):
            save(os.path.join(out, f"at{step}"), step)
    # killed after the new .pdparams, before the new .states: two complete files of step 710
    # next to the complete .states of step 700
    shutil.copytree(os.path.join(out, "at700"), os.path.join(out, "mixed"))
    for s in (".pdopt", ".pdparams"):
        shutil.copy(os.path.join(out, "at710", "latest" + s), os.path.join(out, "mixed", "latest" + s))
""")


def test_paddle_latest_group_mixed_from_two_saves_after_650_adam_steps_is_invalid(tmp_path):
    """Found with PaddleOCR killed inside its in-place save of `latest` after ~650 steps: the
    new .pdopt and .pdparams next to the previous save's .states passed the check, because
    beta1's power accumulator (0.9^(step+1)) had fallen below 1e-30 and the cross-check
    skipped. Real paddle Adam state at steps 700 and 710; the daemon's own scan."""
    from trainsup.checkpoint.index import scan

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    env.update(GLOG_minloglevel="2", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", MIXED_SAVES, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for d, step in (("at700", 700), ("at710", 710)):
        (info,) = scan(tmp_path / d)
        assert info.valid and info.step == step, (d, info.invalid_reason)
    (info,) = scan(tmp_path / "mixed")
    assert not info.valid, "a latest group mixed from the saves at steps 700 and 710 is offered as valid"
    assert "latest.pdopt is from step 710" in info.invalid_reason, info.invalid_reason
