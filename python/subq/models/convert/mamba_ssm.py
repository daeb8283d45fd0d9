"""state-spaces/mamba (``mamba_ssm``) Mamba-2 checkpoints <-> :class:`subq.models.Mamba2LM`.

``MambaLMHeadModel.save_pretrained`` writes ``config.json`` (``MambaConfig``: d_model, n_layer, vocab_size, ssm_cfg,
rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple, tie_embeddings, ...) and ``pytorch_model.bin``
with ``backbone.embedding.weight``, ``backbone.layers.N.{norm,mixer.*}``, ``backbone.norm_f.weight`` and
``lm_head.weight``. subq's Mamba-2 layer keeps mamba_ssm's parameter names, so only the ``backbone.`` prefix moves;
the embedding is stored at the padded vocabulary size, which becomes subq's ``vocab_size``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from subq.models.convert import (
    CheckpointError,
    build,
    load_checked,
    read_weights,
    require,
    write_json,
)

NAME = "mamba_ssm"
DESCRIPTION = "mamba_ssm (MambaLMHeadModel: config.json with d_model, n_layer, ssm_cfg + pytorch_model.bin)"

# ssm_cfg entries that carry over unchanged (mamba_ssm's Mamba2 keyword = subq's Mamba2Config field).
SSM_FIELDS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256,
              "rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False, "dt_limit": (0.0, math.inf),
              "bias": False, "conv_bias": True}
# ssm_cfg entries that only shape initialisation, the kernels' memory use or sharding: the function is the same.
SSM_IGNORED = {"layer", "A_init_range", "dt_min", "dt_max", "dt_init_floor", "conv_init", "use_mem_eff_path",
               "sequence_parallel", "process_group", "d_ssm", "learnable_init_states", "activation"}
# mamba_ssm's MixerModel norm epsilon (not in its config) and its Mamba2 gated-norm epsilon.
NORM_EPS = 1e-5


def detect(config: dict) -> bool:
    return "model" not in config and "model_type" not in config and {"d_model", "n_layer"} <= config.keys()


def padded_vocab(vocab_size: int, multiple: int) -> int:
    return vocab_size if multiple <= 1 else math.ceil(vocab_size / multiple) * multiple


def config_from_mamba_ssm(cfg: dict, file: Path):
    from subq.models.mamba2_lm import Mamba2Config

    ssm = dict(cfg.get("ssm_cfg") or {})
    require(ssm.get("layer") == "Mamba2", file, NAME,
            f"ssm_cfg.layer={ssm.get('layer', 'Mamba1 (the default)')!r}; subq loads Mamba-2 layers only")
    unknown = sorted(set(ssm) - set(SSM_FIELDS) - SSM_IGNORED)
    require(not unknown, file, NAME, f"ssm_cfg.{unknown[0] if unknown else ''} has no subq equivalent")
    d_model = cfg["d_model"]
    expand = ssm.get("expand", SSM_FIELDS["expand"])
    require(ssm.get("d_ssm") in (None, expand * d_model), file, NAME,
            f"ssm_cfg.d_ssm={ssm.get('d_ssm')!r}: a gated MLP beside the SSM (d_ssm < expand * d_model) has no "
            "subq equivalent")
    require(not ssm.get("learnable_init_states", False), file, NAME,
            "ssm_cfg.learnable_init_states=True has no subq equivalent")
    require(ssm.get("activation", "swish") in ("swish", "silu"), file, NAME,
            f"ssm_cfg.activation={ssm.get('activation')!r}; subq's conv activation is SiLU only")
    require(cfg.get("rms_norm", True), file, NAME, "rms_norm=False (LayerNorm blocks) has no subq equivalent")
    require(cfg.get("d_intermediate", 0) == 0, file, NAME,
            f"d_intermediate={cfg.get('d_intermediate')} (an MLP after each mixer) has no subq equivalent")
    require(not cfg.get("attn_layer_idx"), file, NAME,
            f"attn_layer_idx={cfg.get('attn_layer_idx')}: mamba_ssm's attention layers (MHA, its own rotary "
            "and bias options) are not converted")
    fields = {name: ssm.get(name, default) for name, default in SSM_FIELDS.items()}
    fields["dt_limit"] = tuple(float(v) for v in fields["dt_limit"])
    vocab = padded_vocab(cfg.get("vocab_size", 50277), cfg.get("pad_vocab_size_multiple", 8))
    try:
        return Mamba2Config(d_model=d_model, n_layer=cfg["n_layer"], vocab_size=vocab,
                            tie_embeddings=cfg.get("tie_embeddings", True), norm_eps=NORM_EPS,
                            mixer_norm_eps=NORM_EPS, **fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {NAME} config does not map onto subq's Mamba2Config: {err}") from err


def key_from_mamba_ssm(name: str) -> str:
    return name.removeprefix("backbone.")


def key_to_mamba_ssm(name: str) -> str:
    return name if name.startswith("lm_head.") else "backbone." + name


def load(model_cls, path: Path, config: dict, device):
    from subq.models.convert import weights_file
    from subq.models.mamba2_lm import Mamba2LM

    file = path / "config.json"
    if not issubclass(model_cls, Mamba2LM):
        raise CheckpointError(f"{file}: a {NAME} Mamba-2 checkpoint loads into Mamba2LM, not {model_cls.__name__}")
    model = build(model_cls, config_from_mamba_ssm(config, file), file, NAME)
    weights = weights_file(path, NAME)
    theirs = read_weights(weights)
    ours = {key_from_mamba_ssm(k): v for k, v in theirs.items()}
    names = {key_from_mamba_ssm(k): k for k in theirs} | {
        k: key_to_mamba_ssm(k) for k in model.state_dict() if k not in ours}
    return load_checked(model, ours, weights, NAME, names).to(device)


def config_to_mamba_ssm(config) -> dict:
    if config.attn_layer_idx:
        raise ValueError(f"attn_layer_idx={config.attn_layer_idx}: subq's attention layers are not converted to "
                         f"mamba_ssm's MHA; this model cannot be saved in the {NAME} format")
    for name in ("norm_eps", "mixer_norm_eps"):
        if getattr(config, name) != NORM_EPS:
            raise ValueError(f"mamba_ssm's norms use eps={NORM_EPS}; this model has {name}={getattr(config, name)}")
    ssm = {"layer": "Mamba2", **{name: getattr(config, name) for name in SSM_FIELDS}}
    ssm["dt_limit"] = list(config.dt_limit)
    return {"d_model": config.d_model, "d_intermediate": 0, "n_layer": config.n_layer,
            "vocab_size": config.vocab_size, "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
            "residual_in_fp32": False, "fused_add_norm": False, "pad_vocab_size_multiple": 1,
            "tie_embeddings": config.tie_embeddings}


def save(model, path: Path) -> Path:
    """Write ``config.json`` and ``pytorch_model.bin`` as ``MambaLMHeadModel.save_pretrained`` does."""
    cfg = config_to_mamba_ssm(model.config)
    path.mkdir(parents=True, exist_ok=True)
    state = {key_to_mamba_ssm(k): v.detach().cpu().clone() for k, v in model.state_dict().items()}
    write_json(path / "config.json", cfg)
    torch.save(state, path / "pytorch_model.bin")
    return path
