#!/usr/bin/env python
"""Write a student-only checkpoint that stock Detectron2 loads with no missing/unexpected keys.

  python tools/export_student.py output/demo/lgd/model_final.pth student.pth
  python tools/train_net.py --config-file configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml \\
      --eval-only MODEL.WEIGHTS student.pth
"""
import argparse

from lgd_detectron2.export import export_student


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint written by tools/train_net.py")
    parser.add_argument("output", help="where to write the student-only checkpoint (.pth)")
    args = parser.parse_args()
    kept, dropped = export_student(args.checkpoint, args.output)
    print(f"wrote {args.output}: {kept} student tensors kept, {dropped} training-only tensors dropped")


if __name__ == "__main__":
    main()
