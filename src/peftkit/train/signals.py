"""Ctrl-C and SIGTERM (cluster preemption) stop training at the next step boundary, with a checkpoint.

The first signal asks for a stop; a second Ctrl-C aborts at once. With several processes the
request is agreed on at every step (an all-reduce), so all ranks stop and save at the same step.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

logger = logging.getLogger("peftkit")


class GracefulStop:
    """Context manager that installs the handlers and remembers which signal asked for a stop."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        self.signal = signum
        logger.warning("%s: stopping after this step and saving a checkpoint (Ctrl-C again aborts at once)",
                       signal.Signals(signum).name)

    def agreed(self, args: Any) -> bool:
        """Whether any process was asked to stop."""
        requested = self.signal is not None
        if args.world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(requested)], device=args.device)
            dist.all_reduce(flag)
            requested = bool(flag.item())
        return requested

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGINT)
