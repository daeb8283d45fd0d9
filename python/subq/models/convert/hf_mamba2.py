"""Hugging Face ``transformers`` Mamba-2 (``Mamba2ForCausalLM``) checkpoints <-> :class:`subq.models.Mamba2LM`.

The layers compute the same function once conventions line up: HF's gated norm is ``norm(x * silu(z))`` over
``n_groups`` groups (subq: ``norm_before_gate=False``, group size ``d_inner / ngroups``), ``D`` is per head, one
``layer_norm_epsilon`` serves every norm, and ``time_step_limit`` clamps dt after the softplus (subq's ``dt_limit``).
Tensor names differ only by the ``backbone.`` prefix and HF's ``embeddings`` (older files: ``embedding``).
"""

from __future__ import annotations

import math
from pathlib import Path

from subq.models.convert import (
    CheckpointError,
    build,
    load_checked,
    read_weights,
    require,
    weights_file,
    write_json,
)

NAME = "hf"
DESCRIPTION = "hf (transformers Mamba2ForCausalLM: config.json with model_type 'mamba2')"

# transformers.Mamba2Config's defaults: its save_pretrained writes only the fields that differ from them.
HF_DEFAULTS = dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                   num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8,
                   use_bias=False, use_conv_bias=True, hidden_act="silu", residual_in_fp32=True,
                   time_step_limit=(0.0, math.inf), chunk_size=256, tie_word_embeddings=False)

# HF field -> subq Mamba2Config field, where the two are the same quantity.
CONFIG_MAP = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
              "state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "head_dim": "headdim",
              "n_groups": "ngroups", "chunk_size": "chunk_size", "layer_norm_epsilon": "norm_eps",
              "use_bias": "bias", "use_conv_bias": "conv_bias", "time_step_limit": "dt_limit",
              "tie_word_embeddings": "tie_embeddings"}


def detect(config: dict) -> bool:
    return config.get("model_type") == "mamba2"


def config_from_hf(hf: dict, file: Path):
    """subq's Mamba2Config for a transformers Mamba2Config dict (missing fields take HF's defaults)."""
    from subq.models.mamba2_lm import Mamba2Config

    hf = {**HF_DEFAULTS, **hf}
    require(hf["hidden_act"] in ("silu", "swish"), file, NAME,
            f"hidden_act={hf['hidden_act']!r}; subq's Mamba-2 conv activation is SiLU only")
    fields = {ours: hf[theirs] for theirs, ours in CONFIG_MAP.items()}
    expand = fields["expand"]
    require(float(expand).is_integer(), file, NAME, f"expand={expand!r}; subq's Mamba2Config takes an integer expand")
    fields["expand"] = int(expand)
    d_inner = fields["expand"] * fields["d_model"]
    require(hf["num_heads"] * hf["head_dim"] == d_inner, file, NAME,
            f"num_heads={hf['num_heads']} * head_dim={hf['head_dim']} must equal expand * hidden_size = {d_inner}")
    fields["dt_limit"] = tuple(json_float(v) for v in fields["dt_limit"])
    # HF's gated norm inside the mixer uses the same epsilon as the block norms.
    fields["mixer_norm_eps"] = fields["norm_eps"]
    try:
        return Mamba2Config(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {NAME} config does not map onto subq's Mamba2Config: {err}") from err


def json_float(value) -> float:
    """A float from config.json; transformers 5 writes infinities as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def key_from_hf(name: str) -> str:
    if name in ("backbone.embeddings.weight", "backbone.embedding.weight"):
        return "embedding.weight"
    return name.removeprefix("backbone.")


def key_to_hf(name: str) -> str:
    if name == "embedding.weight":
        return "backbone.embeddings.weight"
    return name if name.startswith("lm_head.") else "backbone." + name


def load(model_cls, path: Path, config: dict, device):
    from subq.models.mamba2_lm import Mamba2LM

    file = path / "config.json"
    if not issubclass(model_cls, Mamba2LM):
        raise CheckpointError(f"{file}: a {NAME} Mamba-2 checkpoint loads into Mamba2LM, not {model_cls.__name__}")
    model = build(model_cls, config_from_hf(config, file), file, NAME)
    weights = weights_file(path, NAME)
    theirs = read_weights(weights)
    ours = {key_from_hf(k): v for k, v in theirs.items()}
    names = {key_from_hf(k): k for k in theirs} | {k: key_to_hf(k) for k in model.state_dict() if k not in ours}
    return load_checked(model, ours, weights, NAME, names).to(device)


def config_to_hf(config) -> dict:
    """A transformers Mamba2Config dict for subq's Mamba2Config; raises for options HF's Mamba-2 does not have."""
    unsupported = {"rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False, "attn_layer_idx": ()}
    for name, value in unsupported.items():
        if getattr(config, name) != value:
            raise ValueError(f"transformers' Mamba2 has no equivalent of {name}={getattr(config, name)!r} (it has "
                             f"{name}={value!r} only); this model cannot be saved in the {NAME} format")
    if config.mixer_norm_eps != config.norm_eps:
        raise ValueError(f"transformers' Mamba2 uses one layer_norm_epsilon for every norm; this model has norm_eps="
                         f"{config.norm_eps} and mixer_norm_eps={config.mixer_norm_eps}")
    hf = {theirs: getattr(config, ours) for theirs, ours in CONFIG_MAP.items()}
    hf["time_step_limit"] = list(config.dt_limit)
    hf["num_heads"] = config.expand * config.d_model // config.headdim
    return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **hf, "hidden_act": "silu",
            # subq keeps the residual stream in the model's dtype: the same function as HF with this False.
            "residual_in_fp32": False, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def save(model, path: Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``transformers.Mamba2ForCausalLM.from_pretrained``
    loads (a tied head is stored once, under the embedding's name, as transformers does)."""
    from safetensors.torch import save_file

    hf = config_to_hf(model.config)
    path.mkdir(parents=True, exist_ok=True)
    state = {key_to_hf(k): v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    write_json(path / "config.json", hf)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path

