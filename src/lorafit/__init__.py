"""lorafit: Low-Rank Adaptation (LoRA, RSLoRA, DoRA) for PyTorch models, exact to PEFT and PEFT-format on disk.

    import lorafit
    cfg = lorafit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = lorafit.attach(model, cfg)         # in place; only the adapter trains
    lorafit.save(model, "out/adapter")         # adapter_config.json + adapter_model.safetensors (PEFT layout)
    model = lorafit.load(base_model, "out/adapter")
    model = lorafit.merge(model)               # fold into the base weights
    lorafit.suggest(model)                     # the rules of thumb, checked against lorafit.plan's estimate
    lorafit.quantize(model, "nf4")             # QLoRA: NF4 (or int8) frozen linears via torchao, then attach

Importing lorafit loads torch and safetensors only: transformers, PyYAML, tqdm and matplotlib are imported by the
functions that need them.
"""

__version__ = "0.1.0"

from .advise.plan import plan  # noqa: E402
from .advise.probe import probe  # noqa: E402
from .advise.suggest import suggest  # noqa: E402
from .combine import combine  # noqa: E402
from .errors import AdapterError, ConfigError, DataError, TrainingError  # noqa: E402
from .layers import LoraLayer  # noqa: E402
from .lora_config import LoraConfig  # noqa: E402
from .mixed import per_row  # noqa: E402
from .model import adapter_layers, adapters, attach, delete, disabled, merge, set_active, trainable_parameters  # noqa: E402,E501
from .peft_format import load, save  # noqa: E402
from .quant import dequantize, quantize  # noqa: E402

__all__ = ["LoraConfig", "ConfigError", "AdapterError", "DataError", "TrainingError", "LoraLayer", "attach", "load",
           "save", "merge", "disabled", "trainable_parameters", "adapter_layers", "adapters", "set_active", "delete",
           "per_row",
           "combine", "quantize", "dequantize",
           "plan", "probe", "suggest",
           "__version__"]
