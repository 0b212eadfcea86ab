"""Adding a method is one module: a toy method written outside the package registers itself with
one call and runs a round in-process; the cost table and compare's defaults read its traits."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
from conftest import tiny_tree

from fedlora.algorithms import ALGORITHMS, register_method
from fedlora.algorithms.base import Algorithm, MethodOptions
from fedlora.algorithms.registry import load_entry_points
from fedlora.config import ConfigError, build_config

TOY = textwrap.dedent('''
    """A toy method: FedAvg of B over one frozen A drawn from the seed (what a user would write)."""
    from typing import Literal

    from fedlora.algorithms import register_method
    from fedlora.algorithms.base import (Aggregate, Algorithm, Message, MethodOptions, common_rank,
                                         data_weights, lora_init, train_loaded)


    class ToyOptions(MethodOptions):
        name: Literal["toy-avg-b"] = "toy-avg-b"
        scale: float = 1.0
        tags: tuple[int, ...] = ()


    @register_method
    class ToyAvgB(Algorithm):
        name = "toy-avg-b"
        Options = ToyOptions
        trains = "B"
        homogeneous = True
        cost_note = " (a toy)"

        def __init__(self, options, setup):
            super().__init__(options, setup)
            self.rank = common_rank(None, setup.client_max_ranks)

        def init_state(self):
            return lora_init(self.setup.module_shapes, self.rank, self.setup.seed)

        def payload(self, state, client_id):
            return Message(tensors=dict(state))

        def client_train(self, ctx, payload, client_state):
            ctx.adapters.load(payload.tensors, trainable={"B"})
            return train_loaded(ctx, self.rank, upload=(".B",)), client_state

        def expected_shapes(self, state, update):
            return {k: tuple(v.shape) for k, v in state.items() if k.endswith(".B")}

        def aggregate(self, state, updates, server):
            p = data_weights(updates)
            new = dict(state)
            for key in self.expected_shapes(state, updates[0]):
                new[key] = self.options.scale * sum(pk * u.tensors[key] for pk, u in zip(p, updates))
            return Aggregate(state=new)

        def eval_factors(self, state):
            return state
''')


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    """The toy method as a module outside the package, imported the way a user's code would."""
    (tmp_path / "toy_method.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("toy_method")
    yield module
    ALGORITHMS.pop("toy-avg-b", None)
    sys.modules.pop("toy_method", None)


def test_a_method_from_outside_the_package_runs_a_round_in_process(toy_module, synthetic_task, tmp_path):
    from fedlora.runtime.checkpoint import Checkpoint
    from fedlora.runtime.inprocess import Simulation

    assert ALGORITHMS["toy-avg-b"] is toy_module.ToyAvgB
    cfg = build_config(tiny_tree(
        data={**synthetic_task, "train_examples": 40, "test_examples": 8},
        federation={"num_clients": 2, "client_max_ranks": [4, 2], "rounds": 1, "local_steps": 1, "batch_size": 4},
        algorithm={"name": "toy-avg-b", "scale": 0.5},
    ))
    assert cfg.algorithm.scale == 0.5 and type(cfg.algorithm) is toy_module.ToyOptions
    summary = Simulation(cfg, tmp_path / "run", progress=False).run()
    assert summary["method"] == "toy-avg-b" and summary["final_accuracy"] is not None
    record = Checkpoint.load(tmp_path / "run").history[-1]
    assert [c["rank"] for c in record["clients"]] == [2, 2]  # homogeneous: the weakest client's rank
    b_bytes = sum(4 * m * 2 for m, _ in _shapes(tmp_path / "run"))  # B only goes up, float32
    assert record["uplink_bytes"] == 2 * b_bytes
    state = Checkpoint.load(tmp_path / "run").state
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if k.endswith(".B"))  # B was trained


def _shapes(run_dir):
    from fedlora.files import load_tensors

    state = load_tensors(run_dir / "final_state.safetensors")[0]
    return [tuple(v.shape) for k, v in state.items() if k.endswith(".B")]


def test_the_config_round_trips_a_registered_methods_options(toy_module):
    from fedlora.config import dump_config

    import yaml
    cfg = build_config(tiny_tree(algorithm={"name": "toy-avg-b", "scale": 2.0}))
    assert yaml.safe_load(dump_config(cfg))["algorithm"] == {"name": "toy-avg-b", "scale": 2.0, "tags": []}
    with pytest.raises(ConfigError, match=r"algorithm\.scale"):
        build_config(tiny_tree(algorithm={"name": "toy-avg-b", "scale": "big"}))


def test_traits_come_from_the_method_class(toy_module):
    from fedlora.compare import default_methods
    from fedlora.costs import ArchitectureShapes, method_cost_rows

    shapes = ArchitectureShapes("toy", 1000, {"q": (10, 20)})
    rows = {m: (what, pct) for m, what, pct in method_cost_rows(shapes, [4, 2])}
    assert rows["toy-avg-b"] == ("B only at the common rank 2 (a toy)", pytest.approx(100 * 10 * 2 / 1000))
    assert "toy-avg-b" in default_methods()
    assert "hierfedlora" not in default_methods()  # opts out: its plan needs the config's devices


def test_unknown_method_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError, match=r"config error: algorithm: unknown method 'nope'; choose from \[.*'fedit'"):
        build_config(tiny_tree(algorithm={"name": "nope"}))


def test_registration_refuses_a_taken_name_and_an_options_class_that_does_not_name_it():
    class Impostor(ALGORITHMS["fedit"]):
        pass

    with pytest.raises(ValueError, match="'fedit' is taken"):
        register_method(Impostor)

    class Opts(MethodOptions):
        name: str = "other"

    class Wrong(Algorithm):
        name = "wrong-name"
        Options = Opts

    with pytest.raises(TypeError, match="must default to 'wrong-name'"):
        register_method(Wrong)
    assert "wrong-name" not in ALGORITHMS


def test_an_installed_packages_entry_point_registers_its_method(tmp_path, monkeypatch, caplog):
    """What `pip install` of a plugin leaves on sys.path: a dist-info naming the module."""
    (tmp_path / "toy_method.py").write_text(TOY)
    dist = tmp_path / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedlora.methods]\ntoy = toy_method\nbroken = no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        load_entry_points()
        assert "toy-avg-b" in ALGORITHMS
        warnings = [r.getMessage() for r in caplog.records]  # one warning, for the broken one only
        assert warnings == ["method plugin broken = no_such_module not loaded: No module named 'no_such_module'"]
    finally:
        ALGORITHMS.pop("toy-avg-b", None)
        sys.modules.pop("toy_method", None)


def test_build_algorithm_builds_the_named_methods_class_with_its_options():
    from fedlora.algorithms import build_algorithm
    from fedlora.algorithms.base import FederationSetup
    from fedlora.algorithms.registry import parse_options

    setup = FederationSetup({"m": (4, 3)}, [2, 2], [5, 5], 0.5, 0)
    algo = build_algorithm(parse_options({"name": "rolora", "first": "A"}), setup)
    assert type(algo) is ALGORITHMS["rolora"] and algo.options.first == "A" and algo.setup is setup


def test_the_config_reference_schema_lists_every_registered_methods_options(toy_module):
    from pydantic import TypeAdapter

    from fedlora.algorithms import AlgorithmOptions

    schema = TypeAdapter(AlgorithmOptions).json_schema()
    names = [alt["properties"]["name"]["const"] for alt in schema["oneOf"]]
    assert names == list(ALGORITHMS) and "toy-avg-b" in names
    toy = schema["oneOf"][names.index("toy-avg-b")]
    assert toy["properties"]["scale"]["default"] == 1.0 and toy["additionalProperties"] is False
    adapter = TypeAdapter(AlgorithmOptions)  # validation and dumps through the same type
    options = adapter.validate_python({"name": "toy-avg-b", "scale": 2.0, "tags": [3]})
    assert type(options) is toy_module.ToyOptions and options.tags == (3,)
    assert adapter.dump_python(options) == {"name": "toy-avg-b", "scale": 2.0, "tags": (3,)}
    assert adapter.dump_python(options, mode="json") == {"name": "toy-avg-b", "scale": 2.0, "tags": [3]}


def test_registration_refuses_what_is_not_a_method_in_one_line():
    with pytest.raises(TypeError, match="register_method: <class 'int'> is not an Algorithm subclass"):
        register_method(int)

    class NoName(Algorithm):
        pass

    with pytest.raises(TypeError, match="register_method: NoName has no `name`"):
        register_method(NoName)

    class NumberName(Algorithm):
        name = 3

    with pytest.raises(TypeError, match="NumberName has no `name`"):
        register_method(NumberName)

    class BadOptions(Algorithm):
        name = "bad-options"
        Options = int

    with pytest.raises(TypeError, match=r"register_method: BadOptions.Options must be a MethodOptions subclass"):
        register_method(BadOptions)
    assert not {"bad-options", 3} & set(ALGORITHMS)


def test_parse_options_takes_a_mapping_or_options_and_names_anything_else():
    from fedlora.algorithms.fedit import FedITOptions
    from fedlora.algorithms.registry import parse_options

    assert parse_options(FedITOptions(rank=1)) == FedITOptions(rank=1)
    assert parse_options({"name": "fedit", "rank": 2}) == FedITOptions(rank=2)
    with pytest.raises(ValueError, match="^expected a mapping with name: <method>, got int$"):
        parse_options(3)


def test_an_entry_point_may_name_the_class_itself(tmp_path, monkeypatch, caplog):
    """`name = module:Class`: the class is registered even when its module does not register it."""
    (tmp_path / "toy_class.py").write_text(TOY.replace("@register_method\n", "").replace("toy-avg-b", "toy-class"))
    dist = tmp_path / "toy_class-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-class\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedlora.methods]\ntoy = toy_class:ToyAvgB\nbroken = no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        load_entry_points()
        assert ALGORITHMS["toy-class"].__module__ == "toy_class"
        lines = [r.getMessage() for r in caplog.records]
        assert lines == ["method plugin broken = no_such_module not loaded: No module named 'no_such_module'"]
    finally:
        ALGORITHMS.pop("toy-class", None)
        sys.modules.pop("toy_class", None)
