"""Pretrain or fine-tune any zoo model with one pjit-sharded train step.

    python train.py                                    # the embedded default (CPU, minutes)
    python train.py --model llama3.1-8b --data corpus/ --mesh fsdp=-1,tensor=4 --out runs/8b
    python train.py --task classify --init bert-dir --data train.jsonl --eval-data dev.jsonl
    python train.py --help                             # every flag, by group

The trainer lives in zoo/training/ (config, step, loop, pretrain, finetune, plan); this
file is only its command-line entry point, and nothing imports it.
"""

import sys

from zoo.training.main import main

if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
