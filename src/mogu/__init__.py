"""mogu: MoGU safety routing for any Hugging Face causal LM."""

from mogu.version import __version__  # noqa: E402

from mogu.tuner.config import MoGUConfig  # noqa: E402
from mogu.errors import MoGUError  # noqa: E402
from mogu.tuner.model import MoGUModel  # noqa: E402

__all__ = ["MoGUConfig", "MoGUModel", "MoGUError", "__version__"]
