"""Invalid configs fail before any work, with one line naming the field."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_tree

from fedlora import config as config_module
from fedlora.config import ConfigError, build_config, load_config, parse_overrides
from fedlora.hardware import preferred_compute_dtype


@pytest.mark.parametrize(
    "override,field",
    [
        ({"federation.nmu_clients": 3}, "federation.nmu_clients: unknown key"),
        ({"federation.client_max_ranks": [8, 0, 4, 2]}, "federation.client_max_ranks: ranks must be >= 1"),
        ({"federation.client_max_ranks": [8, 4]}, "federation: client_max_ranks has 2 entries for 4 clients"),
        ({"algorithm.alpha": 1.5}, "algorithm.alpha:"),
        ({"algorithm.alpha": -0.1}, "algorithm.alpha:"),
        ({"algorithm.beta": -1}, "algorithm.beta:"),
        ({"federation.fraction": 0}, "federation.fraction: must be in (0, 1]"),
        ({"federation.fraction": 1.2}, "federation.fraction: must be in (0, 1]"),
        ({"algorithm.name": "fedavg"}, "algorithm:"),
        ({"algorithm.server_stpes": 3}, "algorithm.server_stpes: unknown key"),
        ({"data.prompt": "no placeholder"}, "data.prompt: must contain the placeholder"),
    ],
)
def test_invalid_fields_are_named(override, field):
    with pytest.raises(ConfigError) as err:
        build_config(tiny_tree(), override)
    msg = str(err.value)
    assert msg.startswith("config error: ") and field in msg and "\n" not in msg


def test_missing_data_file_is_named(tmp_path):
    cfg = build_config(tiny_tree(data={"data_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"data.data_dir: file not found: .*ag_news"):
        cfg.check_files()


def test_missing_public_data_is_named(tmp_path, data_dir):
    (tmp_path / "ag_news").symlink_to(data_dir / "ag_news")
    cfg = build_config(tiny_tree(data={"data_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"public_data.dataset: file not found: .*alpaca"):
        cfg.check_files()
    # without server fine-tuning no public data is needed
    build_config(tiny_tree(data={"data_dir": str(tmp_path)}, algorithm={"name": "aflora", "dlf": False})).check_files()


def test_overrides_parse_yaml_values_and_scaling_is_rank_independent():
    cfg = build_config(tiny_tree(), parse_overrides(["federation.rounds=7", "lora.alpha=32"]))
    assert cfg.federation.rounds == 7 and cfg.scaling == 32 / 8


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(federation={"fraction": 2.0})))
    out = subprocess.run([sys.executable, "-m", "fedlora.cli", "run", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "config error: federation.fraction: must be in (0, 1], got 2.0"
    assert not (tmp_path / "runs").exists()


def test_shipped_configs_validate():
    from conftest import ROOT

    from fedlora.algorithms import ALGORITHMS
    from fedlora.compare import method_configs

    for path in (ROOT / "configs").glob("*.yaml"):
        tree = yaml.safe_load(path.read_text())
        if "algorithm" in tree:
            load_config(path)  # `fedlora run` takes it (a compare config too: its algorithm section)
        variants = tree.get("methods") or {}
        if variants:  # a `fedlora compare` config: every method and variant resolves
            labels = sorted({*ALGORITHMS, *variants})
            assert len(method_configs(path, labels, [0, 1], [])) == 2 * len(labels)


@pytest.mark.parametrize("flags, dtype", [
    ("fpu avx2 fma avx512f amx_bf16 amx_tile", "bfloat16"),
    ("fpu avx2 avx512f avx512_bf16", "bfloat16"),
    ("fpu avx avx2 f16c fma", "float32"),  # e.g. AMD EPYC with AVX2: bfloat16 would be emulated
])
def test_auto_compute_dtype_follows_the_cpu(tmp_path, monkeypatch, flags, dtype):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert preferred_compute_dtype(cpuinfo) == dtype
    assert preferred_compute_dtype(tmp_path / "missing") == "float32"
    monkeypatch.setattr(config_module, "preferred_compute_dtype", lambda: dtype)
    cfg = build_config(tiny_tree(model={"name": "tiny-llama", "compute_dtype": "auto"}))
    assert cfg.model.compute_dtype == dtype  # resolved once, so config.yaml records it
    assert build_config(tiny_tree(model={"name": "tiny-llama"})).model.compute_dtype == "float32"


def test_a_compare_config_runs_its_algorithm_section():
    from conftest import ROOT

    cfg = load_config(ROOT / "configs" / "hierfedlora_tta.yaml")  # has a `methods:` mapping for compare
    assert cfg.algorithm.name == "hierfedlora" and cfg.algorithm.speed_weight == 0.0


def test_a_methods_set_never_leaks_into_the_next_method(tmp_path):
    """compare builds every method's config from one tree: one method's `set:` (applied as
    overrides) must not change the tree the next method is built from."""
    from fedlora.compare import method_configs

    tree = tiny_tree(algorithm={"name": "fedit"})
    tree["methods"] = {"flora": {"set": {"federation.local_steps": 8}}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(tree))
    configs = method_configs(path, ["flora", "fedit", "ffa"], [0], [])
    assert configs[("flora", 0)].federation.local_steps == 8
    assert configs[("fedit", 0)].federation.local_steps == 2 and configs[("ffa", 0)].federation.local_steps == 2
    before = tiny_tree()
    after = tiny_tree()
    build_config(after, {"federation.local_steps": 8})
    assert after == before


def test_compare_applies_set_algorithm_options_over_the_configs_own(tmp_path):
    """`--set algorithm.X=v` used to vanish under each method's options; it now wins, and an
    option one of the methods lacks is named with that method."""
    from fedlora.compare import method_configs

    tree = tiny_tree(algorithm={"name": "aflora", "pruning_check": 4})
    tree["methods"] = {"aflora-unit": {"name": "aflora", "b_init": "unit", "lambda_init": 0.0, "lambda_persist": False}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(tree))
    configs = method_configs(path, ["aflora", "aflora-unit"], [0], ["algorithm.pruning_check=2"])
    assert [c.algorithm.pruning_check for c in configs.values()] == [2, 2]
    assert configs[("aflora-unit", 0)].algorithm.b_init == "unit"
    with pytest.raises(ConfigError, match="server_steps.*method fedit"):
        method_configs(path, ["aflora", "fedit"], [0], ["algorithm.server_steps=9"])
    with pytest.raises(ConfigError, match="--set algorithm.name"):
        method_configs(path, ["aflora"], [0], ["algorithm.name=fedit"])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_reads_back_its_own_config_yaml(path):
    """What a run writes (config.yaml, the checkpoint's record) must build the same config
    again, or resume and `compare`'s check refuse the run's own files (a devices-ranked
    config used to: its record names the ranks the devices gave)."""
    from fedlora.config import dump_config
    from fedlora.runtime.rundir import changed_fields

    tree = yaml.safe_load(path.read_text())
    cfg = load_config(path, None if "algorithm" in tree else {"algorithm.name": "aflora"})  # compare-only configs
    again = build_config(yaml.safe_load(dump_config(cfg)))
    assert changed_fields(cfg, again) == [] and dump_config(again) == dump_config(cfg)
