"""`make demo`'s script end to end at a small size: shards built, a run trained and evaluated, curves drawn,
and the last line the JSON the README shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_script_trains_evaluates_plots_and_ends_with_one_json_line(tmp_path, fashion_mnist_dir):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, str(ROOT / "scripts/demo.py"), "--out", str(out), "--epochs", "1",
                             "--limit", "640", "--batch-size", "64", "--workers", "0"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["test_images"] == 640 and summary["epochs"] == 1
    assert 0.0 <= summary["zeroshot_top1"] <= summary["zeroshot_top5"] <= 1.0
    assert (out / "curves.png").stat().st_size > 0 and (tmp_path / summary["curves"]).resolve() == out / "curves.png"
