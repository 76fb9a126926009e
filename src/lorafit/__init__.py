"""lorafit: Low-Rank Adaptation (LoRA, RSLoRA, DoRA) for PyTorch models, exact to PEFT and PEFT-format on disk.

    import lorafit
    cfg = lorafit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = lorafit.attach(model, cfg)         # in place; only the adapter trains
    lorafit.save(model, "out/adapter")         # adapter_config.json + adapter_model.safetensors (PEFT layout)
    model = lorafit.load(base_model, "out/adapter")
    model = lorafit.merge(model)               # fold into the base weights
"""

__version__ = "0.1.0"

from .config import ConfigError, LoraConfig  # noqa: E402
from .model import adapter_layers, attach, disabled, merge, trainable_parameters  # noqa: E402
from .io import AdapterError, load, save  # noqa: E402
from .layers import LoraLayer  # noqa: E402

__all__ = ["LoraConfig", "ConfigError", "AdapterError", "LoraLayer", "attach", "load", "save", "merge", "disabled",
           "trainable_parameters", "adapter_layers", "__version__"]
