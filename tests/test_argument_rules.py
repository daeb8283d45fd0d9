"""One rule per kind of scalar argument across every public op and layer (subq._utils): a flag is a bool (numpy's
too), an integer anything integral but a bool, a real any real number but a bool. An outside fuzz found
``causal="False"`` running causal, ``return_final_states="no"`` returning states, and numpy numbers taken by one
op and refused by its sibling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from subq._utils import ArgumentTypeError
from subq.nn import FLASH, GAU, M2SequenceMixer, Mamba2, MonarchLinear, RMSNormGated
from subq.ops import (
    causal_conv1d,
    flash_chunk_attention,
    gau_attention,
    monarch_conv_filter,
    rmsnorm_gated,
    ssd_chunk_scan,
    ssd_step,
)
from subq.ops.monarch_conv import fft_size


def _ssd_args():
    b, seqlen, h, p, n = 1, 8, 2, 4, 4
    return dict(x=torch.randn(b, seqlen, h, p), dt=torch.rand(b, seqlen, h), A=-torch.rand(h),
                B=torch.randn(b, seqlen, 1, n), C=torch.randn(b, seqlen, 1, n), chunk_size=64)


def _step_args():
    return dict(state=torch.zeros(1, 2, 4, 4), x=torch.randn(1, 2, 4), dt=torch.rand(1, 2), A=-torch.rand(2),
                B=torch.randn(1, 1, 4), C=torch.randn(1, 1, 4))


def _flash_args():
    return {name: torch.randn(1, 8, 4) for name in ("q_quad", "k_quad", "q_lin", "k_lin")} | {
        "v": torch.randn(1, 8, 3), "chunk_size": 64}


# (what, a call taking the flag's value): ops first, then layer constructors.
FLAGS = [
    ("flash_chunk_attention causal", lambda f: flash_chunk_attention(**_flash_args(), causal=f)),
    ("gau_attention causal", lambda f: gau_attention(torch.randn(1, 8, 4), torch.randn(1, 8, 4),
                                                     torch.randn(1, 8, 3), causal=f)),
    ("causal_conv1d return_final_states", lambda f: causal_conv1d(torch.randn(1, 4, 8), torch.randn(4, 3),
                                                                  return_final_states=f)),
    ("ssd_chunk_scan dt_softplus", lambda f: ssd_chunk_scan(**_ssd_args(), dt_softplus=f)),
    ("ssd_chunk_scan return_final_states", lambda f: ssd_chunk_scan(**_ssd_args(), return_final_states=f)),
    ("ssd_step dt_softplus", lambda f: ssd_step(**_step_args(), dt_softplus=f)),
    ("rmsnorm_gated norm_before_gate", lambda f: rmsnorm_gated(torch.randn(2, 4), torch.ones(4), torch.randn(2, 4),
                                                               norm_before_gate=f)),
    ("FLASH causal", lambda f: FLASH(16, chunk_size=64, s=8, causal=f)),
    ("GAU rope", lambda f: GAU(16, s=8, rope=f)),
    ("Mamba2 rmsnorm", lambda f: Mamba2(16, d_state=4, headdim=8, rmsnorm=f)),
    ("RMSNormGated norm_before_gate", lambda f: RMSNormGated(8, norm_before_gate=f)),
    ("MonarchLinear bias", lambda f: MonarchLinear(8, 8, nblocks=2, bias=f)),
    ("M2SequenceMixer bidirectional", lambda f: M2SequenceMixer(8, 16, bidirectional=f)),
]


@pytest.mark.parametrize("what, call", FLAGS, ids=[f[0] for f in FLAGS])
def test_flags_are_bools(what, call):
    name = what.split()[-1]
    for bad in ("False", "no", None, 0, 1, 1.0, torch.tensor(True)):
        with pytest.raises(TypeError, match=f"{name} must be a bool \\(True or False\\), got"):
            call(bad)
    with pytest.raises(ValueError):  # the kind-of-argument error is a ValueError too, as the checks raised before
        call("False")
    call(True)
    call(np.bool_(False))


def test_integers_take_any_integral_but_bool():
    k = torch.randn(2, 10)
    assert torch.equal(monarch_conv_filter(k, np.int64(16)), monarch_conv_filter(k, 16))  # fft_size took it, this not
    assert fft_size(np.int32(16)) == fft_size(torch.tensor(16)) == fft_size(16)
    x, w = torch.randn(3, 8), torch.ones(8)
    assert torch.equal(rmsnorm_gated(x, w, group_size=np.int64(4)), rmsnorm_gated(x, w, group_size=4))
    args = _ssd_args()
    assert torch.equal(ssd_chunk_scan(**args | {"chunk_size": np.int64(64)}), ssd_chunk_scan(**args))
    for bad in (16.0, True, "16"):
        with pytest.raises(ArgumentTypeError, match="seqlen must be an int, got"):
            monarch_conv_filter(k, bad)


def test_reals_take_any_real_but_bool():
    x, w = torch.randn(3, 8), torch.ones(8)
    assert torch.equal(rmsnorm_gated(x, w, eps=np.float32(1e-5)), rmsnorm_gated(x, w, eps=float(np.float32(1e-5))))
    limit = (np.float32(0.01), np.float64(0.5))  # ssd_chunk_scan took these and ssd_step refused them
    assert ssd_chunk_scan(**_ssd_args(), dt_limit=limit).isfinite().all()
    assert ssd_step(**_step_args(), dt_limit=limit).isfinite().all()
    args = _flash_args()
    assert torch.equal(flash_chunk_attention(**args, quad_scale=np.float32(0.5)),
                       flash_chunk_attention(**args, quad_scale=float(np.float32(0.5))))
    for bad in ("x", True, None):
        with pytest.raises(ArgumentTypeError, match="dt_limit\\[i\\] must be a real number"):
            ssd_chunk_scan(**_ssd_args(), dt_limit=(0.0, bad))
    with pytest.raises(ValueError, match="quad_scale must be a finite real number, got inf"):
        flash_chunk_attention(**args, quad_scale=math.inf)
