"""Training: settings (TrainConfig), data, the resumable loop, checkpoints, torchrun scale-out and the report.

``run(TrainConfig(...))`` is what ``lorafit train`` calls. Needs the ``cli`` extra (transformers, PyYAML, tqdm,
matplotlib), imported when a run starts, not when this package is imported.
"""

from .data import Task
from .loop import run
from .train_config import TrainConfig

__all__ = ["TrainConfig", "Task", "run"]
