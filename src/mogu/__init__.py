"""mogu: MoGU safety routing for any Hugging Face causal LM."""

__version__ = "0.1.0"

from .config import MoGUConfig  # noqa: E402
from .errors import MoGUError  # noqa: E402
from .model import MoGUModel  # noqa: E402

__all__ = ["MoGUConfig", "MoGUModel", "MoGUError", "__version__"]
