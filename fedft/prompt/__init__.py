"""Soft prompt tuning: n trainable virtual tokens prepended to the input embeddings."""

from fedft.prompt.model import PromptTunedModel, get_prompt, set_prompt
from fedft.prompt.soft_prompt import SoftPrompt

__all__ = ["PromptTunedModel", "SoftPrompt", "get_prompt", "set_prompt"]
