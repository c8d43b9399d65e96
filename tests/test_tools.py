"""tools/visualize_teacher.py and tools/export_student.py on a small LGD checkpoint."""
import os
import subprocess
import sys

import torch
from PIL import Image

from detectron2.modeling import build_model

from common import DEMO_LGD, REPO, load_cfg

TINY = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]


def test_visualize_teacher_writes_one_png_per_level(tmp_path):
    cfg = load_cfg(DEMO_LGD, *TINY)
    torch.manual_seed(0)
    ckpt = tmp_path / "lgd.pth"
    torch.save({"model": build_model(cfg).state_dict()}, ckpt)
    out = tmp_path / "maps"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "visualize_teacher.py"), "--config-file", DEMO_LGD,
         "--weights", str(ckpt), "--dataset", "demo_shapes_val", "--index", "2", "--output", str(out),
         "MODEL.DEVICE", "cpu", *TINY],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == [f"teacher_p{i}.png" for i in range(2, 7)]
    width, height = Image.open(out / "teacher_p2.png").size
    assert width > 800 and height > 200
