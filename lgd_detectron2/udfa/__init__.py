"""UDFA (Xu et al., "Robust and Accurate Object Detection via Self-Knowledge Distillation", 2021):
adversarial views and decoupled feature alignment. Modules: ``config`` (MODEL.UDFA, TEST.ADV and
TEST.PGD keys), ``attack`` (the signed-gradient attack and the ``<name>_adv`` / ``<name>_pgd``
evaluations), ``aux_bn`` (separate BatchNorm for adversarial inputs), ``distiller`` (the training
step). Imported by ``lgd_detectron2.modeling``."""
