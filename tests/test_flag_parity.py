"""Every open_clip_train training flag is accepted here with its meaning, or named in the README's
"Not applicable" table with a reason; and the carried-over flags that only make sense together fail
at start with one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.params import build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]


def help_flags(command: list[str], cwd: Path = ROOT) -> set[str]:
    """The long flags a script's `--help` prints."""
    text = subprocess.run([*command, "--help"], cwd=cwd, capture_output=True, text=True, check=True,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}).stdout
    flags = set()
    for line in text.splitlines():
        if re.match(r"^ {2}-", line):  # an option line: its spellings come before the help text
            flags.update(re.findall(r"--[a-zA-Z][\w-]*", re.split(r"(?<=\S) {2,}", line.strip(), maxsplit=1)[0]))
    return flags


def not_applicable_flags() -> dict[str, str]:
    """The README's "Not applicable" table: flag -> reason."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("**Not applicable**", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for flag in re.findall(r"`(--[\w-]+)`", cells[0]):
            rows[flag] = cells[1]
    return rows


@pytest.fixture(scope="module")
def open_clip_flags() -> set[str]:
    return help_flags([sys.executable, "-m", "open_clip_train.main"]) - {"--help"}


@pytest.fixture(scope="module")
def our_flags() -> set[str]:
    return help_flags([sys.executable, "src/training/main.py"])


def test_every_open_clip_train_flag_is_accepted_or_not_applicable(open_clip_flags, our_flags):
    assert len(open_clip_flags) > 80 and "--accum-freq" in open_clip_flags  # the help was read
    not_applicable = not_applicable_flags()
    assert all(len(reason) > 20 for reason in not_applicable.values()), not_applicable
    missing = sorted(open_clip_flags - our_flags - set(not_applicable))
    assert not missing, f"open_clip_train flags neither accepted nor in the README's Not applicable table: {missing}"


def test_not_applicable_flags_are_really_refused(our_flags, open_clip_flags):
    """The table names only real open_clip_train flags that this script does not take."""
    for flag in not_applicable_flags():
        assert flag in open_clip_flags, flag
        assert flag not in our_flags, f"{flag} is accepted: take it out of the Not applicable table"


@pytest.mark.parametrize("flag", ["--precision", "--lr-scheduler", "--dataset-type", "--remote-sync-protocol",
                                  "--image-interpolation", "--image-resize-mode", "--loss-dist-impl"])
def test_open_clip_choices_are_accepted(flag):
    """Where open_clip_train offers fixed choices, every one of them parses here too."""
    import argparse

    import open_clip_train.params as theirs

    captured = {}

    def grab(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            theirs.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    their_action = next(a for a in captured["parser"]._actions if flag in a.option_strings)
    our_action = next(a for a in build_parser()._actions if flag in a.option_strings)
    assert set(their_action.choices or ()) <= set(our_action.choices), flag


BASE = ["--dataset-type", "synthetic", "--train-num-samples", "32"]


@pytest.mark.parametrize("flags, message", [
    (["--fastclip", "--data_size", "32", "--accum-freq", "2"], "--accum-freq with --fastclip"),
    (["--fastclip", "--data_size", "32", "--siglip"], "--siglip and --fastclip"),
    (["--siglip", "--local-loss"], "--siglip exchanges features"),
    (["--loss-dist-impl", "shift"], "add --siglip"),
    (["--train-data-upsampling-factors", "1::2"], "add --dataset-resampled"),
    (["--lock-image-unlocked-groups", "2"], "add --lock-image"),
    (["--lock-text-unlocked-layers", "1"], "add --lock-text"),
    (["--momentum", "0.9"], "timm optimizers"),
    (["--opt", "lamb"], "timm/NAME"),
    (["--accum-freq", "0"], "--accum-freq must be >= 1"),
])
def test_flags_that_need_another_fail_in_one_line(flags, message):
    with pytest.raises(SystemExit) as stop:
        parse_args([*BASE, *flags])
    assert message in str(stop.value) and "\n" not in str(stop.value)


def test_siglip_defaults_follow_open_clip_train():
    import math

    from fastclip.losses.siglip import SIGLIP_MODEL_KWARGS

    args = parse_args([*BASE, "--siglip"])
    assert args.temperature == 0.1 and args.init_logit_bias == -10.0  # logit scale log(10), bias -10
    assert math.log(1 / args.temperature) == pytest.approx(SIGLIP_MODEL_KWARGS["init_logit_scale"])
    assert args.init_logit_bias == SIGLIP_MODEL_KWARGS["init_logit_bias"]
    assert parse_args([*BASE, "--siglip", "--temperature", "0.05"]).temperature == 0.05
    assert parse_args(BASE).temperature == 0.07 and parse_args(BASE).init_logit_bias is None


def test_skip_scheduler_and_cooldown_power_follow_open_clip():
    from fastclip.train.schedules import LrSchedule

    skipped = LrSchedule("none", 1e-3, warmup_steps=10, total_steps=100)
    assert [skipped(s) for s in (0, 5, 99)] == [1e-3, 1e-3, 1e-3]  # no warmup, no decay
    quadratic = LrSchedule("const-cooldown", 1.0, 0, 100, cooldown_steps=40, end_lr=0.1, cooldown_power=2.0)
    assert quadratic(59) == 1.0
    assert quadratic(80) == pytest.approx(0.1 + 0.9 * (1 - 20 / 40) ** 2)  # open_clip's (1 - e/es) ** power
    linear = LrSchedule("const-cooldown", 1.0, 0, 100, cooldown_steps=40, end_lr=0.1)
    assert linear(80) == pytest.approx(0.55)


def test_timm_optimizer_keeps_the_parameter_groups():
    import torch

    from fastclip.train.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.logit_scale = torch.nn.Parameter(torch.zeros(()))
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6, temperature_lr=1e-4, opt="timm/sgd", momentum=0.8)
    assert type(optimizer).__module__.startswith(("timm", "torch"))
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (0.1, 0.0)
    assert groups["temperature"]["lr"] == 1e-4 and groups["decay"]["momentum"] == 0.8
    lamb = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6, opt="timm/lamb")
    assert type(lamb).__name__ == "Lamb"


def test_sync_batch_norm_on_the_cpu_stops_with_the_reason():
    import torch

    from fastclip.distributed import DistEnv
    from training.builders import wrap_ddp

    with pytest.raises(SystemExit, match="--use-bn-sync needs GPUs"):
        wrap_ddp(torch.nn.BatchNorm1d(3), DistEnv(rank=0, world_size=2), sync_batch_norm=True)
