"""Files shipped with the package.

`chelsea.jpg`: "Chelsea the cat" by Stefan van der Walt, CC0, from scikit-image's sample data.
"""

from pathlib import Path


ASSETS_DIR = Path(__file__).parent


def sample_image_path() -> Path:
    """A real photo (a tabby cat) used by the examples and the converter's sanity check."""
    return ASSETS_DIR / "chelsea.jpg"
