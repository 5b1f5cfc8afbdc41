"""The command-line error policy, kept importable from its former home; see [`refiner_hf.cli`]."""

from ..cli import (  # noqa: F401
    EXIT_DATA,
    EXIT_USAGE,
    ArgumentParser,
    CommandError,
    DataError,
    OneLineErrors,
    UsageError,
    check_input_directory,
    check_input_file,
    check_model_path,
    check_output_path,
    command_status,
    did_you_mean,
    file_kind,
    is_main_process,
    loading_error,
    looks_like_a_path,
    one_line,
    run_command,
)
