"""Config typos and damaged config files never pass and never end in a traceback.

A duplicate key, a YAML boolean or string where a number belongs, a non-finite float or a file
that is no YAML mapping at all each become one ``ConfigError`` line naming the key or the file.
The ``init`` template is rendered from the models, so it holds every key and loads back as the
defaults.
"""

from __future__ import annotations

import gzip
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ase.build import molecule
from ase.io import write

from aimspax_like.cli import main
from aimspax_like.config import (
    FaultInjection,
    SlurmCluster,
    config_from_dict,
    load_config,
)
from aimspax_like.config_template import template_config, template_yaml
from aimspax_like.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / ".venv" / "bin" / "aimspax-like"

HEAD = """\
system:
  structures: water.xyz
reference:
  kind: lj
"""


def _write(tmp_path: Path, text: str | bytes, name: str = "campaign.yaml") -> Path:
    write(tmp_path / "water.xyz", molecule("H2O"))
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    return info.value


def _leaves(data: Any, prefix: str = "") -> set[str]:
    """Dotted keys of every leaf of a nested mapping (an empty mapping is a leaf)."""
    if not isinstance(data, dict) or not data:
        return {prefix}
    return set().union(*(_leaves(value, f"{prefix}.{key}" if prefix else str(key)) for key, value in data.items()))


# --------------------------------------------------------------------------- duplicate keys


DUPLICATES = [
    # (YAML after HEAD, dotted key, line of the second occurrence)
    ("reference:\n  kind: emt\n", "reference", 5),
    ("al:\n  seed: 1\n  window: 30\n  seed: 2\n", "al.seed", 8),
    ("al:\n  guards:\n    enabled: true\n    enabled: false\n", "al.guards.enabled", 8),
    ("al:\n  num_trajectories: 2\n  md:\n    - {temperature_K: 300}\n    - {temperature_K: 300, temperature_K: 400}\n",
     "al.md.1.temperature_K", 9),
    ("seed: 1\nseed: 1\n", "seed", 6),
]


@pytest.mark.parametrize(("text", "key", "line"), DUPLICATES, ids=[key for _, key, _ in DUPLICATES])
def test_a_duplicate_key_is_named_with_its_line(tmp_path, text, key, line):
    error = _error(_write(tmp_path, HEAD + text))
    assert error.key == key
    assert f"duplicate key at line {line}" in error.message and "campaign.yaml" in error.message


def test_keys_merged_from_an_anchor_may_be_overridden(tmp_path):
    config = load_config(_write(tmp_path, HEAD + "al:\n  <<: &fast {check_every: 5, window: 50}\n  window: 60\n"))
    assert (config.al.check_every, config.al.window) == (5, 60)


# --------------------------------------------------------------------------- strict scalars


STRICT = [
    ("seed: true", "seed"),
    ("al: {window: true}", "al.window"),
    ("al: {window: '5'}", "al.window"),
    ("al: {md: {temperature_K: '500'}}", "al.md.temperature_K"),
    ("training: {lr: true}", "training.lr"),
    ("training: {ema_decay: false}", "training.ema_decay"),
    ("model: {radial_mlp: [32, true]}", "model.radial_mlp.1"),
    ("idg: {enabled: 1}", "idg.enabled"),
    ("idg: {enabled: 'yes'}", "idg.enabled"),
    ("model: {mlp_irreps: 16}", "model.mlp_irreps"),
    ("cluster: {kind: slurm, provider: {worker_init: [5]}}", "cluster.provider.worker_init.0"),
]


@pytest.mark.parametrize(("text", "key"), STRICT, ids=[text for text, _ in STRICT])
def test_booleans_and_strings_are_not_numbers(tmp_path, text, key):
    error = _error(_write(tmp_path, HEAD + text + "\n"))
    assert error.key == key


def test_what_strict_still_accepts(tmp_path):
    text = HEAD + """\
al:
  num_trajectories: 2
  md: [{temperature_K: 300}, {ensemble: nve, timestep_fs: 0.5}]
  guards: {topology: off}
training: {lr: 1e-3, weight_decay: 0}
test_set: {temperatures_K: [250, 400.5]}
cluster: {kind: slurm, provider: {worker_init: "module load x\\n\\nsource venv"}}
output: {directory: elsewhere/run}
"""
    config = load_config(_write(tmp_path, text))
    assert config.al.md_for(0).temperature_K == 300.0 and isinstance(config.al.md_for(0).temperature_K, float)
    assert config.al.md_for(1).ensemble == "nve"
    assert config.al.guards.topology == "off"  # YAML 1.1 reads a bare off as false
    assert (config.training.lr, config.training.weight_decay) == (1e-3, 0.0)  # 1e-3: a number, as in YAML 1.2
    assert config.test_set.temperatures_K == [250.0, 400.5]
    assert isinstance(config.cluster, SlurmCluster) and config.cluster.provider.worker_init == ["module load x",
                                                                                              "source venv"]
    assert config.output.directory == Path("elsewhere/run")
    assert config.system.structures == [tmp_path.resolve() / "water.xyz"]


def test_a_string_that_looks_like_a_number_reads_back_as_a_string(tmp_path):
    text = HEAD.replace("kind: lj", "kind: aims") + "  parameters: {sc_accuracy_rho: '1e-5', sc_accuracy_eev: 1e-3}\n"
    config = load_config(_write(tmp_path, text))
    assert config.reference.parameters == {"sc_accuracy_rho": "1e-5", "sc_accuracy_eev": 1e-3}
    again = load_config(_write(tmp_path, config.resolved_yaml(), "resolved.yaml"))
    assert again.reference.parameters == config.reference.parameters


# --------------------------------------------------------------------------- finite floats


NON_FINITE = [
    ("al: {md: {temperature_K: 1e400}}", "al.md.temperature_K"),
    ("al: {md: {temperature_K: .nan}}", "al.md.temperature_K"),
    ("idg: {md: {pressure_bar: .inf}}", "idg.md.pressure_bar"),
    ("idg: {md: {pressure_bar: -.inf}}", "idg.md.pressure_bar"),
    ("al: {c_x: .inf}", "al.c_x"),
    ("training: {clip_grad: .inf}", "training.clip_grad"),
    ("test_set: {temperatures_K: [300, .inf]}", "test_set.temperatures_K.1"),
    ("al: {num_trajectories: 2, md: [{temperature_K: 300}, {temperature_K: .nan}]}", "al.md.1.temperature_K"),
    ("cluster: {kind: slurm, executor: {max_idletime_s: .inf}}", "cluster.executor.max_idletime_s"),
]


@pytest.mark.parametrize(("text", "key"), NON_FINITE, ids=[text for text, _ in NON_FINITE])
def test_every_float_must_be_finite(tmp_path, text, key):
    error = _error(_write(tmp_path, HEAD + text + "\n"))
    assert error.key == key and "finite" in error.message


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_free_form_settings_must_be_finite_too(tmp_path, value):
    data = {"system": {"structures": "x.xyz"}, "reference": {"kind": "aims", "parameters": {"mix": [0.2, value]}}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.key == "reference.parameters" and "mix.1 must be a finite number" in info.value.message
    data["reference"] = {"kind": "import", "path": "a.b:C", "kwargs": {"scale": value}}
    with pytest.raises(ConfigError, match=r"reference\.kwargs: scale must be a finite number"):
        config_from_dict(data)


def test_a_self_containing_alias_is_refused(tmp_path):
    text = HEAD.replace("kind: lj", "kind: import\n  path: a.b:C\n  kwargs: &loop {inner: *loop}")
    error = _error(_write(tmp_path, text))
    assert error.key == "reference.kwargs" and "contains itself" in error.message


def test_assignment_is_checked_too(tmp_path):
    config = config_from_dict({"system": {"structures": "x.xyz"}, "reference": {"kind": "lj"}})
    with pytest.raises(ValueError, match="finite"):
        config.al.md_for(0).temperature_K = float("inf")
    with pytest.raises(ValueError, match="valid integer"):
        config.al.window = True


# --------------------------------------------------------------------------- damaged files


DAMAGED: list[tuple[str, bytes | None, str]] = [
    # (name, bytes; None: a folder, text expected in the message)
    ("random", bytes(random.Random(7).randrange(256) for _ in range(4096)), "not a campaign YAML"),
    ("gzip", gzip.compress(HEAD.encode()), "not a campaign YAML"),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(32), "binary file"),
    ("folder", None, "is a folder"),
    ("empty", b"", "empty"),
    ("blank", b"  \n\n\t\n", "empty"),
    ("comments", b"# nothing\n# here\n", "holds only comments"),
    ("list", b"- system\n- reference\n", "not a list"),
    ("scalar", b"just some words\n", "not a single str value"),
    ("number", b"42\n", "not a single int value"),
    ("latin1", "system: {structures: caf\u00e9.xyz}\n".encode("latin-1"), "not UTF-8"),
    ("control", b"seed: \x07\n", "not valid YAML"),
    ("syntax", b"system: {structures: [a.xyz}\n", "not valid YAML"),
    ("tabs", b"system:\n\tstructures: a.xyz\n", "not valid YAML"),
    ("two documents", b"seed: 1\n---\nseed: 2\n", "not valid YAML"),
    ("deep", b"[" * 5000 + b"]" * 5000, "not valid YAML"),
]


@pytest.mark.parametrize(("name", "content", "expected"), DAMAGED, ids=[name for name, _, _ in DAMAGED])
def test_a_damaged_file_is_one_line_naming_it(tmp_path, name, content, expected):
    path = tmp_path / f"{name}.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    error = _error(path)
    assert error.key == str(path)
    assert expected in error.message, error.message


def test_config_from_dict_refuses_what_is_no_mapping():
    for data, expected in ((None, "nothing"), ([1, 2], "a list"), ("x", "a single str value")):
        with pytest.raises(ConfigError, match="the top level must be a mapping of sections") as info:
            config_from_dict(data, source="mine.yaml")
        assert info.value.key == "mine.yaml" and expected in info.value.message


# --------------------------------------------------------------------------- the init template


def test_template_holds_every_key_of_the_schema():
    text = template_yaml()
    written = yaml.safe_load(text)
    expected = _leaves(template_config().model_dump(mode="json"))
    assert _leaves(written) == expected
    for key in ("faults", "al.max_labels_in_flight", "reference.keep_workdir", "al.failures.crashed_retries"):
        assert key in expected
    for key in FaultInjection.model_fields:  # faults is off by default: its keys are shown commented out
        assert f"#   {key}: " in text
    assert "# reference:\n#   kind: pyscf" in text and "# cluster:\n#   kind: slurm" in text


def test_init_writes_the_defaults_and_they_load_back(tmp_path, capsys):
    target = tmp_path / "campaign.yaml"
    assert main(["init", str(target)]) == 0
    assert target.read_text() == template_yaml()
    write(tmp_path / "geometry.xyz", molecule("H2O"))
    expected = template_config()
    expected.system.structures = [tmp_path.resolve() / "geometry.xyz"]
    assert load_config(target) == expected
    assert expected.reference.kind == "xtb" and expected.faults is None


def test_init_overwrites_only_with_force(tmp_path, capsys):
    target = tmp_path / "campaign.yaml"
    target.write_text("mine\n")
    assert main(["init", str(target)]) == 2
    assert "file exists" in capsys.readouterr().err and target.read_text() == "mine\n"
    assert main(["init", str(target), "--force"]) == 0
    assert target.read_text() == template_yaml()
    assert main(["init", str(tmp_path), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "no" / "such" / "dir.yaml")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def _commented_blocks(text: str) -> list[tuple[str, str]]:
    """Each commented-out top-level section of the template: (section name, its YAML)."""
    blocks: list[tuple[str, str]] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# ") and line.endswith(":") and not line.startswith("#  ") and " " not in line[2:]:
            body = [line[2:]]
            for following in lines[number + 1:]:
                if not following.startswith("#   "):
                    break
                body.append(following[2:])
            blocks.append((line[2:-1], "\n".join(body)))
    return blocks


def test_every_commented_out_alternative_is_a_valid_section(tmp_path):
    blocks = _commented_blocks(template_yaml())
    names = [name for name, _ in blocks]
    assert names.count("reference") == 7 and names.count("cluster") == 1 and names.count("faults") == 1
    for name, block in blocks:
        data = yaml.safe_load(template_yaml())
        data[name] = yaml.safe_load(block)[name]
        config = config_from_dict(data)
        assert getattr(config, name) is not None


# --------------------------------------------------------------------------- the console script


CLI_CASES = [
    ("duplicate", HEAD + "al:\n  seed: 1\n  seed: 2\n", "error: al.seed: duplicate key at line 7"),
    ("inf", HEAD + "al: {md: {temperature_K: 1e400}}\n", "error: al.md.temperature_K: Input should be a finite"),
    ("bool", HEAD + "al: {window: true}\n", "error: al.window: Input should be a valid integer"),
    ("binary", bytes(range(256)) * 4, "a binary file"),
]


@pytest.mark.parametrize(("name", "content", "expected"), CLI_CASES, ids=[name for name, _, _ in CLI_CASES])
def test_console_script_prints_exactly_one_line(tmp_path, name, content, expected):
    path = _write(tmp_path, content, "bad.yaml")
    result = subprocess.run([str(CLI), "run", str(path), "--quiet"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "runs").exists()


NOTICE_PROBE = "import sys; {setup} import mace.tools.cg; sys.stdout.write('imported\\n')"


def test_the_cli_keeps_maces_cuequivariance_notice_off_stdout():
    quiet = subprocess.run(
        [sys.executable, "-c", NOTICE_PROBE.format(setup="from aimspax_like.cli import _silence_mace_notice; "
                                                 "_silence_mace_notice();")],
        capture_output=True, text=True, check=True,
    )
    assert quiet.stdout == "imported\n"
    loud = subprocess.run([sys.executable, "-c", NOTICE_PROBE.format(setup="")], capture_output=True, text=True)
    if "cuequivariance" not in loud.stdout:
        pytest.skip("this mace prints no cuequivariance notice (cuequivariance installed or a newer mace)")
    assert "cuequivariance" not in quiet.stdout + quiet.stderr
