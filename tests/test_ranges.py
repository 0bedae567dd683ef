"""Every number flag of train, evaluate, predict and export is checked against its declared range
(the config fields' metadata, ``ArgumentParser.add_number``): a value just outside it, and for
floats nan and inf, stop the command with exit status 2 and one ``distres: error:`` line naming
the flag, before anything is built."""

import dataclasses
import math

from distres import config, evaluate, export, predict, train
from tests.helpers import run_here


def _outside(rules: dict, typ) -> list:
    """Values just outside a declared range (and nan, inf for floats)."""
    step = 1 if typ is int else 1e-3
    out = []
    if "at_least" in rules:
        out.append(rules["at_least"] - step)
    if "above" in rules:
        out.append(rules["above"])
    if "at_most" in rules:
        out.append(rules["at_most"] + step)
    if "below" in rules:
        out.append(rules["below"])
    if typ is float:
        out += [math.nan, math.inf]
    return out


def _train_cases():
    for name in config.SECTIONS:
        for f in dataclasses.fields(config.SECTIONS[name][0]):
            typ = {"int": int, "float": float}.get(str(f.type))
            if typ is None:
                continue
            assert any(k in f.metadata for k in ("at_least", "above", "at_most", "below")), f"--{f.name} has no range"
            for value in _outside(f.metadata, typ):
                yield train.main, "--" + config.flag(f.name), value, []


def _cli_cases():
    needs = {
        evaluate: ["--checkpoint", "x.pt"],
        predict: ["--checkpoint", "x.pt", "img.jpg"],
        export: ["--checkpoint", "x.pt", "--format", "onnx", "--output", "x.onnx"],
    }
    for module, required in needs.items():
        parser = module.build_parser()
        numbers = [a for a in parser._actions if a.type in (int, float)]
        assert numbers and all(a.dest in parser.ranges for a in numbers), module.__name__  # every one declared
        for a in numbers:
            for value in _outside(parser.ranges[a.dest][1], a.type):
                yield module.main, a.option_strings[0], value, required


CASES = list(_train_cases()) + list(_cli_cases())


def test_the_sweep_covers_every_command():
    flags = {(main.__module__, name) for main, name, _, _ in CASES}
    assert ("distres.train", "--workers") in flags and ("distres.predict", "--workers") in flags
    assert ("distres.evaluate", "--top-k") in flags and ("distres.export", "--atol") in flags
    assert len(flags) > 40


def test_every_number_flag_is_range_checked():
    failures = []
    for main, name, value, required in CASES:
        ran = run_here(main, required + [name, str(value)])
        lines = [ln for ln in ran.stderr.splitlines() if ln.startswith("distres: error: ")]
        if ran.returncode != 2 or len(lines) != 1 or name not in lines[0] or "Traceback" in ran.stderr:
            failures.append(f"{main.__module__} {name} {value}: {ran.returncode} {ran.stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)
