"""PaddlePaddle: the Model.fit callback under a real daemon; PaddleOCR-style helpers."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

from fw import REPO, need, need_daemon_format, scenario, write_job

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
