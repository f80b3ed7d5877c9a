import subprocess
import sys
from pathlib import Path

import pytest

from deploy.spec import ResourceGroupSpec, load_spec, parse_unit
from pipelines.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
GOOD = """
name: rc
category: BASIC
head: {spec: small}
worker_groups:
  - {name: cpu, type: CPU, spec: m.xlarge, min_workers: 1, max_workers: 4}
  - {name: gpu, type: GPU, spec: gpu.a10.1, disk_gb: 200, min_workers: 1, max_workers: 2, distribution_unit: 1/3}
requirements: [lightgbm>=4.5]
"""


def write(tmp_path, text):
    p = tmp_path / "resource_group.yaml"
    p.write_text(text)
    return p


def test_good_spec_and_reservation(tmp_path):
    spec = load_spec(str(write(tmp_path, GOOD)))
    assert spec.group("gpu").gpus == pytest.approx(1 / 3)
    assert spec.group("cpu").disk_gb == 100
    assert spec.reserved("min") == {"cores": 1 + 8 + 8, "memory_gb": 4 + 64 + 64, "gpus": 0.333,
                                    "disk_gb": 100 + 100 + 200, "workers": 2}
    assert spec.reserved("max")["cores"] == 1 + 4 * 8 + 2 * 8


@pytest.mark.parametrize("override, needle", [
    ("worker_groups.0.max_workers: 9", "max_workers"),
    ("worker_groups.0.disk_gb: 20", "disk_gb"),
    ("worker_groups.0.min_workers: 5", "min_workers 5 > max_workers 4"),
    ("worker_groups.0.spec: m.huge", "unknown CPU spec 'm.huge'"),
    ("worker_groups.1.distribution_unit: 2/0", "divides by zero"),
    ("requirements: ['lightgbm; rm -rf /']", "shell metacharacter"),
    ("requirements: ['x$(whoami)']", "shell metacharacter"),
    ("head.spec: huge", "head.spec"),
    ("category: GOLD", "BASIC"),
    ("name: -bad", "name"),
])
def test_invalid_spec_values_are_one_line(tmp_path, override, needle):
    import yaml

    data = yaml.safe_load(GOOD)
    key, value = override.split(": ", 1)
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    node[parts[-1]] = yaml.safe_load(value)
    p = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_spec(str(p))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unit_parsing():
    assert parse_unit("1/3") * 3 == 1 and parse_unit("2") == 2
    for bad in ("0", "a/b", "1/0", "-1"):
        with pytest.raises(ValueError):
            parse_unit(bad)


def test_every_template_spec_is_valid():
    for t in ("multimodal", "recsys", "riskcontrol", "embodied"):
        if (ROOT / t / "resource_group.yaml").exists():
            assert isinstance(load_spec(t), ResourceGroupSpec)


def test_cli_bad_spec_exits_nonzero_with_one_line_before_cluster_work(tmp_path):
    p = write(tmp_path, GOOD.replace("max_workers: 4", "max_workers: 9"))
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "cluster", "up", "--spec", str(p)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_workers" in lines[0], proc.stderr


@pytest.mark.parametrize("line, needle", [
    ("--extra-index-url http://evil.example/simple", "pip options are not accepted"),
    ("-e git+https://github.com/x/y.git#egg=y", "pip options are not accepted"),
    ("-r other.txt", "pip options are not accepted"),
    ("pkg @ https://evil.example/pkg-1.0-py3-none-any.whl", "URL requirements are not accepted"),
    ("git+https://github.com/x/y.git", "not a requirement specifier"),
    ("lightgbm >= 4.5 extra words", "not a requirement specifier"),
])
def test_requirements_accept_specifiers_only(tmp_path, line, needle):
    import yaml

    data = yaml.safe_load(GOOD)
    data["requirements"] = ["numpy>=1.26", line]
    with pytest.raises(ConfigError) as e:
        load_spec(str(write(tmp_path, yaml.safe_dump(data))))
    assert needle in str(e.value) and repr(line) in str(e.value) and "\n" not in str(e.value)


def test_requirement_specifiers_pass():
    reqs = ["lightgbm>=4.5", "torch==2.3.0", "numpy[dev]>=1.26,<3", "scikit-learn~=1.5", "ray[data]"]
    assert ResourceGroupSpec(name="g", worker_groups=[{"name": "cpu"}], requirements=reqs).requirements == reqs


@pytest.mark.parametrize("field", ["name", "group"])
def test_names_with_a_trailing_newline_are_refused(field):
    from pydantic import ValidationError

    kw = {"name": "rc\n", "worker_groups": [{"name": "cpu"}]} if field == "name" else \
        {"name": "rc", "worker_groups": [{"name": "cpu\n"}]}
    with pytest.raises(ValidationError, match=r"must match \[A-Za-z0-9\]"):
        ResourceGroupSpec(**kw)
