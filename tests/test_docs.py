"""The README documents every metric and every setting the code has."""

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from streamlearn.cli import COMMANDS
from streamlearn.metrics import ServerMetrics, TrainerMetrics

README = (Path(__file__).parents[1] / "README.md").read_text()


def exported_names(group) -> list[str]:
    registry = CollectorRegistry()
    group(registry)
    names = []
    for family in registry.collect():
        names.append(family.name + ("_total" if family.type == "counter" else ""))
    return names


@pytest.mark.parametrize("group", [TrainerMetrics, ServerMetrics])
def test_every_metric_is_in_the_readme(group):
    missing = [name for name in exported_names(group) if f"`{name}`" not in README]
    assert not missing


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_setting_is_in_the_readme(command):
    model = COMMANDS[command][0]
    missing = [
        name
        for name in model.model_fields
        if name != "kafka" and f"`STREAMLEARN_{name.upper()}`" not in README
    ]
    assert not missing
