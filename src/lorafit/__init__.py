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

import importlib  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402

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


class _RenamedModule(types.ModuleType):
    """A module's old name, kept for the 0.1 series: importing it works, and its first attribute read imports the
    new module and warns once (DeprecationWarning). No file carries the old name, so none shadows the standard
    library's ``io``."""

    def __init__(self, old: str, new: str):
        super().__init__(f"{__name__}.{old}")
        self._new = f"{__name__}.{new}"

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        module = importlib.import_module(self._new)
        warnings.warn(f"{self.__name__} is now {self._new}; the old name goes in lorafit 0.2", DeprecationWarning,
                      stacklevel=2)
        self.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        return getattr(module, attr)


for _old, _new in (("io", "peft_format"), ("trainer", "hf_trainer")):
    sys.modules[f"{__name__}.{_old}"] = globals()[_old] = _RenamedModule(_old, _new)
del _old, _new
