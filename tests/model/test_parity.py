"""Parity with transformers' DeepseekV3ForCausalLM and MtpModel, the independent reference implementation.

Both directions go through the checkpoint on disk: transformers' `save_pretrained` -> our `load_model`, and
our `save_model` -> transformers' `from_pretrained`, so names, layouts (head-major kv_b_proj, stacked experts)
and numerics are all checked. Router biases are random (N(0, 0.1)) so the bias really moves expert selection,
and weights have std 0.1 so logits are of order 1.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

from dsv3.checkpoint import load_model, save_model
from tests.conftest import SHAPES, randomize_bias_

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# float32 end to end; the two implementations order their sums differently (SDPA vs eager softmax, grouped vs
# per-expert GEMMs), which costs ~1e-7 relative per op, ~1e-6 over 3 layers (observed). 1e-4 of the largest
# logit leaves 100x headroom, while any wiring error (rope pairing, YaRN factor, group rule, a transposed head
# layout) moves logits by 1e-2 or more.
REL_TOL = 1e-4


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL_TOL) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0.5, "logits too small for the comparison to mean anything"
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * max |logit| {scale:.3g}"


def hf_reference(cfg, seed: int = 0) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_dict())).float().eval()
    randomize_bias_(hf, 0.1, seed)
    return hf


@pytest.mark.parametrize("tiny_cfg", list(SHAPES), indirect=True)
def test_transformers_checkpoint_loads_with_same_logits(tiny_cfg, tokens, tmp_path):
    hf = hf_reference(tiny_cfg)
    hf.save_pretrained(tmp_path)
    if tiny_cfg.num_nextn_predict_layers:
        # transformers' save_pretrained drops the MTP layers; we must say so and load the main model
        with pytest.warns(UserWarning, match="no MTP weights"):
            ours = load_model(tmp_path, dtype=torch.float32)
        assert len(ours.mtp) == 0
    else:
        ours = load_model(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert_logits_close(ours(tokens).logits, hf(tokens).logits)


@pytest.mark.parametrize("tiny_cfg", list(SHAPES), indirect=True)
def test_our_checkpoint_loads_in_transformers_with_same_logits_and_mtp(tiny_cfg, make_model, tokens,
                                                                       tmp_path):
    model = make_model(tiny_cfg)
    save_model(model, tmp_path / "ck")
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(tokens)
        ref = hf(tokens, output_hidden_states=True)
    assert_logits_close(out.logits, ref.logits)

    D, L = tiny_cfg.num_nextn_predict_layers, tiny_cfg.num_hidden_layers
    assert len(out.mtp_logits) == D
    if not D:
        return
    # MtpModel finds its layers through this pattern list, which the class hardcodes for layer 61
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L + k}\..*" for k in range(D)]
    mtp = MtpModel.from_pretrained(hf).float().eval()
    B, S = tokens.shape
    positions = torch.arange(S).expand(B, S)
    h = ref.hidden_states[-1]  # the main model's output after its final norm
    with torch.no_grad():
        for k in range(D):
            h = mtp.forward_layer(k, h, positions, None, input_ids=tokens.roll(-(k + 1), 1))
            mtp_ref = mtp._project_to_logits(h)
            # depth k+1 sees token i+k+1; the last k+1 positions wrapped around and have no target
            assert_logits_close(out.mtp_logits[k][:, : S - k - 1], mtp_ref[:, : S - k - 1])
