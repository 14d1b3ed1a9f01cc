"""`python -m fastclip.tools.plot`: the curves of real tiny runs (OpenCLIP and FastCLIP-v3), read back and drawn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from conftest import SEED_COMMANDS, scaled, tiny_run
from fastclip.tools.plot import (
    PANELS, draw, figure_pixels, main, panels_with_data, read_run, read_runs, trailing_mean,
)
from training.main import main as train

ZERO_SHOT = ("imagenet-zeroshot-val-top1", "imagenet-zeroshot-val-top5")
RECALL = ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@10", "text_to_image_R@10")
RUN_FILES = ("metrics.jsonl", "results.jsonl", "params.json")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged_keys(run_dir: Path) -> set[str]:
    """Every key the run's files hold, plus `tau` where a temperature can be read (tau or logit_scale)."""
    keys = {key for row in read_jsonl(run_dir / "metrics.jsonl") + read_jsonl(run_dir / "results.jsonl")
            for key in row}
    return keys | ({"tau"} if "logit_scale" in keys else set())


def copy_run(run_dir: Path, to: Path) -> Path:
    """The run's log files (not its checkpoints) in a folder of the same name under `to`."""
    copy = to / run_dir.name
    copy.mkdir(parents=True)
    for name in RUN_FILES:
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory) -> dict[str, Path]:
    """Two 2-epoch runs with retrieval evaluated after each epoch and zero-shot after the last."""
    logs = tmp_path_factory.mktemp("logs")
    first_shard = sorted(Path(demo_data.train_shards).parent.glob("*.tar"))[0]
    evaluations = dict(imagenet_val=demo_data.test_dir, zeroshot_frequency=2, val_data=first_shard,
                       val_num_samples=200)
    for version in ("openclip", "fastclip-v3"):
        overrides = {**tiny_run(demo_data, logs, version), "train_num_samples": 320, "log_every_n_steps": 3}
        train(scaled(SEED_COMMANDS[version], **overrides, **evaluations))
    return {name: logs / name for name in ("openclip", "fastclip-v3")}


def without_evaluation_steps(run: Path) -> Path:
    """The run's results.jsonl as written before evaluations recorded their step: epochs only."""
    rows = [{k: v for k, v in row.items() if k != "step"} for row in read_jsonl(run / "results.jsonl")]
    (run / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def test_two_runs_in_one_png_of_the_expected_size(runs, tmp_path, capsys):
    out = tmp_path / "compare.png"
    main([str(runs["openclip"]), str(runs["fastclip-v3"]), "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == figure_pixels(len(panels_with_data(read_runs([runs["openclip"], runs["fastclip-v3"]]))))
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    for colour in ("C0", "C1"):  # one colour per run, both drawn
        rgb = np.round(np.array(to_rgb(colour)) * 255)
        assert (np.abs(pixels - rgb).max(axis=1) <= 2).sum() > 100, colour


def test_series_equal_the_logged_numbers(runs):
    for name in ("openclip", "fastclip-v3"):
        curves = read_run(runs[name])
        steps = read_jsonl(runs[name] / "metrics.jsonl")
        for key in ("loss", "lr", "logit_scale") + (("gamma", "tau") if name == "fastclip-v3" else ()):
            assert curves.series[key].step == tuple(row["step"] for row in steps), key
            assert curves.series[key].value == tuple(row[key] for row in steps), key
        if name == "openclip":  # no tau logged: the model's temperature
            assert curves.series["tau"].value == pytest.approx([1 / row["logit_scale"] for row in steps])
        else:
            assert "gamma" not in read_run(runs["openclip"]).series
        epoch_ends = {row["epoch"]: row["step"] for row in steps}  # the last logged step of every epoch
        ends = [i for i, row in enumerate(steps) if row["step"] == epoch_ends[row["epoch"]]]
        assert [curves.series["loss"].epoch[i] for i in ends] == [steps[i]["epoch"] + 1 for i in ends]
        assert all(row["epoch"] < x <= row["epoch"] + 1 for row, x in zip(steps, curves.series["loss"].epoch))

        results = read_jsonl(runs[name] / "results.jsonl")
        assert [row["epoch"] for row in results] == [1, 2]
        for key in ZERO_SHOT + RECALL:
            series = curves.series[key]
            assert series.value == tuple(row[key] for row in results if key in row), key
            assert series.epoch == tuple(row["epoch"] for row in results if key in row), key
            assert series.step == tuple(row.get("step", epoch_ends[row["epoch"] - 1]) for row in results if key in row)


def test_evaluations_without_a_step_are_placed_at_the_end_of_their_epoch(runs, tmp_path):
    run = without_evaluation_steps(copy_run(runs["fastclip-v3"], tmp_path))
    epoch_ends = {row["epoch"] + 1: row["step"] for row in read_jsonl(run / "metrics.jsonl")}
    for key in ZERO_SHOT + RECALL:
        series = read_run(run).series[key]
        assert series.step == tuple(epoch_ends[epoch] for epoch in series.epoch), key


def test_panels_present_are_the_ones_with_data(runs, tmp_path):
    evaluation = without_evaluation_steps(copy_run(runs["fastclip-v3"], tmp_path))
    (evaluation / "metrics.jsonl").unlink()  # what an evaluation-only run leaves
    for folder in (runs["openclip"], runs["fastclip-v3"], evaluation):
        keys = logged_keys(folder)
        expected = [panel.title for panel in PANELS if any(curve.key in keys for curve in panel.curves)]
        assert [panel.title for panel in panels_with_data([read_run(folder)])] == expected
    assert not any(c.key in ("gamma", "g_over_u") for p in panels_with_data([read_run(runs["openclip"])]) for c in p.curves)
    both = panels_with_data(read_runs([runs["openclip"], runs["fastclip-v3"]]))
    assert {c.key for p in both for c in p.curves} >= {"loss", "tau", "lr", "gamma", "g_over_u", *ZERO_SHOT, *RECALL}

    placed = read_run(evaluation).series["image_to_text_R@1"]  # steps from params.json alone
    assert placed == read_run(runs["fastclip-v3"]).series["image_to_text_R@1"]
    main([str(evaluation)])  # evaluations only: their panels, next to the results
    with Image.open(evaluation / "curves.png") as image:
        assert image.size == figure_pixels(len(panels_with_data([read_run(evaluation)])))


def test_several_runs_go_to_the_working_directory(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main([str(runs["openclip"]), str(runs["fastclip-v3"]), "--x", "epoch", "--smooth", "3"])
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "wrote curves.png" in capsys.readouterr().out


@pytest.mark.parametrize("exists", [True, False])
def test_a_folder_that_is_not_a_run_is_a_one_line_error(exists, runs, tmp_path, monkeypatch):
    folder = tmp_path / "not_a_run"
    if exists:
        folder.mkdir()
        (folder / "notes.txt").write_text("no run here")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([str(runs["openclip"]), str(folder)])
    message = str(stop.value.code)
    assert message.startswith("error: ") and str(folder) in message and "\n" not in message
    assert not (tmp_path / "curves.png").exists()


def test_a_resumed_run_keeps_the_rows_it_finally_took(runs, tmp_path):
    """Rows logged again after a resume replace the interrupted attempt's; a half-written last line is
    left out; a damaged line elsewhere is an error naming file and line."""
    run = copy_run(runs["fastclip-v3"], tmp_path)
    final = read_jsonl(run / "metrics.jsonl")
    resumed_at = len(final) // 2
    interrupted = final[:resumed_at] + [{**row, "loss": row["loss"] + 1} for row in final[resumed_at : resumed_at + 2]]
    lines = [json.dumps(row) for row in interrupted + final[resumed_at:]]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:20])
    loss = read_run(run).series["loss"]
    assert loss.step == tuple(row["step"] for row in final)
    assert loss.value == tuple(row["loss"] for row in final)

    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    with pytest.raises(SystemExit, match=r"metrics.jsonl line 4 is not JSON"):
        main([str(run)])


def test_smoothing_is_a_trailing_mean_of_the_loss(runs):
    loss = np.array(read_run(runs["fastclip-v3"]).series["loss"].value)
    window = 4
    expected = [loss[max(0, i - window + 1): i + 1].mean() for i in range(len(loss))]
    assert trailing_mean(loss, window) == pytest.approx(expected)
    with pytest.raises(SystemExit, match="--smooth 0"):
        main([str(runs["fastclip-v3"]), "--smooth", "0"])


def test_per_sample_tau_statistics_are_drawn_as_a_band(runs, tmp_path):
    run = copy_run(runs["fastclip-v3"], tmp_path)
    rows = read_jsonl(run / "metrics.jsonl")
    stats = [{**row, "tau_min": 0.5 * row["tau"], "tau_max": 2 * row["tau"]} for row in rows]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in stats))
    curves = read_run(run)
    assert curves.series["tau_max"].value == tuple(row["tau_max"] for row in stats)
    tau_axes = [ax for ax in draw([curves]).axes if ax.get_title() == "temperature τ"]
    assert len(tau_axes) == 1 and len(tau_axes[0].collections) == 1  # the band
    plain = [ax for ax in draw([read_run(runs["fastclip-v3"])]).axes if ax.get_title() == "temperature τ"]
    assert len(plain[0].collections) == 0


def test_a_run_that_logged_nothing_yet_is_a_one_line_error(tmp_path):
    run = tmp_path / "starting"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match=rf"^error: {run}: nothing to plot yet") as stop:
        main([str(run)])
    assert "\n" not in str(stop.value.code) and not (run / "curves.png").exists()
