"""Schedules at hand-computed points: the paper's run (SPEC 4) and a scaled-down one."""

from __future__ import annotations

import math

import pytest

from dsv3.train.schedule import (
    ScheduleConfig,
    batch_size,
    gamma_at,
    lr_at,
    mtp_lambda_at,
    total_steps,
    warmup_steps,
)

T = 1e12  # one trillion tokens
V3 = ScheduleConfig()
LATE = 10**6  # a step well past warm-up


def test_v3_step_count_and_warmup():
    # ramp: 469B / (4096 x (15360 - 3072)) x ln 5 steps, then (14.8T - 469B) / (15360 x 4096)
    analytic = 469e9 / (4096 * 12288) * math.log(5) + (14.8e12 - 469e9) / (15360 * 4096)
    assert abs(total_steps(V3) - analytic) < 10  # 242,782 analytic; whole sequences add a few steps
    assert warmup_steps(V3) == 2000


def test_v3_learning_rate_at_chosen_points():
    peak = 2.2e-4
    assert lr_at(0, 0, V3) == pytest.approx(peak / 2000)  # first step of the linear warm-up
    assert lr_at(999, 5e9, V3) == pytest.approx(peak / 2)
    assert lr_at(1999, 25e9, V3) == pytest.approx(peak)  # end of warm-up
    assert lr_at(LATE, 5 * T, V3) == pytest.approx(peak)  # constant stage
    assert lr_at(LATE, 9.999 * T, V3) == pytest.approx(peak)
    assert lr_at(LATE, 10 * T, V3) == pytest.approx(peak)  # cosine starts at p = 0
    # quarter of the decay (10T + 4.3T / 4): 2.2e-5 + 1.98e-4 * (1 + cos(pi / 4)) / 2
    assert lr_at(LATE, 11.075 * T, V3) == pytest.approx(2.2e-5 + 1.98e-4 * (1 + math.sqrt(0.5)) / 2, rel=1e-9)
    assert lr_at(LATE, 12.15 * T, V3) == pytest.approx(1.21e-4, rel=1e-9)  # mid-cosine: (2.2e-4 + 2.2e-5) / 2
    assert lr_at(LATE, 14.2999 * T, V3) == pytest.approx(2.2e-5, rel=1e-6)  # the cosine's end
    assert lr_at(LATE, 14.3 * T, V3) == pytest.approx(2.2e-5, rel=1e-12)  # constant 2.2e-5 for 333B
    assert lr_at(LATE, 14.632 * T, V3) == pytest.approx(2.2e-5, rel=1e-12)
    assert lr_at(LATE, 14.634 * T, V3) == pytest.approx(7.3e-6, rel=1e-12)  # last 167B
    assert lr_at(LATE, 14.8 * T, V3) == pytest.approx(7.3e-6, rel=1e-12)
    # warm-up multiplies whatever the token schedule says
    assert lr_at(499, 12.15 * T, V3) == pytest.approx(1.21e-4 / 4, rel=1e-9)


def test_v3_batch_ramp():
    assert batch_size(0, V3) == 3072
    assert batch_size(117.25e9, V3) == 3072 + 3072  # a quarter of the 469B ramp
    assert batch_size(234.5e9, V3) == 9216  # half way
    assert batch_size(469e9 - 1e6, V3) == 15359  # whole sequences, rounded down
    assert batch_size(469e9, V3) == 15360
    assert batch_size(5 * T, V3) == 15360


def test_v3_gamma_and_lambda_by_tokens():
    assert gamma_at(0, V3) == 0.001
    assert gamma_at(14.2999 * T, V3) == 0.001
    assert gamma_at(14.3 * T, V3) == 0.0
    assert gamma_at(14.8 * T, V3) == 0.0
    assert mtp_lambda_at(0, V3) == 0.3
    assert mtp_lambda_at(9.999 * T, V3) == 0.3
    assert mtp_lambda_at(10 * T, V3) == 0.1
    assert mtp_lambda_at(14.8 * T, V3) == 0.1


def test_scaled_run_keeps_the_shape():
    # 1.48M tokens of 128-token sequences: every boundary is the paper's divided by 1e7
    cfg = ScheduleConfig.scaled(1.48e6, seq_len=128, batch_max=40, batch_multiple=4, peak_lr=1e-3)
    assert (cfg.batch_min, cfg.batch_max) == (8, 40)
    assert ScheduleConfig.scaled(1e6, seq_len=128, batch_max=100).batch_min == 20  # V3's 3072 / 15360 = 1/5
    assert batch_size(0, cfg) == 8
    # 4.69e4 tokens ramp: at 1e4 tokens 8 + floor(32 x 0.2132) = 14, down to a multiple of 4 -> 12
    assert batch_size(1e4, cfg) == 12
    assert batch_size(4.69e4, cfg) == 40
    assert lr_at(LATE, 1.0e6 - 1, cfg) == pytest.approx(1e-3)
    assert lr_at(LATE, 1.215e6, cfg) == pytest.approx(0.55e-3, rel=1e-9)  # mid-cosine
    assert lr_at(LATE, 1.45e6, cfg) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(LATE, 1.47e6, cfg) == pytest.approx(1e-3 * 7.3e-6 / 2.2e-4, rel=1e-12)
    assert gamma_at(1.42e6, cfg) == 0.001 and gamma_at(1.43e6, cfg) == 0.0
    assert mtp_lambda_at(0.99e6, cfg) == 0.3 and mtp_lambda_at(1.0e6, cfg) == 0.1
    # warm-up is the same 0.824% of the run's steps
    assert warmup_steps(cfg) == round(2000 / 242_785 * total_steps(cfg))


def test_constant_batch_step_count_and_explicit_warmup():
    cfg = ScheduleConfig(total_tokens=1e6, seq_len=100, batch_min=16, batch_max=16, warmup_steps=10)
    assert total_steps(cfg) == math.ceil(1e6 / 1600)  # 625
    assert warmup_steps(cfg) == 10
    assert lr_at(0, 0, cfg) == pytest.approx(2.2e-4 / 10)
    assert lr_at(9, 0, cfg) == pytest.approx(2.2e-4)
    assert lr_at(0, 0, ScheduleConfig(warmup_steps=0)) == 2.2e-4


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(batch_min=100, batch_max=50), "batch_min"),
        (dict(batch_multiple=8, batch_min=12), "batch_min"),
        (dict(lr_constant_until=0.99), "lr_constant_until"),
        (dict(gamma_until=1.5), "gamma_until"),
        (dict(total_tokens=0), "total_tokens"),
    ],
)
def test_bad_fields_are_named(fields, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ScheduleConfig(**fields)
