"""HazyResearch/m2 ``bert/`` checkpoints (M2-BERT, ``BertForMaskedLM`` with Monarch Mixer sequence mixing) <->
:class:`subq.models.M2BertForMaskedLM`.

A folder with m2's ``config.json`` (its ``BertConfig`` fields: ``monarch_mixer_sequence_mixing``,
``long_conv_l_max``, ``hyena_*``, ``residual_long_conv``, ``use_glu_mlp``, ``use_monarch_mlp``, ...) and a state
dict (``pytorch_model.bin`` or ``model.safetensors``; a composer ``model.`` prefix is dropped). m2's layer sends the
mixer's output straight into the GLU block (subq's ``mixer_residual=False``), and its filters' positional features
``pos_emb.z`` are trained (``hyena_lr_pos_emb > 0``), so they load into subq's ``learned_filter_features``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from subq.models.convert import (
    CheckpointError,
    build,
    checkpoint_dtype,
    load_checked,
    read_weights,
    require,
    weights_file,
    write_json,
)
from subq.nn.m2 import HyenaFilter

NAME = "m2"
DESCRIPTION = ("m2 (HazyResearch/m2 bert/ BertForMaskedLM: config.json with monarch_mixer_sequence_mixing, "
               "long_conv_l_max, hyena_* + pytorch_model.bin)")

# m2's BertConfig (and transformers.BertConfig) defaults, for fields a config.json leaves out.
M2_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, vocab_size=30522,
                   type_vocab_size=2, max_position_embeddings=512, layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
                   hidden_act="gelu", use_glu_mlp=True, use_monarch_mlp=False, monarch_mlp_nblocks=4,
                   use_positional_encodings=False, monarch_mixer_sequence_mixing=False, residual_long_conv=False,
                   bidirectional=True, hyena_w_mod=1, hyena_filter_order=64, hyena_emb_dim=3,
                   hyena_training_additions=False)
# The LayerNorm of m2's MLM head transform has this epsilon whatever layer_norm_eps says.
HEAD_NORM_EPS = 1e-12
# m2 options that only set initialisation, optimiser groups, dropout that is never applied, or which kernel runs.
IGNORED = ("hyena_w", "hyena_wd", "hyena_lr_pos_emb", "long_conv_kernel_learning_rate", "hyena_filter_dropout",
           "use_flash_mm", "use_flash_fft", "attention_probs_dropout_prob", "num_attention_heads",
           "alibi_starting_size", "pool_all", "pad_token_id")


class LearnedFeaturesHyenaFilter(HyenaFilter):
    """A :class:`HyenaFilter` whose positional features are a parameter (m2 trains them: ``pos_emb.z``) and whose
    normalized time is a stored buffer (m2's ``pos_emb.t``), both (max_seq_len, ...) and initialised to the fixed
    values HyenaFilter computes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        features, tau = super().positional_features(self.max_seq_len)
        self.features = nn.Parameter(features.to(self.fwd.decay_rates.dtype))
        self.register_buffer("tau", tau.to(self.fwd.decay_rates.dtype))

    def positional_features(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float64 if self.features.dtype == torch.float64 else torch.float32
        return self.features[:seqlen].to(dtype), self.tau[:seqlen].to(dtype)


def learn_filter_features(mixer: nn.Module, config) -> None:
    """Give an M2SequenceMixer's filter banks learned positional features (``learned_filter_features``)."""
    kwargs = dict(bidirectional=mixer.bidirectional, emb_dim=config.filter_emb_dim, order=config.filter_order)
    mixer.filter = LearnedFeaturesHyenaFilter(mixer.d_model, mixer.max_seq_len, **kwargs)
    if mixer.residual_long_conv:
        mixer.residual_filter = LearnedFeaturesHyenaFilter(mixer.d_model, mixer.max_seq_len, **kwargs)


def detect(config: dict) -> bool:
    return "model" not in config and ("monarch_mixer_sequence_mixing" in config or "long_conv_l_max" in config)


def config_from_m2(m2: dict, file: Path):
    """subq's M2BertConfig for m2's BertConfig dict; raises naming the first option subq has no equivalent for."""
    from subq.models.m2_bert import M2BertConfig

    c = {**M2_DEFAULTS, **m2}
    for name, value in (("monarch_mixer_sequence_mixing", True), ("bidirectional", True), ("use_glu_mlp", True),
                        ("hyena_training_additions", False), ("hidden_act", "gelu")):
        require(c[name] == value, file, NAME, f"{name}={c[name]!r} has no subq equivalent (M2BertForMaskedLM is "
                f"{name}={value!r})")
    require(c["layer_norm_eps"] == HEAD_NORM_EPS, file, NAME,
            f"layer_norm_eps={c['layer_norm_eps']!r}: m2's MLM head norm uses {HEAD_NORM_EPS} regardless, subq one "
            "norm_eps for every LayerNorm")
    require("long_conv_l_max" in c, file, NAME, "missing field 'long_conv_l_max' (the filters' length)")
    l_max = c["long_conv_l_max"]
    require(not c["use_positional_encodings"] or c["max_position_embeddings"] == l_max, file, NAME,
            f"max_position_embeddings={c['max_position_embeddings']} differs from long_conv_l_max={l_max}; subq "
            "uses one max_seq_len for both")
    hidden, inner = c["hidden_size"], c["intermediate_size"]
    require(inner % hidden == 0, file, NAME,
            f"intermediate_size={inner} is not a multiple of hidden_size={hidden} (subq's expansion is an integer)")
    try:
        return M2BertConfig(d_model=hidden, n_layer=c["num_hidden_layers"], expansion=inner // hidden,
                            nblocks=c["monarch_mlp_nblocks"] if c["use_monarch_mlp"] else 1,
                            filter_order=c["hyena_filter_order"], filter_emb_dim=c["hyena_emb_dim"],
                            residual_long_conv=c["residual_long_conv"], mixer_residual=False,
                            dropout=c["hidden_dropout_prob"], norm_eps=c["layer_norm_eps"],
                            vocab_size=c["vocab_size"], type_vocab_size=c["type_vocab_size"], max_seq_len=l_max,
                            learned_filter_features=True)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {NAME} config does not map onto subq's M2BertConfig: {err}") from err


# m2 name pattern -> subq name (per layer: {i}); freq, z, t, deltas, and the dense-MLP case get reshaped.
_LAYER_MAP = [
    ("attention.in_linear.", "mixer.in_proj."),
    ("attention.out_linear.", "mixer.out_proj."),
    ("attention.short_filter.", "mixer.short_conv."),
    ("attention.filter_fn.bias", "mixer.D"),
    ("attention.filter_fn2.bias", "mixer.residual_D"),
    ("attention.filter_fn.pos_emb.z", "mixer.filter.features"),
    ("attention.filter_fn.pos_emb.t", "mixer.filter.tau"),
    ("attention.filter_fn2.pos_emb.z", "mixer.residual_filter.features"),
    ("attention.filter_fn2.pos_emb.t", "mixer.residual_filter.tau"),
    ("attention.filter_fn.implicit_filter.", "mixer.filter.fwd.mlp."),
    ("attention.filter_fn.implicit_filter_rev.", "mixer.filter.rev.mlp."),
    ("attention.filter_fn2.implicit_filter.", "mixer.residual_filter.fwd.mlp."),
    ("attention.filter_fn2.implicit_filter_rev.", "mixer.residual_filter.rev.mlp."),
    ("mlp.gated_layers.", "mlp.in_proj."),
    ("mlp.wo.", "mlp.out_proj."),
    ("mlp.layernorm.", "mlp_norm."),
]
_TOP_MAP = [
    ("bert.embeddings.word_embeddings.", "bert.word_embeddings."),
    ("bert.embeddings.position_embeddings.", "bert.position_embeddings."),
    ("bert.embeddings.token_type_embeddings.", "bert.token_type_embeddings."),
    ("bert.embeddings.LayerNorm.", "bert.embedding_norm."),
    ("cls.predictions.transform.dense.", "head_transform."),
    ("cls.predictions.transform.LayerNorm.", "head_norm."),
    ("cls.predictions.decoder.", "decoder."),
]
_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.*)$")
_SUBQ_LAYER = re.compile(r"^bert\.encoder\.layers\.(\d+)\.(.*)$")
# The modulation's decay rates are fixed (m2 registers them with lr 0): checked, then copied (load_decay_rates).
_DELTAS = re.compile(r"^bert\.encoder\.layer\.(\d+)\.attention\.(filter_fn2?)\.modulation\.deltas$")


def key_from_m2(name: str) -> str | None:
    """subq's name for an m2 state-dict key (None for the ones that carry no weights of their own)."""
    if name == "bert.embeddings.position_ids" or _DELTAS.match(name):
        return None
    match = _LAYER.match(name)
    if match:
        index, rest = match.groups()
        for theirs, ours in _LAYER_MAP:
            if rest.startswith(theirs):
                return f"bert.encoder.layers.{index}.{ours}{rest[len(theirs):]}"
        return name
    for theirs, ours in _TOP_MAP:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return name


def key_to_m2(name: str) -> str:
    match = _SUBQ_LAYER.match(name)
    if match:
        index, rest = match.groups()
        for theirs, ours in _LAYER_MAP:    # no prefix in the map starts another, on either side
            if rest.startswith(ours):
                return f"bert.encoder.layer.{index}.{theirs}{rest[len(ours):]}"
        return name
    for theirs, ours in _TOP_MAP:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def state_dict_from_m2(theirs: dict[str, torch.Tensor], m2_config: dict, file: Path,
                       model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """subq tensors (and subq name -> m2 name, for messages) from an m2 state dict."""
    c = {**M2_DEFAULTS, **m2_config}
    w_mod = c["hyena_w_mod"]
    theirs = {k.removeprefix("model."): v for k, v in theirs.items()}
    ours, names = {}, {}
    for name, tensor in theirs.items():
        key = key_from_m2(name)
        if key is None:
            continue
        if key.endswith(".freq"):
            tensor = w_mod * tensor.reshape(-1)         # sin(w_mod * freq * x): w_mod folds into the frequency
        elif key.endswith(".features"):
            tensor = tensor.reshape(tensor.shape[-2], tensor.shape[-1])
        elif key.endswith(".tau"):
            tensor = tensor.reshape(-1)
        elif re.search(r"\.mlp\.(in|out)_proj\.weight$", key) and tensor.dim() == 2:
            tensor = tensor[None]                       # use_monarch_mlp=False: m2's nn.Linear, one block
        ours[key], names[key] = tensor, name
    if "cls.predictions.decoder.weight" in theirs:
        require(torch.equal(theirs["cls.predictions.decoder.weight"],
                            theirs.get("bert.embeddings.word_embeddings.weight", torch.empty(0))), file, NAME,
                "cls.predictions.decoder.weight differs from bert.embeddings.word_embeddings.weight; subq ties them")
        del ours["decoder.weight"]
    if not c["use_positional_encodings"]:
        require("bert.position_embeddings.weight" not in ours, file, NAME,
                "use_positional_encodings=False, yet bert.embeddings.position_embeddings.weight is present")
        # no positions in m2: subq's table, all zeros, adds nothing
        ours["bert.position_embeddings.weight"] = torch.zeros_like(model.bert.position_embeddings.weight)
    return ours, names


def load_decay_rates(model: nn.Module, theirs: dict[str, torch.Tensor], file: Path) -> None:
    """m2's fixed ``modulation.deltas`` into subq's (unsaved) decay rates, after checking they are the ones subq
    computes itself, so that a model saved in subq's format and loaded back stays the same (to float32 rounding)."""
    for name, tensor in theirs.items():
        match = _DELTAS.match(name.removeprefix("model."))
        if not match:
            continue
        layer = int(match.group(1))
        require(layer < len(model.bert.encoder.layers), file, NAME, f"unexpected key {name!r}")
        mixer = model.bert.encoder.layers[layer].mixer
        filt = getattr(mixer, "filter" if match.group(2) == "filter_fn" else "residual_filter", None)
        require(filt is not None, file, NAME, f"unexpected key {name!r}")
        rates = tensor.reshape(-1)
        require(rates.numel() == filt.fwd.decay_rates.numel() and torch.allclose(
            rates.double(), filt.fwd.decay_rates.double(), rtol=1e-6, atol=0), file, NAME,
            f"{name} differs from the fixed decay rates subq computes (fast_decay_pct 0.3, slow_decay_pct 1.5, "
            "target 1e-2)")
        for bank in (filt.fwd, filt.rev):   # m2 shares one modulation between the two banks
            if bank is not None:
                bank.decay_rates.copy_(rates)


def load(model_cls, path: Path, config: dict, device):
    from subq.models.m2_bert import M2BertForMaskedLM

    file = path / "config.json"
    if not issubclass(model_cls, M2BertForMaskedLM):
        raise CheckpointError(f"{file}: an {NAME} checkpoint loads into M2BertForMaskedLM, not {model_cls.__name__}")
    model = build(model_cls, config_from_m2(config, file), file, NAME)
    weights = weights_file(path, NAME)
    theirs = read_weights(weights)
    ours, names = state_dict_from_m2(theirs, config, weights, model)
    dtype = checkpoint_dtype(theirs)  # of the file itself: `ours` may hold subq-only tensors (a zero position table)
    if dtype is not None:
        model = model.to(dtype)
    names |= {k: key_to_m2(k) for k in model.state_dict() if k not in names}
    load_checked(model, ours, weights, NAME, names)
    with torch.no_grad():
        load_decay_rates(model, theirs, weights)
    return model.to(device)


def config_to_m2(config) -> dict:
    if config.mixer_residual:
        raise ValueError("mixer_residual=True (residual + LayerNorm around the sequence mixer) has no m2 "
                         "equivalent; this model cannot be saved in the m2 format")
    if config.norm_eps != HEAD_NORM_EPS:
        raise ValueError(f"norm_eps={config.norm_eps}: m2's MLM head norm has eps {HEAD_NORM_EPS} fixed")
    return {"architectures": ["BertForMaskedLM"], "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layer, "intermediate_size": config.expansion * config.d_model,
            "vocab_size": config.vocab_size, "type_vocab_size": config.type_vocab_size,
            "max_position_embeddings": config.max_seq_len, "long_conv_l_max": config.max_seq_len,
            "layer_norm_eps": config.norm_eps, "hidden_dropout_prob": config.dropout, "hidden_act": "gelu",
            "monarch_mixer_sequence_mixing": True, "bidirectional": True, "residual_long_conv":
            config.residual_long_conv, "use_glu_mlp": True, "use_monarch_mlp": config.nblocks > 1,
            "monarch_mlp_nblocks": config.nblocks, "use_positional_encodings": True,
            "hyena_filter_order": config.filter_order, "hyena_emb_dim": config.filter_emb_dim, "hyena_w_mod": 1,
            "hyena_training_additions": False}


def state_dict_to_m2(model) -> dict[str, torch.Tensor]:
    """m2's state dict for an M2BertForMaskedLM (with learned_filter_features: m2's pos_emb.z is a parameter)."""
    if not model.config.learned_filter_features:
        raise ValueError("m2 stores its filters' positional features (pos_emb.z); save a model built with "
                         "learned_filter_features=True")
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().clone()
        key = key_to_m2(name)
        if name.endswith(".freq"):
            tensor = tensor.reshape(1, -1)
        elif name.endswith(".features"):
            tensor = tensor[None]
        elif name.endswith(".tau"):
            tensor = tensor.reshape(1, -1, 1)
        elif re.search(r"\.mlp\.(in|out)_proj\.weight$", name) and tensor.shape[0] == 1:
            tensor = tensor[0]                       # nblocks = 1: m2's plain nn.Linear
        state[key] = tensor
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    for i, layer in enumerate(model.bert.encoder.layers):
        mixer = layer.mixer
        for ours, theirs in (("filter", "filter_fn"), ("residual_filter", "filter_fn2")):
            if not hasattr(mixer, ours):
                continue
            filt = getattr(mixer, ours)
            prefix = f"bert.encoder.layer.{i}.attention.{theirs}."
            state[prefix + "modulation.deltas"] = filt.fwd.decay_rates.detach().cpu().reshape(1, 1, -1).clone()
            # m2 shares one Sin module (one frequency) across all activations of a filter bank pair
            freqs = [m.freq for bank in (filt.fwd, filt.rev) if bank is not None for m in bank.mlp
                     if hasattr(m, "freq")]
            if not all(torch.equal(f, freqs[0]) for f in freqs):
                raise ValueError(f"layer {i} {ours}: m2 shares one sine frequency across its filter's activations; "
                                 "this model's differ, so it cannot be saved in the m2 format")
    return state


def save(model, path: Path) -> Path:
    """Write m2's ``config.json`` and ``pytorch_model.bin`` (``BertForMaskedLM.from_composer`` takes the bin)."""
    config = config_to_m2(model.config)
    state = state_dict_to_m2(model)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", config)
    torch.save(state, path / "pytorch_model.bin")
    return path
