"""llmneo: parameter-efficient knowledge distillation of LLMs (LLM-NEO: LoRA + KD in one loop)."""

from llmneo.errors import LlmneoError

__version__ = "0.1.0"
__all__ = ["LlmneoError", "__version__"]
