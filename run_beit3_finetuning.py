"""Fine-tune or evaluate BEiT-3 image captioning with the flags of microsoft/unilm's
``beit3/run_beit3_finetuning.py``. Run it with python, torchrun or ``python -m torch.distributed.launch``;
``beit3cap train`` takes the same flags."""

import sys

from beit3cap.train import main

if __name__ == "__main__":
    sys.exit(main())
