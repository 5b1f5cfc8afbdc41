"""
Convert an original Refiner-ViT checkpoint (the authors' timm-based code) into a Hugging Face model directory.

The same command is installed as `refiner-vit-convert`; see `--help`. The released Refiner-ViT-L at 448 px:

    python convert/convert_refiner_timm_to_hf.py --checkpoint Refiner_ViT_L_448.pth
"""

import sys

from refiner_hf.convert_checkpoint import main


if __name__ == "__main__":
    sys.exit(main())
