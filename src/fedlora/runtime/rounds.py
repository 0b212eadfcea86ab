"""Round bookkeeping shared by every runtime (in-process, Flower): accepting a client's update.

The transports differ only in how a payload reaches a client and how its update comes
back; the server validates it and records it here, the same way whichever way it came,
so a Flower run and an in-process run of the same config produce the same numbers.
"""

from __future__ import annotations

import logging
from typing import Any

from fedlora.algorithms.base import InvalidUpdate, Message, Tensors, Update
from fedlora.costs import cost_percent, tensor_bytes

log = logging.getLogger("fedlora")


def accept_update(
    fed: Any, state: Tensors, round_: int, update: Update, payload: Message, seconds: float,
    rejected: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """Validate one client's update; its per-client record, or None (logged in `rejected`)."""
    try:
        fed.algorithm.validate(state, update)
    except InvalidUpdate as err:
        log.warning("round %d: rejected the update of client %d: %s", round_, update.client_id, err)
        rejected.append({"client": update.client_id, "reason": str(err)})
        return None
    m = update.metrics
    standard = {"rank", "next_rank", "train_loss", "trained_params", "uploaded_params"}
    return {
        "id": update.client_id,
        "rank": m.get("rank"),
        "next_rank": m.get("next_rank", m.get("rank")),
        "train_loss": m.get("train_loss"),
        "trained_params": int(m["trained_params"]),
        "uploaded_params": int(m["uploaded_params"]),
        "cost_percent": cost_percent(m["trained_params"], m["uploaded_params"], fed.total_params),
        "uplink_bytes": tensor_bytes(update.tensors),
        "downlink_bytes": tensor_bytes(payload.tensors),
        "seconds": seconds,
        **{k: v for k, v in m.items() if k not in standard},  # a method's diagnostics (AFLoRA's λ)
    }
