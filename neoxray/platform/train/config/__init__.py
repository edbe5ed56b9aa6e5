"""The run config of `neoxray train`: one typed schema (`schema`), loaded from YAML and overrides (`loader`,
values checked by `coerce`), checked as a whole (`validate`). Import from here."""

from neoxray.model.precision import PRECISIONS
from neoxray.platform.train.config.loader import (
    apply_overrides,
    dump_yaml,
    from_dict,
    load_run_config,
    save_run_config,
)
from neoxray.platform.train.config.schema import (
    ZERO_STAGES,
    CheckpointSection,
    DataSection,
    EvalSection,
    LoggingSection,
    ModelSection,
    OptimizerSection,
    ParallelSection,
    RunConfig,
    ScheduleSection,
    TrainSection,
    resolved,
    to_dict,
    with_layout,
)
from neoxray.platform.train.config.validate import (
    check_local_paths,
    check_paths,
    gradient_accumulation_steps,
    validate,
)

__all__ = [
    "PRECISIONS",
    "ZERO_STAGES",
    "CheckpointSection",
    "DataSection",
    "EvalSection",
    "LoggingSection",
    "ModelSection",
    "OptimizerSection",
    "ParallelSection",
    "RunConfig",
    "ScheduleSection",
    "TrainSection",
    "apply_overrides",
    "check_local_paths",
    "check_paths",
    "dump_yaml",
    "from_dict",
    "gradient_accumulation_steps",
    "load_run_config",
    "resolved",
    "save_run_config",
    "to_dict",
    "validate",
    "with_layout",
]
