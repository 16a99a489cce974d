"""torch.profiler over a window of training iterations (logging.profile_iterations=FIRST,LAST).

Each rank writes {output}/profile/trace_rank{r}.json (open in Perfetto or chrome://tracing) and
kernels_rank{r}.txt: the operators and kernels ranked by their own device time (CPU time on a CPU run),
which is the question a speed investigation starts from: where does a step's time go. The window is
kept short on purpose: a trace of a few steps of a 1B model is already tens of megabytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """Profiles iterations first..last (1-based, as logged): `start(it)` before a step, `stop(it)` after."""

    def __init__(self, window: list[int] | None, *, out_dir: Path, rank: int, device: torch.device) -> None:
        self.window = window
        self.out_dir = out_dir
        self.rank = rank
        self.activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(ProfilerActivity.CUDA)
        self.sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self._profile: profile | None = None

    def start(self, iteration: int) -> None:
        """Called with the iteration about to run."""
        if self.window is not None and iteration == self.window[0]:
            self._profile = profile(activities=self.activities, record_shapes=True)
            self._profile.start()

    def ends_at(self, iteration: int) -> bool:
        return self.window is not None and iteration == self.window[1]

    def stop(self, iteration: int) -> Path | None:
        """Called with the iteration just finished; at the window's end, writes the files and returns the table's path."""
        if self._profile is None or iteration != self.window[1]:
            return None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self._profile.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._profile.export_chrome_trace(str(self.out_dir / f"trace_rank{self.rank}.json"))
        table = self._profile.key_averages().table(sort_by=self.sort_by, row_limit=60, max_name_column_width=90)
        path = self.out_dir / f"kernels_rank{self.rank}.txt"
        path.write_text(f"iterations {self.window[0]}..{self.window[1]}, sorted by {self.sort_by}\n{table}\n")
        self._profile = None
        return path
