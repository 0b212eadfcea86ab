"""Federated LoRA methods, one module each, behind the protocol in `base`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from fedlora.algorithms.aflora import AFLoRA, AFLoRAOptions
from fedlora.algorithms.base import Algorithm, FederationSetup, MethodOptions
from fedlora.algorithms.fedit import FedIT, FedITOptions
from fedlora.algorithms.ffa import FFALoRA, FFALoRAOptions
from fedlora.algorithms.flexlora import FlexLoRA, FlexLoRAOptions
from fedlora.algorithms.flora import FLoRA, FLoRAOptions
from fedlora.algorithms.hetlora import HETLoRA, HETLoRAOptions
from fedlora.algorithms.hierfedlora import HierFedLoRA, HierFedLoRAOptions

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (AFLoRA, FedIT, FFALoRA, FLoRA, FlexLoRA, HETLoRA, HierFedLoRA)
}

AlgorithmOptions = Annotated[
    AFLoRAOptions | FedITOptions | FFALoRAOptions | FLoRAOptions | FlexLoRAOptions | HETLoRAOptions
    | HierFedLoRAOptions,
    Field(discriminator="name"),
]


def build_algorithm(options: MethodOptions, setup: FederationSetup) -> Algorithm:
    return ALGORITHMS[options.name](options, setup)
