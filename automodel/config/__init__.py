"""Strict TOML configs: frozen attrs sections, dotted overrides, errors that say what to do."""

from automodel.config.load import (
    ConfigError,
    all_key_paths,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
    to_toml,
    validate,
)
from automodel.config.schema import (
    CheckpointConfig,
    DataConfig,
    DataSourceConfig,
    DistributedConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    ScheduleConfig,
    TokenizerConfig,
    TrainConfig,
    TrainingConfig,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DataSourceConfig", "DistributedConfig", "EvalConfig",
    "LoggingConfig", "ModelConfig", "OptimConfig", "PeftConfig", "ScheduleConfig", "TokenizerConfig", "TrainConfig",
    "TrainingConfig", "all_key_paths", "from_dict", "load_config", "parse_override", "save_config", "to_dict",
    "to_toml", "validate",
]
