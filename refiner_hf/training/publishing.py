"""
The Hub side of a training run with `--push_to_hub`: the check, before any training, that the upload can work
([`check_push_to_hub`]), and the upload of the model directory at the end ([`upload_trained_model`]). Under
`accelerate launch` the main process talks to the Hub and every process gets its answer, so that all stop together.

An upload that fails after training leaves a finished run (the model directory, all_results.json, closed trackers,
the output directory released) and ends with one line giving the `hf upload` command that uploads the directory, and
exit status 1, as the converter's: the run did not do all it was asked, which a script that goes on to use the Hub
repository must see.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from ..cli import CommandError
from ..hub import UploadError, check_hub_access, upload_model_directory
from .arguments import Arguments


if TYPE_CHECKING:
    from .trainer import Run


def check_push_to_hub(args: Arguments, output_dir: Path) -> None:
    """
    With `--push_to_hub`, checks before the run's work that its upload can work ([`check_hub_access`]: not offline, a
    valid repository id, a token the Hub accepts, the repository there or created now), and sets `--hub_model_id` to
    the repository's full id, which the model card names and the upload uses.

    Raises:
        `UsageError` or `HubAccessError` (on every process): one line naming the problem and what to do.
    """
    if not args.training.push_to_hub:
        return
    given = args.training.hub_model_id
    repo_id = given or output_dir.resolve().name
    source = "--hub_model_id" if given else "--push_to_hub without --hub_model_id uses the name of --output_dir"
    outcome: str | CommandError = ""
    if PartialState().is_main_process:
        try:
            outcome = check_hub_access(
                repo_id, "--push_to_hub", source, token=args.training.hub_token, private=args.training.hub_private
            )
        except CommandError as error:
            outcome = error
    (outcome,) = broadcast_object_list([outcome])
    if isinstance(outcome, CommandError):
        raise outcome
    args.training.hub_model_id = outcome


def upload_trained_model(run: Run, results: dict[str, Any], data_description: str) -> UploadError | None:
    """
    With `--push_to_hub`, uploads the run's model directory (on the main process) and returns the failure, on every
    process, as an [`UploadError`] whose one line gives the `hf upload` command that uploads it again; None when it
    was uploaded or nothing was asked.
    """
    args, accelerator = run.args, run.accelerator
    if not args.training.push_to_hub or results["model_dir"] is None:
        return None
    failure = None
    if accelerator.is_main_process:
        repo_id = args.training.hub_model_id or run.output_dir.resolve().name
        try:
            commit = upload_model_directory(
                results["model_dir"],
                repo_id,
                commit_message=f"Refiner-ViT, {100 * results['eval_top1']:.2f} % top-1 on {data_description}",
                private=args.training.hub_private,
                token=args.training.hub_token,
                done="The run finished and its model directory is complete",
            )
            accelerator.print(f"Uploaded to {commit.repo_url}", flush=True)
        except UploadError as error:
            failure = error
    (failure,) = broadcast_object_list([failure])
    return failure


__all__ = ["check_push_to_hub", "upload_trained_model"]
