import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lgd_detectron2  # noqa: E402,F401  (compat layer before any detectron2.layers import)
from lgd_detectron2.denormals import flush_denormals  # noqa: E402

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the
# cores, and so do the tools/train_net.py processes it starts (OMP_NUM_THREADS is inherited).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
if _workers > 1:
    os.environ["OMP_NUM_THREADS"] = str(_threads)
torch.set_num_threads(_threads)
flush_denormals()  # in every thread (see lgd_detectron2.denormals)
