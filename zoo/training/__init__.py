"""Training: typed config (config.py), optimizer, the one jitted step (step.py), the one loop
(loop.py) with its hooks for pretraining (pretrain.py) and fine-tuning (finetune.py), the run
directory and checkpoints (run_dir.py), multi-process start-up and signals (distributed.py),
logging (metrics.py) and the AOT planner (plan.py). `python train.py` is main.main."""
