"""nanovlm: a minimal, readable PyTorch codebase for LLaVA-style vision-language models."""

from .generate import Sampling, generate, generate_text
from .image import ImageProcessor, load_image
from .llm import LLM, LLMConfig
from .templates import TEMPLATES, get_template, render, tokenize_conversation
from .tokenizer import Tokenizer
from .vision import VisionConfig, VisionTower
from .vlm import VLM, VLMConfig, load_pretrained

__all__ = ["ImageProcessor", "LLM", "LLMConfig", "Sampling", "TEMPLATES", "Tokenizer", "VLM", "VLMConfig",
           "VisionConfig", "VisionTower", "generate", "generate_text", "get_template", "load_image",
           "load_pretrained", "render", "tokenize_conversation"]
