"""Running sums of per-batch loss statistics, the common part of the draft families' metric accumulators."""

import torch


class RunningSums:
    """Adds per-batch statistics vectors (on the CPU, in float64) into `self.sums`; subclasses turn the sums into
    the means they log (`compute`). Summing before dividing keeps the means exact across batches and processes."""

    sums: torch.Tensor | None = None

    def add(self, statistics: torch.Tensor) -> None:
        statistics = statistics.detach().double().cpu()
        self.sums = statistics if self.sums is None else self.sums + statistics

    def reset(self) -> None:
        self.sums = None

    def __bool__(self) -> bool:
        return self.sums is not None
