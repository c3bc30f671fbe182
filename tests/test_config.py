"""Config validation: each bad input stops before any work with its own message, exit 2."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from fedft.config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    build_config,
    config_from_json,
    defaults_toml,
    json_schema,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_roundtrip():
    cfg = load_config(None)
    assert cfg.federation.num_clients == 10
    assert config_from_json(cfg.to_json()) == cfg


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "simulations").glob("*.toml")):
        load_config(path)


def test_overrides_apply_with_types():
    cfg = load_config(
        ROOT / "simulations" / "quickstart.toml",
        ["federation.rounds=2", "aggregation.algorithm=flora", "adapter.ranks=[4, 8]"],
    )
    assert cfg.federation.rounds == 2
    assert cfg.aggregation.algorithm == "flora"
    assert cfg.adapter.ranks == [4, 8]
    assert [cfg.adapter.rank_of(i) for i in range(3)] == [4, 8, 4]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["federation.clients_per_round=20"], "federation.clients_per_round = 20"),
        (["privacy.epsilon=0"], "privacy.epsilon = 0.0"),
        (["privacy.epsilon=-1"], "privacy.epsilon = -1.0"),
        (["adapter.rank=0"], "adapter.rank = 0"),
        (["federation.rounds='many'"], "federation.rounds = 'many'"),
        (["federation.rounds=2.5"], "an integer"),
        (["aggregation.algorithm=fedprox"], "one of 'fedit', 'flora'"),
        (["model.task=translation"], "model.task = 'translation'"),
        (["data.partition=random"], "'iid', 'dirichlet', 'natural'"),
        (["federation.colour=1"], "unknown key 'federation.colour'"),
        (["nonsense.key=1"], "unknown key 'nonsense'"),
        (["adapter.ranks=[8, 4]"], "adapter.ranks = [8, 4]"),
        (["privacy.mode=user", "aggregation.algorithm=flora"], "not linear"),
        (["aggregation.secure=true", "aggregation.algorithm=flora"], "needs each client's"),
        (["data.alpha=0"], "data.alpha = 0.0"),
        (["privacy.delta=1.5"], "privacy.delta = 1.5"),
        (["federation.device=tpu"], "federation.device = 'tpu'"),
        (["privacy.client_epsilon={12 = 1.0}"], "client indices run from 0 to 9"),
        (["rounds"], "--set 'rounds'"),
        (["adapter.method=prompt", "aggregation.algorithm=flora"], "use 'fedit'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "simulations" / "quickstart.toml", overrides)
    assert fragment in str(err.value)


def test_mixed_ranks_allowed_for_flora_and_hetlora():
    for algo in ("flora", "hetlora"):
        cfg = build_config({"adapter": {"ranks": [4, 8, 16]}, "aggregation": {"algorithm": algo}})
        assert cfg.adapter.ranks == [4, 8, 16]


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cli_exits_2_on_bad_config_before_any_work(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedft.cli",
            "simulate",
            str(ROOT / "simulations/quickstart.toml"),
            "--set",
            "federation.clients_per_round=11",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "federation.clients_per_round = 11" in proc.stderr
    assert "at most federation.num_clients (10)" in proc.stderr
    assert not out.exists()


# --- typed validation: every section names the exact key, its value and what is allowed ---


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", "seed = -1 is not allowed: an integer >= 0"),
        ("name=3", "name = 3 is not allowed: a string"),
        ("model.name=' '", "model.name = ' ' is not allowed: a non-empty model name or path"),
        ("model.target_modules='q'", "model.target_modules = 'q' is not allowed: a list of"),
        ("data.max_length=4", "data.max_length = 4 is not allowed: an integer >= 8 and <= 4096"),
        ("data.public_size=-1", "data.public_size = -1 is not allowed: an integer >= 0"),
        ("federation.min_replies=9", "federation.min_replies = 9 is not allowed: 0..federation"),
        ("federation.gpus_per_client=2", "federation.gpus_per_client = 2.0 is not allowed"),
        ("adapter.dropout=1", "adapter.dropout = 1.0 is not allowed: a number >= 0 and < 1"),
        ("adapter.ranks=[4, 0]", "adapter.ranks[1] = 0 is not allowed: an integer >= 1"),
        ("aggregation.max_update_norm=-1", "aggregation.max_update_norm = -1.0 is not allowed"),
        ("aggregation.fair_steps=-1", "aggregation.fair_steps = -1 is not allowed"),
        ("aggregation.secure=1", "aggregation.secure = 1 is not allowed: true or false"),
        ("privacy.noise_multiplier=-1", "privacy.noise_multiplier = -1.0 is not allowed"),
        ("privacy.client_epsilon={3 = 0}", "privacy.client_epsilon.3 = 0.0 is not allowed"),
        ("privacy.accountant=moments", "privacy.accountant = 'moments' is not allowed: one of"),
        ("split.back_layers=-1", "split.back_layers = -1 is not allowed: an integer >= 0"),
        ("split.keep_fraction=0", "split.keep_fraction = 0.0 is not allowed: a number > 0"),
        ("split.colour=1", "unknown key 'split.colour'; known keys here: back_layers"),
    ],
)
def test_each_section_names_the_exact_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "simulations" / "quickstart.toml", [override])
    text = str(err.value)
    assert text.startswith(message), text
    if "unknown key" not in text:  # a neighbouring key is never blamed
        key = override.split("=")[0].split(".")[-1]
        others = {"norm_bound", "front_layers", "max_grad_norm", "test_size"} - {key}
        assert not any(other in text for other in others), text


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["federation.rounds=0", "adapter.rank=0", "privacy.colour=1"])
    lines = str(err.value).splitlines()
    assert lines[0] == "3 problems:"
    assert any(line.strip().startswith("federation.rounds = 0") for line in lines)
    assert any(line.strip().startswith("adapter.rank = 0") for line in lines)
    assert any("unknown key 'privacy.colour'" in line for line in lines)


def test_config_stays_a_frozen_dataclass():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.federation.rounds = 3  # type: ignore[misc]
    moved = dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, server="h:1"))
    assert moved.split.server == "h:1" and moved.federation == cfg.federation
    with pytest.raises(ValueError, match="back_layers"):  # replace validates too
        dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, back_layers=-1))


def test_readme_block_is_the_generated_defaults():
    readme = (ROOT / "README.md").read_text()
    begin = "<!-- config-defaults: generated by `fedft config defaults`, do not edit by hand -->\n"
    block = readme.split(begin, 1)[1].split("<!-- /config-defaults -->", 1)[0]
    assert block == f"```toml\n{defaults_toml()}```\n", "regenerate with `fedft config defaults`"
    parsed = tomllib.loads(defaults_toml())
    assert build_config(parsed) == RunConfig()  # the documented values are the defaults
    for section, cls in SECTIONS.items():  # every key is documented
        assert set(parsed[section]) == {f.name for f in dataclasses.fields(cls)}
    for key in ("noise_multiplier", "norm_bound", "trim_fraction", "eval_batch_size", "dropout"):
        assert f"\n{key} = " in block


def test_json_schema_agrees_with_the_validator():
    schema = json_schema()
    for path in sorted((ROOT / "simulations").glob("*.toml")):
        jsonschema.validate(tomllib.loads(path.read_text()), schema)
    for bad in ({"federation": {"rounds": 0}}, {"data": {"colour": 1}}, {"seed": "x"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ConfigError):
            build_config(bad)


def test_cli_config_schema_defaults_and_check():
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "fedft.cli", "config", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    schema = cli("schema")
    assert schema.returncode == 0 and json.loads(schema.stdout) == json_schema()
    assert cli("defaults").stdout == defaults_toml()
    ok = cli("check", "simulations/quickstart.toml")
    assert ok.returncode == 0 and json.loads(ok.stdout)["data"]["alpha"] == 2.0
    bad = cli("check", "simulations/quickstart.toml", "--set", "split.back_layers=-1")
    assert bad.returncode == 2 and "split.back_layers = -1 is not allowed" in bad.stderr
