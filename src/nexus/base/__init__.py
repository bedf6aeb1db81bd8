"""The frozen base model: its checkpoint files, quantized formats, quantized experts and loader."""
