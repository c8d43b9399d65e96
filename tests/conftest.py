import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lgd_detectron2  # noqa: E402,F401  (compat layer before any detectron2.layers import)
from lgd_detectron2.denormals import flush_denormals  # noqa: E402

torch.set_num_threads(2)
flush_denormals()  # in every thread (see lgd_detectron2.denormals)
