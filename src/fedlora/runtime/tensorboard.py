"""TensorBoard scalars mirroring metrics.jsonl (`logging.tensorboard: true`).

Every numeric field of a round's record becomes a scalar at step = round; nested mappings
(`ranks`, `next_ranks`, `mmlu_subjects`) become `field/key` tags; lists (the per-client
records, rejections) stay in metrics.jsonl only. The event files live in the run
directory's `tb/`; they are rewritten from metrics.jsonl when a run starts or resumes, so
they always hold exactly the rounds the checkpoint holds. Under `fedlora compare` each run
has its own `tb/`, so `tensorboard --logdir COMPARE_DIR` shows methods and seeds side by side.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError

TB_DIR = "tb"


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) of every number in a metrics record, `round` excepted (it is the step)."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and tag != "round":
            yield tag, float(value)


class TensorBoardLog:
    """The run's `tb/` event file, written round by round."""

    def __init__(self, run_dir: Path, history: list[dict[str, Any]]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "config error: logging.tensorboard: the tensorboard package is not installed "
                "(pip install 'fedlora[tensorboard]')"
            ) from None
        log_dir = Path(run_dir) / TB_DIR
        shutil.rmtree(log_dir, ignore_errors=True)
        self.writer = SummaryWriter(str(log_dir))
        for record in history:
            self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=int(record["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
