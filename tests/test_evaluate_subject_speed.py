"""A subject evaluation spread over two processes (`accelerate launch --cpu --num_processes 2`) writes the numbers
of one process: each process generates every second batch, the main process scores them all."""
from __future__ import annotations

import pandas as pd
import pytest

from customgen.cli import main
from tests.launch import launch_two_processes
from tests.subject_fixtures import shared_subject_env
from tests.test_evaluate_subject import argv

TIMING = ["seconds_per_image", "seconds_per_image_std", "infer_peak_memory_bytes"]  # differ between runs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return shared_subject_env(tmp_path_factory)


def test_two_processes_write_the_numbers_of_one(env, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(argv(env["library"], one)) == 0
    r = launch_two_processes(argv(env["library"], two))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("result rows in") == 1 and r.stdout.count("best step") == 1  # only the main process
    a, b = (pd.read_csv(d / "subject_metrics.csv").drop(columns=TIMING) for d in (one, two))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    pa, pb = (pd.read_csv(d / "subject_per_image.csv").drop(columns=["seconds", "peak_memory_bytes"]) for d in (one, two))
    pd.testing.assert_frame_equal(pa, pb, check_exact=True)
    assert not (two / ".subject-ranks").exists()
    assert sorted(p.relative_to(two) for p in (two / "subject_images").rglob("*.png")) == sorted(
        p.relative_to(one) for p in (one / "subject_images").rglob("*.png"))
