"""Emergency saves for framework users: `trainsup.integrations.<framework>`.

Each module imports only its own framework (and trainsup.emergency, which imports none):

    hf         transformers Trainer: TrainsupCallback, resume_checkpoint()
    lightning  Lightning Trainer: TrainsupCallback, ckpt_path()
    keras      Keras 3 model.fit: TrainsupBackup (BackupAndRestore's files, written atomically)
    paddle     paddle.Model.fit: TrainsupCallback; PaddleOCR-style save_model/load_model

Every one turns the save signal into a save at the next step boundary, saves once and
exits 0 after a `preempt` notice, saves and exits 143 on SIGTERM, and writes files the
daemon recognises (see the README, "Integrations").
"""
