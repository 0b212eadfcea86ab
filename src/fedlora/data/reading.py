"""Reading data from outside: whatever a parser says about a bad file becomes one DataError
line that names the config field and the file (or hub dataset)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from datasets.exceptions import DatasetsError
from datasets.utils import logging as datasets_logging
import datasets.utils as datasets_tqdm  # progress bar switches

from fedlora.errors import ConfigError, DataError, describe

if TYPE_CHECKING:
    from fedlora.config import DataConfig

# What parsers and the hub raise for unreadable input (pandas and pyarrow errors are
# ValueErrors, gzip's are OSError / EOFError / zlib.error; `datasets` wraps them).
UNREADABLE = (OSError, ValueError, KeyError, IndexError, EOFError, zlib.error, DatasetsError)


@contextmanager
def reading(field: str, what: str | Path) -> Iterator[None]:
    """Turn a parser's failure inside the block into `data error: FIELD: WHAT: reason`; the
    block runs without `datasets`' progress bars and log lines (the error says it once)."""
    verbosity, bars_off = datasets_logging.get_verbosity(), datasets_tqdm.are_progress_bars_disabled()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    datasets_tqdm.disable_progress_bars()
    try:
        yield
    except ConfigError:
        raise
    except UNREADABLE as err:
        raise DataError(f"data error: {field}: {what}: {describe(err)}") from None
    finally:
        datasets_logging.set_verbosity(verbosity)
        if not bars_off:
            datasets_tqdm.enable_progress_bars()


def reading_dataset(d: DataConfig):
    """`reading` for a dataset read from `data.hub_name`, else from its folder in `data.data_dir`."""
    if d.hub_name:
        return reading("data.hub_name", d.hub_name)
    return reading("data.data_dir", d.data_dir / d.dataset)
