"""Generation progress during a step (rl/loop/progress.py): what the workers report while they generate, through the
in-process backend and through a Ray actor board, and the terminal row it becomes."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress

from rl.loop.progress import GenerationDisplay, progress_sink
from rollouts.agent_loop import GenerationProgress
from rollouts.backend import InProcessBackend
from tests.test_rl_step import calculator_rows


def test_workers_report_their_samples_and_tokens_as_they_generate(tiny_policy_dir, make_cfg) -> None:
    cfg = make_cfg("rollout.num_workers=2", "rollout.max_new_tokens_per_turn=6", "rollout.max_tokens_per_sample=120")
    backend = InProcessBackend(str(tiny_policy_dir), cfg.worker_spec(), 2)
    reports: list[tuple[int, GenerationProgress]] = []
    backend.set_progress_sink(lambda worker, progress: reports.append((worker, progress)))
    # a per-step budget of 4 tokens pauses every sample that has not ended by then (partial rollouts)
    trajectories = backend.generate_step(calculator_rows(4), 0, 2, iteration_budget=4)
    last = {worker: progress for worker, progress in reports}
    assert sorted(last) == [0, 1]
    total = sum(last.values(), GenerationProgress())
    assert total.done + total.paused == 8 and total.running == 0
    assert total.done == len(trajectories) and total.paused == backend.num_paused()
    assert total.tokens == sum(t.response_length for t in trajectories) + 4 * total.paused
    backend.set_progress_sink(None)
    reports.clear()
    backend.generate_step([], 100, 2, iteration_budget=0)  # resumes the paused samples to their end
    assert reports == []


def test_a_ray_board_sums_what_workers_report(ray_local) -> None:
    sink, read = progress_sink(in_process=False)
    sink(0, GenerationProgress(done=3, running=5, paused=0, tokens=40))
    sink(1, GenerationProgress(done=1, running=6, paused=1, tokens=12))
    sink(0, GenerationProgress(done=7, running=1, paused=0, tokens=70))  # a newer report replaces the older
    import ray.exceptions

    for _ in range(12):  # the board's actor may take a while to start on a busy machine (a read waits 5 s)
        try:
            assert read() == GenerationProgress(done=8, running=7, paused=1, tokens=82)
            return
        except ray.exceptions.GetTimeoutError:
            continue
    raise AssertionError("the progress board never answered")


def test_the_terminal_row_says_done_in_flight_paused_and_tokens() -> None:
    console = Console(record=True, width=120, force_terminal=False)
    with Progress(console=console) as progress:
        display = GenerationDisplay(progress, lambda: GenerationProgress(), every_s=3600)
        display.show(GenerationProgress(done=96, running=30, paused=2, tokens=3415))
        (task,) = progress.tasks
        assert (task.description, task.completed, task.total) == ("rollouts", 96, 128)
        assert task.fields["status"] == "30 in flight · 2 paused · 3,415 tokens generated"
        display.stop()
