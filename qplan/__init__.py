"""qplan: a hardware-aware planner and auto-configurator for QLoRA / LoRA fine-tuning."""
__version__ = "0.1.0"
