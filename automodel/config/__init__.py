"""Strict TOML configs: frozen attrs sections (schema.py, the one source of defaults), loading with dotted overrides
(load.py), cross-field checks (validate.py), and the batch arithmetic derived from them (batch.py)."""

from automodel.config.batch import BatchShape
from automodel.config.errors import ConfigError
from automodel.config.load import (all_key_paths, flatten, from_dict, load_config, parse_override, read_toml,
                                   save_config, to_dict, to_toml)
from automodel.config.schema import (CheckpointConfig, DataConfig, DataSourceConfig, DistillConfig, DistributedConfig,
                                     EvalConfig, LoggingConfig, ModelConfig, OptimConfig, PeftConfig, PreferenceConfig,
                                     ScheduleConfig,                                      TokenizerConfig, TrainConfig, TrainingConfig)
from automodel.config.validate import validate

__all__ = [
    "flatten",
    "BatchShape", "CheckpointConfig", "ConfigError", "DataConfig", "DataSourceConfig", "DistillConfig",
    "DistributedConfig", "EvalConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "PeftConfig", "PreferenceConfig", "ScheduleConfig",
    "TokenizerConfig", "TrainConfig", "TrainingConfig", "all_key_paths", "from_dict", "load_config", "parse_override",
    "read_toml", "save_config", "to_dict", "to_toml", "validate",
]
