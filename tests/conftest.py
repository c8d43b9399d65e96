import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lgd_detectron2  # noqa: E402,F401  (compat layer before any detectron2.layers import)

torch.set_flush_denormal(True)
torch.set_num_threads(2)
