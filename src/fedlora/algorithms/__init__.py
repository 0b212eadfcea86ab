"""Federated LoRA methods, one module each, behind the protocol in `base`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from fedlora.algorithms.aflora import AFLoRA, AFLoRAOptions
from fedlora.algorithms.base import Algorithm, FederationSetup, MethodOptions
from fedlora.algorithms.fedit import FedIT, FedITOptions
from fedlora.algorithms.hierfedlora import HierFedLoRA, HierFedLoRAOptions

ALGORITHMS: dict[str, type[Algorithm]] = {"fedit": FedIT, "aflora": AFLoRA}
ALGORITHMS["hierfedlora"] = HierFedLoRA

AlgorithmOptions = Annotated[FedITOptions | AFLoRAOptions | HierFedLoRAOptions, Field(discriminator="name")]


def build_algorithm(options: MethodOptions, setup: FederationSetup) -> Algorithm:
    return ALGORITHMS[options.name](options, setup)
