from .trainer import NonFiniteLossError, Trainer, build_optimizer, check_num_classes
