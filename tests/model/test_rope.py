"""RoPE and YaRN (SPEC 1.2, 1.3): frequencies of the 671B preset from the hand formula, the softmax factor,
agreement with transformers' YaRN, and the adjacent-pair rotation convention on hand cases."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dsv3.config import preset
from dsv3.model import DeepSeekV3
from dsv3.model.rope import RotaryEmbedding, apply_rope, rope_frequencies
from tests.conftest import YARN


def test_671b_yarn_frequencies_follow_the_hand_formula():
    cfg = preset("671b")
    freqs, magnitude = rope_frequencies(cfg)
    theta, d, s, L = 10000.0, 64, 40.0, 4096

    def c(n):  # SPEC 1.3: the rope dim index that makes n rotations over the original context
        return d * math.log(L / (n * 2 * math.pi)) / (2 * math.log(theta))

    low, high = math.floor(c(32)), math.ceil(c(1))
    assert (low, high) == (10, 23)  # the SPEC's numbers for V3
    f = [theta ** (-2 * i / d) for i in range(32)]
    assert freqs.dtype == torch.float64 and freqs.shape == (32,)
    for i in range(32):
        if i < low:
            expected = f[i]  # fast dims keep their frequency
        elif i >= high:
            expected = f[i] / s  # slow dims are interpolated by the factor
        else:
            r = (i - low) / (high - low)
            expected = f[i] * (1 - r) + f[i] / s * r
        # both sides float64 from the same closed form: agreement to a few ulps
        assert freqs[i].item() == pytest.approx(expected, rel=1e-13), f"pair {i}"
    assert magnitude == 1.0  # cos/sin are not scaled: mscale / mscale_all_dim = 1


def test_671b_softmax_scale_includes_yarn_factor_once():
    cfg = preset("671b")
    factor = (0.1 * 1.0 * math.log(40) + 1) ** 2
    assert factor == pytest.approx(1.36889**2, rel=1e-5) and factor == pytest.approx(1.87385, rel=1e-5)
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * 1.36889**2, rel=1e-5)
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * factor, rel=1e-12)


def test_no_yarn_is_plain_rope():
    cfg = preset("tiny", rope_scaling=None)
    freqs, magnitude = rope_frequencies(cfg)
    d = cfg.qk_rope_head_dim
    expected = torch.tensor([10000.0 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    torch.testing.assert_close(freqs, expected, rtol=1e-13, atol=0)  # same closed form in float64
    assert magnitude == 1.0
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5, rel=1e-15)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        YARN,
        {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        {**YARN, "factor": 40, "original_max_position_embeddings": 4096},
        {**YARN, "mscale": 1.0, "mscale_all_dim": 0.0},
    ],
    ids=["tiny-yarn", "mscale0.707", "v3-factor40", "mscale-only"],
)
def test_yarn_frequencies_and_magnitude_match_transformers(make_cfg, rope_scaling):
    cfg = make_cfg(rope_scaling=rope_scaling, qk_rope_head_dim=64, rope_theta=10000.0)
    freqs, magnitude = rope_frequencies(cfg)
    hcfg = DeepseekV3Config(**cfg.to_dict())
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hcfg, "cpu")
    # transformers computes the table in float32: 1e-6 relative
    torch.testing.assert_close(freqs.float(), inv_freq, rtol=1e-6, atol=0)
    assert magnitude == pytest.approx(attention_factor, rel=1e-12)


def test_rotary_embedding_gives_cos_sin_of_position_times_frequency():
    cfg = preset("671b")
    rot = RotaryEmbedding(cfg)
    freqs, _ = rope_frequencies(cfg)
    pos = torch.tensor([[0, 1, 7, 4095, 100_000]])
    cos, sin = rot(pos)
    angle = pos.double()[..., None] * freqs
    # angles are formed in float32 (like transformers): error ~ angle * 2^-23, so check angles below 100 rad
    # to 2e-5 (that still includes slow pairs at position 100000) and that every entry is a valid cos/sin pair
    small = angle.abs() < 100
    assert small.sum() > 32
    assert (cos.double() - angle.cos()).abs()[small].max() < 2e-5
    assert (sin.double() - angle.sin()).abs()[small].max() < 2e-5
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos), rtol=0, atol=1e-6)
    assert cos.shape == (1, 5, 32)


def test_apply_rope_rotates_adjacent_pairs_by_hand():
    # pairs (x0, x1) = (1, 0) and (x2, x3) = (0, 2); rotate the first by 90 degrees and the second by 180
    x = torch.tensor([[[1.0, 0.0, 0.0, 2.0]]])  # [B=1, S=1, d_R=4]
    cos = torch.tensor([[[0.0, -1.0]]])
    sin = torch.tensor([[[1.0, 0.0]]])
    out = apply_rope(x, cos, sin)
    # (1 + 0i) * i = 0 + 1i; (0 + 2i) * (-1) = 0 - 2i. The half-split convention (pairs (x0, x2), (x1, x3))
    # would give [0, 0, 1, -2] instead.
    assert out.tolist() == [[[0.0, 1.0, 0.0, -2.0]]]


def test_apply_rope_broadcasts_over_heads_and_is_relative():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 3, 16, generator=g, dtype=torch.float64)  # [B, S, H, d_R]
    k = torch.randn(1, 1, 16, generator=g, dtype=torch.float64)
    freqs = torch.rand(8, generator=g, dtype=torch.float64)

    def rot(x, p):
        a = torch.full((1, 1), float(p), dtype=torch.float64)[..., None] * freqs
        return apply_rope(x, a.cos(), a.sin())

    # every head rotated alike
    assert torch.equal(rot(q, 5)[0, 0, 1], rot(q[:, :, 1:2], 5)[0, 0, 0])
    # <R(m) q, R(n) k> depends on m - n only (what makes the MTP block's position shift harmless)
    dots = [(rot(q, m)[0, 0] @ rot(k, n)[0, 0]) for m, n in ((7, 3), (104, 100), (4, 0))]
    for d in dots[1:]:
        torch.testing.assert_close(d, dots[0], rtol=1e-12, atol=1e-12)  # float64 rotations
    # and rotation preserves norms
    torch.testing.assert_close(rot(q, 9).norm(dim=-1), q.norm(dim=-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("mscale", "mscale_all_dim"), [(1.0, 0.0), (1.0, 0.5)], ids=["mscale1-all0", "mscale1-all0.5"]
)
def test_rotary_embedding_applies_yarn_magnitude_like_transformers(make_cfg, mscale, mscale_all_dim):
    # mscale != mscale_all_dim: the cos/sin magnitude is not 1, so a forward that drops it is caught here
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3RotaryEmbedding,
        apply_rotary_pos_emb_interleave,
    )

    rs = {**YARN, "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    cfg = make_cfg(rope_scaling=rs, qk_rope_head_dim=16, rope_theta=10000.0)
    s = float(rs["factor"])
    # float64 hand formula of YaRN's magnitude: (0.1 m ln s + 1) / (0.1 m_all ln s + 1)
    mag = (0.1 * mscale * math.log(s) + 1) / (0.1 * mscale_all_dim * math.log(s) + 1)
    assert mag > 1.05  # 1.1386 and 1.0653 for s = 4: far from 1

    rot = RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 5, 63, 200, 511]])
    cos, sin = rot(pos)

    # hand reference: float64 angles from the (separately checked) frequencies, scaled by the hand magnitude
    freqs, _ = rope_frequencies(cfg)
    angle = pos.double()[..., None] * freqs
    torch.testing.assert_close(cos.double(), mag * angle.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), mag * angle.sin(), rtol=0, atol=1e-5)
    assert cos[0, 0].double().sub(mag).abs().max() < 1e-6  # position 0: cos is exactly the magnitude

    # transformers' DeepSeek-V3 rotary embedding (cos/sin as cat(f, f), float32)
    hcfg = DeepseekV3Config(**cfg.to_dict())
    hrot = DeepseekV3RotaryEmbedding(hcfg)
    hcos, hsin = hrot(torch.zeros(1, dtype=torch.float32), pos)
    d2 = cfg.qk_rope_head_dim // 2
    torch.testing.assert_close(cos, hcos[..., :d2], rtol=0, atol=1e-5)
    torch.testing.assert_close(sin, hsin[..., :d2], rtol=0, atol=1e-5)

    # and the rotated q/k: transformers returns the rotated pairs de-interleaved ([x0 parts | x1 parts])
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 3, 16, generator=g)  # [B, S, H, d_R]
    k = torch.randn(1, 6, 16, generator=g)  # [B, S, d_R], shared by the heads
    hq, hk = apply_rotary_pos_emb_interleave(q, k[:, :, None], hcos, hsin, unsqueeze_dim=2)
    for ours, ref in ((apply_rope(q, cos, sin), hq), (apply_rope(k, cos, sin), hk[:, :, 0])):
        torch.testing.assert_close(ours[..., 0::2], ref[..., :d2], rtol=0, atol=1e-4)
        torch.testing.assert_close(ours[..., 1::2], ref[..., d2:], rtol=0, atol=1e-4)
    # the rotation scales every pair's norm by the magnitude
    torch.testing.assert_close(
        apply_rope(q, cos, sin).double().norm(dim=-1), mag * q.double().norm(dim=-1), rtol=1e-5, atol=0
    )


def test_softmax_scale_uses_mscale_all_dim_not_mscale(make_cfg):
    cfg = make_cfg(rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.5})
    m = 0.1 * 0.5 * math.log(YARN["factor"]) + 1
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5 * m * m, rel=1e-12)


def test_the_table_is_float32_or_wider_whatever_the_model_dtype(make_cfg):
    freqs, _ = rope_frequencies(make_cfg())
    r = RotaryEmbedding(make_cfg())
    r.to(torch.bfloat16)
    assert r.inv_freq.dtype == torch.float32 and torch.equal(r.inv_freq, freqs.float())
    r.double()  # recomputed in float64, not the float32 values widened
    assert r.inv_freq.dtype == torch.float64 and torch.equal(r.inv_freq, freqs)


def test_yarn_ramp_end_clamps_at_d_minus_1_like_transformers(make_cfg):
    # a long original context puts the beta_slow dim beyond the d_R/2 pairs (ceil(c(1)) = 9 > 7 for d_R=16):
    # the ramp's end is clamped at d_R - 1 (transformers' find_correction_range), not at the last pair index
    rope_scaling = {**YARN, "original_max_position_embeddings": 65536}
    cfg = make_cfg(rope_scaling=rope_scaling, qk_rope_head_dim=16, rope_theta=10000.0,
                   max_position_embeddings=4 * 65536)
    d, theta, s, L = 16, 10000.0, 4.0, 65536

    def c(n):
        return d * math.log(L / (n * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(c(32)), 0), min(math.ceil(c(1)), d - 1)
    assert high == 9 > d // 2 - 1
    expected = []
    for i in range(d // 2):
        r = min(max((i - low) / (high - low), 0.0), 1.0)
        f = theta ** (-2 * i / d)
        expected.append(f * (1 - r) + f / s * r)
    freqs, _ = rope_frequencies(cfg)
    torch.testing.assert_close(freqs, torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](DeepseekV3Config(**cfg.to_dict()), "cpu")
    torch.testing.assert_close(freqs.float(), inv_freq, rtol=1e-6, atol=0)


def test_yarn_zero_width_ramp_is_a_step_like_transformers(make_cfg):
    # original context 6: both correction dims round to pair 0 (c(1) = -0.04), a zero-width ramp; the pair at
    # the ramp keeps its frequency and every later pair is divided by the factor (no 0/0 NaN)
    rope_scaling = {**YARN, "original_max_position_embeddings": 6}
    cfg = make_cfg(rope_scaling=rope_scaling, qk_rope_head_dim=16, rope_theta=10000.0)
    freqs, _ = rope_frequencies(cfg)
    d, s = 16, 4.0
    expected = [10000.0 ** (-2 * i / d) / (1 if i == 0 else s) for i in range(d // 2)]
    torch.testing.assert_close(freqs, torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](DeepseekV3Config(**cfg.to_dict()), "cpu")
    torch.testing.assert_close(freqs.float(), inv_freq, rtol=1e-6, atol=0)


def test_softmax_scale_follows_mscale_all_dim_when_mscale_is_zero(make_cfg):
    cfg = make_cfg(rope_scaling={**YARN, "mscale": 0.0, "mscale_all_dim": 1.0})
    m = 0.1 * 1.0 * math.log(YARN["factor"]) + 1
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5 * m * m, rel=1e-12)


def test_init_weights_recomputes_the_table_of_a_model_built_on_meta(make_cfg):
    # a model built on the meta device and moved with to_empty holds an uninitialised table until init_weights
    cfg = make_cfg()
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    model.to_empty(device="cpu")
    model.rotary.inv_freq.fill_(float("nan"))
    model.init_weights()
    freqs, _ = rope_frequencies(cfg)
    assert torch.equal(model.rotary.inv_freq, freqs.float())
