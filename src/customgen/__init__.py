"""customgen: customized image generation with Stable Diffusion v1.5 (styles and subjects)."""

__version__ = "0.1.0"

from customgen.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
