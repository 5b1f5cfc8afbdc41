"""
Pack a token-labeling relabel directory (`RELABEL_ROOT/<wnid>/<image stem>.pt`) into one memory-mapped,
pickle-free store. The same command is installed as `refiner-vit-pack-relabel`; see `--help`.

    python examples/pack_relabel.py label_top5_train_nfnet relabel_nfnet_packed --num-workers 8
"""

import sys

from refiner_hf.token_labeling.pack_cli import main


if __name__ == "__main__":
    sys.exit(main())
