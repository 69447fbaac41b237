import sys

if "run" in sys.argv[1:]:
    from . import earlysignals
    earlysignals.catch()      # before the imports: a notice now must not kill `trainsup run`

from .cli.main import main  # noqa: E402

sys.exit(main())
