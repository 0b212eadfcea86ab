"""The base of every model that validates outside input (config sections, method options,
device profiles, run-file records): one home for the rules every field obeys.

- unknown keys are errors (a typo never falls back to a default);
- no float field accepts NaN or ±Inf (`lr: .inf` would train nothing and exit 0);
- seeds are integers every consumer accepts: numpy's legacy generators and `datasets`
  take [0, 2³² − 1], torch more, so that range for all.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
"""A seed: an integer in [0, 2³² − 1]."""

MAX_ROUNDS = 1_000_000
"""A run's rounds (and a checkpoint's round): far beyond any study, short of "forever"."""

MAX_THREADS = 1024
"""More torch threads than any machine has cores is a mistake, or a forged record."""


class Strict(BaseModel):
    """Unknown keys and non-finite floats are errors, in every subclass."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
