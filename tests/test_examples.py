"""The README's first command: classify the bundled photo with the converted bundled checkpoint."""

import re
import subprocess
import sys
from pathlib import Path

import torch
from conftest import FIXTURES
from PIL import Image

from refiner_hf import convert_original_checkpoint
from refiner_hf.assets import sample_image_path
from refiner_hf.hub import image_processor_for_config


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_classify_image_prints_the_models_top_5():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "classify_image.py")], capture_output=True, text=True, timeout=300, check=True
    )
    rows = re.findall(r"^\s+(\d)\. (LABEL_\d+)\s+([0-9.]+)$", result.stdout, flags=re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]

    model = convert_original_checkpoint(FIXTURES / "released_tiny.pth")
    processor = image_processor_for_config(model.config)
    with torch.no_grad():
        probabilities = model(**processor(Image.open(sample_image_path()), return_tensors="pt")).logits.softmax(-1)[0]
    top = probabilities.topk(5)
    assert [r[1] for r in rows] == [f"LABEL_{i}" for i in top.indices.tolist()]
    assert [float(r[2]) for r in rows] == [round(v, 4) for v in top.values.tolist()]
