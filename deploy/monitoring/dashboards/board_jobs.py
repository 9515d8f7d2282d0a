"""Sluice / Jobs and fine-tuning: durable batch jobs and LoRA fine-tunes, their progress,
stuck work, and what training costs inference on the nodes."""

from __future__ import annotations

from typing import Any

from sluice_panels import (
    RI,
    Panel,
    graph,
    new_board,
    row,
)


def job_panels() -> list[Panel]:
    """Durable batch jobs: states, lines, window, lag, submissions, prediction error."""
    error = "sluice_scheduler_job_completion_error_ratio_bucket"
    return [
        graph(
            "Jobs not final by state",
            "short",
            [("max by (state) (sluice_scheduler_jobs)", "{{state}}")],
            description="Every replica reports the cluster's jobs: max, not sum.",
            width=8,
        ),
        graph(
            "Job lines by outcome",
            "short",
            [
                (
                    f"sum by (outcome) (rate(sluice_scheduler_job_lines_total[{RI}]))",
                    "{{outcome}}",
                )
            ],
            description="Lines per second. Lines pending with none completing for 20 minutes "
            "fires the stuck-jobs alert.",
            width=8,
        ),
        graph(
            "Lines in flight and window",
            "short",
            [
                ("sum(sluice_scheduler_job_lines_in_flight)", "in flight"),
                ("sum(sluice_scheduler_job_line_window)", "window"),
            ],
            width=8,
        ),
        graph(
            "Oldest unfinished job by class and tenant",
            "s",
            [
                (
                    "max by (workload_class, tenant) (sluice_scheduler_job_queue_lag_seconds)",
                    "{{workload_class}} {{tenant}}",
                )
            ],
            width=8,
        ),
        graph(
            "Submissions and completions",
            "short",
            [
                (
                    f"sum by (result) (rate(sluice_scheduler_jobs_submitted_total[{RI}]))",
                    "submitted {{result}}",
                ),
                (
                    f"sum by (state) (rate(sluice_scheduler_jobs_finished_total[{RI}]))",
                    "finished {{state}}",
                ),
            ],
            width=8,
        ),
        graph(
            "Completion time against prediction",
            "percentunit",
            [
                (f"histogram_quantile(0.5, sum by (le) (rate({error}[{RI}])))", "median"),
                (f"histogram_quantile(0.9, sum by (le) (rate({error}[{RI}])))", "p90"),
            ],
            description="(actual - predicted) / predicted duration of completed jobs.",
            width=8,
        ),
    ]


def finetune_panels() -> list[Panel]:
    """Fine-tunes: states, progress, moves, and their cost to inference on the nodes."""
    yield_wait = "sluice_node_training_yield_wait_seconds_bucket"
    return [
        graph(
            "Fine-tunes by state",
            "short",
            [
                ("max by (state) (sluice_scheduler_finetune_jobs)", "{{state}}"),
                ("sum by (phase) (sluice_scheduler_finetune_jobs_driven)", "driven: {{phase}}"),
            ],
            width=8,
        ),
        graph(
            "Fine-tune progress",
            "short",
            [
                (f"sum(rate(sluice_scheduler_finetune_steps_total[{RI}]))", "steps/s"),
                (f"sum(rate(sluice_scheduler_finetune_tokens_total[{RI}]))", "tokens/s"),
                (
                    f"sum by (instance) (rate(sluice_node_training_tokens_total[{RI}]))",
                    "node tokens/s {{instance}}",
                ),
            ],
            width=8,
        ),
        graph(
            "Fine-tunes moved and finished",
            "short",
            [
                (
                    f"sum by (reason) (rate(sluice_scheduler_finetune_moves_total[{RI}]))",
                    "moved: {{reason}}",
                ),
                (
                    f"sum by (state) (rate(sluice_scheduler_finetune_jobs_finished_total[{RI}]))",
                    "finished: {{state}}",
                ),
            ],
            width=8,
        ),
        graph(
            "Training units on nodes",
            "short",
            [
                (
                    f"sum by (instance, kind) (rate(sluice_node_training_units_total[{RI}]))",
                    "{{instance}} {{kind}}",
                ),
                (
                    f"sum by (instance) (rate(sluice_node_training_steps_total[{RI}]))",
                    "{{instance}} optimizer steps",
                ),
                (
                    f"sum by (instance) (rate(sluice_node_training_checkpoints_total[{RI}]))",
                    "{{instance}} checkpoints",
                ),
            ],
            width=8,
        ),
        graph(
            "Training held back by reason",
            "short",
            [
                (
                    "sum by (instance, reason) "
                    f"(rate(sluice_node_training_units_deferred_total[{RI}]))",
                    "{{instance}} {{reason}}",
                )
            ],
            description="Units held back so inference goes first.",
            width=8,
        ),
        graph(
            "Inference waiting for training (p99)",
            "s",
            [
                (
                    f"histogram_quantile(0.99, sum by (wait, le) (rate({yield_wait}[{RI}])))",
                    "{{wait}}",
                )
            ],
            description="How long a request waited for a training unit to yield.",
            width=8,
        ),
    ]


def jobs() -> Any:
    """Sluice / Jobs."""
    board = new_board(
        "sluice-jobs",
        "Sluice / Jobs and fine-tuning",
        "Durable batch jobs and LoRA fine-tunes: progress, stuck work, cost to inference.",
    )
    board = row(board, "Batch jobs", job_panels())
    return row(board, "Fine-tuning", finetune_panels())
