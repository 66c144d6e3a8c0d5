"""A stand-in for a trainer rank under real torchrun: it behaves at the process boundary as a rank does.

    STAND_IN=slow-stop    on SIGTERM, "checkpoints" for STOP_SECONDS, writes STAND_IN_OUT, exits 130 (INTERRUPTED)
    STAND_IN=data-error   writes a termination record with exit code 3 (DATA_ERROR) and exits 3
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

mode = os.environ["STAND_IN"]
if mode == "data-error":
    record = {"exitCode": 3, "reason": "DataError", "message": "train.jsonl:7: not valid JSON"}
    Path(os.environ["LFT_TERMINATION_LOG"]).write_text(json.dumps(record))
    sys.exit(3)

stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
Path(os.environ["STAND_IN_OUT"] + f".ready-{os.environ['RANK']}").write_text("ready")
while not stop:
    time.sleep(0.1)
time.sleep(float(os.environ["STOP_SECONDS"]))  # a step plus a checkpoint that take longer than torchrun's 30 s
Path(os.environ["STAND_IN_OUT"] + f".saved-{os.environ['RANK']}").write_text("saved")
sys.exit(130)
