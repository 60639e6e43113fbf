"""DeepSeek-V4 checkpoints → the MLX model's parameters.

Two layouts arrive here:

* DeepSeek's own (``embed.weight``, ``layers.N.attn.wq_a.weight`` + ``.scale``,
  ``layers.N.ffn.experts.E.w1.weight``, ``mtp.0.*``): renamed to the MLX
  module tree; FP8 e4m3 weights with one E8M0 scale per 128x128 block become
  ``mxfp8`` layers (the block scale repeated over its rows and its four groups
  of 32), FP4 e2m1 experts with one E8M0 scale per 32 inputs become ``mxfp4``
  layers. Only bytes are re-viewed; no weight is dequantised.
* MLX-format conversions (``model.layers.N...``, ``lm_head``), which already
  use the module names and mlx-lm's quantization metadata.
* The mlx-community ``deepseek-ai-DeepSeek-V4-Flash-*bit`` conversions (another
  converter): DeepSeek's names holding MLX affine triplets (``X.weight`` packed,
  ``X.scales``, ``X.biases``), routed experts already stacked as
  ``ffn.experts.w{1,2,3}.*`` and ``attn.wo_a`` cut per output group as
  ``attn.wo_a.{g}.*``. Renamed (tables below) and then read as an MLX conversion.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..host.errors import CheckpointError

# Official top-level names → MLX names.
TOP_LEVEL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
    "hc_head_fn": "model.hc_head.fn",
    "hc_head_base": "model.hc_head.base",
    "hc_head_scale": "model.hc_head.scale",
}

# Renames inside a layer or an MTP block (applied to the part after the prefix).
INNER = (
    (re.compile(r"^hc_(attn|ffn)_(fn|base|scale)$"), r"\1_hc.\2"),
    (re.compile(r"^hc_head_(fn|base|scale)$"), r"hc_head.\1"),
    (re.compile(r"^ffn\.gate\.bias$"), "ffn.gate.e_score_correction_bias"),
    (re.compile(r"^ffn\.shared_experts\.w1\."), "ffn.shared_experts.gate_proj."),
    (re.compile(r"^ffn\.shared_experts\.w3\."), "ffn.shared_experts.up_proj."),
    (re.compile(r"^ffn\.shared_experts\.w2\."), "ffn.shared_experts.down_proj."),
)

# Routed experts are stacked into one SwitchLinear per projection.
EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")
EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
PREFIX = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")

# mlx-community "deepseek-ai-" layout: names beyond the official ones above.
COMMUNITY_TOP = {"embed.": "model.embed_tokens.", "head.": "lm_head."}
COMMUNITY_INNER = tuple(
    (re.compile(rf"^ffn\.experts\.{w}\."), f"ffn.switch_mlp.{proj}.")
    for w, proj in EXPERT_PROJ.items()
)
# wo_a of output group g (all groups are concatenated along the output rows)
COMMUNITY_GROUP = re.compile(r"^(.*\.attn\.wo_a)\.(\d+)\.(weight|scales|biases)$")
QUANT_PARTS = (".scales", ".biases")  # MLX affine; DeepSeek's own scale is ".scale"

LAYOUTS = (
    "supported layouts: DeepSeek's official one (X.weight FP8/FP4 codes + X.scale E8M0); "
    "MLX conversions with mlx-lm names (model.layers.N..., switch_mlp, lm_head); "
    "the mlx-community deepseek-ai-DeepSeek-V4-Flash-* one (official names with "
    "X.weight/X.scales/X.biases, experts stacked as ffn.experts.w1/w2/w3, "
    "wo_a split as attn.wo_a.G)"
)

FP8_BLOCK = 128
MX_GROUP = 32


def is_official(weights: Dict[str, mx.array]) -> bool:
    return any(
        k.startswith(("layers.", "embed.", "mtp.", "head.")) or k in TOP_LEVEL for k in weights
    )


def _rename(key: str) -> Tuple[str, Optional[Tuple[str, int, str, str]]]:
    """MLX name of an official key, or the expert slot it belongs to."""
    if key in TOP_LEVEL:
        return TOP_LEVEL[key], None
    m = PREFIX.match(key)
    if not m:
        return key, None
    kind, idx, rest = m.groups()
    prefix = f"model.{kind}.{idx}."
    e = EXPERT.match(rest)
    if e:
        expert, proj, what = e.groups()
        return "", (prefix + f"ffn.switch_mlp.{EXPERT_PROJ[proj]}", int(expert), what, key)
    for pattern, repl in INNER:
        rest = pattern.sub(repl, rest)
    return prefix + rest, None


def _fp8_to_mxfp8(name, w, s, out_dim, in_dim):
    if w.dtype not in (mx.uint8, mx.int8) or w.shape != (out_dim, in_dim):
        raise CheckpointError(
            name,
            f"expected FP8 e4m3 weight of shape ({out_dim}, {in_dim}), "
            f"found {w.dtype} {tuple(w.shape)}",
        )
    grid = (-(-out_dim // FP8_BLOCK), -(-in_dim // FP8_BLOCK))
    if s.shape != grid or s.dtype != mx.uint8:
        raise CheckpointError(
            _scale_key(name),
            f"expected E8M0 block scales of shape {grid} (one per "
            f"{FP8_BLOCK}x{FP8_BLOCK} block), found {s.dtype} {tuple(s.shape)}",
        )
    if in_dim % MX_GROUP:
        raise CheckpointError(name, f"input width {in_dim} is not a multiple of 32")
    per_block = FP8_BLOCK // MX_GROUP
    scales = mx.repeat(mx.repeat(s, FP8_BLOCK, 0), per_block, 1)
    scales = scales[:out_dim, : in_dim // MX_GROUP]
    return w.view(mx.uint8).view(mx.uint32), scales, 8


def _fp4_to_mxfp4(name, w, s, out_dim, in_dim):
    if w.dtype not in (mx.uint8, mx.int8) or w.shape != (out_dim, in_dim // 2):
        raise CheckpointError(
            name,
            f"expected FP4 e2m1 weight packed two per byte, shape "
            f"({out_dim}, {in_dim // 2}), found {w.dtype} {tuple(w.shape)}",
        )
    want = (out_dim, in_dim // MX_GROUP)
    if s.shape != want or s.dtype != mx.uint8:
        raise CheckpointError(
            _scale_key(name),
            f"expected E8M0 scales of shape {want} (one per 32 inputs), "
            f"found {s.dtype} {tuple(s.shape)}",
        )
    # Low nibble = even column in both layouts; code 8 (-0) is zero in mxfp4.
    return w.view(mx.uint8).view(mx.uint32), s, 4


_BLOCK = re.compile(r"^(model\.(?:layers|mtp)\.\d+)\.")


def _block(key: str):
    m = _BLOCK.match(key)
    return m.group(1) if m else None


def _distributed() -> bool:
    try:
        return mx.distributed.is_available() and mx.distributed.init().size() > 1
    except Exception:
        return False


def _logical_shapes(model) -> Dict[str, Tuple[int, ...]]:
    return {k: v.shape for k, v in tree_flatten(model.parameters())}


def _scale_key(weight_key: str) -> Optional[str]:
    """The official E8M0 scale beside ``X.weight`` is ``X.scale``."""
    if not weight_key.endswith(".weight"):
        return None
    return weight_key[: -len("weight")] + "scale"


def _weight_key(scale_key: str) -> str:
    return scale_key[: -len("scale")] + "weight"


def _needs_scales(key: str, w: mx.array) -> CheckpointError:
    """FP8/FP4 codes arrived without the scale that gives them a value."""
    return CheckpointError(
        _scale_key(key) or key,
        f"missing: {key} holds {w.dtype} FP8/FP4 codes that need their E8M0 scales",
    )


def _is_codes(w: mx.array) -> bool:
    return w.dtype in (mx.uint8, mx.int8)


class _Official:
    """State of one official-layout conversion: the model's logical shapes,
    the renamed tensors (``out``), routed experts waiting to be stacked and
    the bits of every layer that arrived packed."""

    def __init__(self, model, weights):
        self.args = model.args
        self.weights = weights
        self.shapes = _logical_shapes(model)
        self.qcfg = getattr(self.args, "quantization_config", None) or {}
        self.keep_mtp = _has_mtp(weights) and self.args.num_nextn_predict_layers > 0
        self.out: Dict[str, mx.array] = {}
        self.experts: Dict[str, Dict[int, Tuple[str, mx.array, Optional[mx.array]]]] = {}
        self.quant_bits: Dict[str, int] = {}


def _has_mtp(weights) -> bool:
    return any(k.startswith(("mtp.", "model.mtp.")) for k in weights)


def sanitize_weights(model, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    if not _has_mtp(weights):
        # Conversions usually drop the MTP block; the model then has none.
        model.model.mtp = []
    if not is_official(weights):
        return _sanitize_mlx(model, weights)
    if any(k.endswith(QUANT_PARTS) for k in weights):
        return _sanitize_mlx(model, _community_to_mlx(model, weights))

    st = _Official(model, weights)
    for key, (new, slot) in _renamed(weights).items():
        _place(st, key, new, slot)
    _stack_experts(st)
    _check_complete(st)

    model._official_packed = bool(st.quant_bits)
    _quantize_packed(model, st.out)
    return st.out


# -- phase 1: names ------------------------------------------------------------


def _renamed(weights):
    """Official key -> (MLX name, expert slot); ``.scale`` keys travel with
    their weight, so they only need that weight to exist."""
    names = {}
    for key in weights:
        if key.endswith(".scale"):
            if _weight_key(key) not in weights:
                raise CheckpointError(
                    _weight_key(key), "missing from the checkpoint (its .scale is there)"
                )
            continue
        names[key] = _rename(key)
    return names


# -- phase 2: one tensor each ----------------------------------------------------


def _place(st: _Official, key, new, slot):
    """Put one official tensor where the model wants it (experts are only
    collected here; they are stacked once all have been seen)."""
    w = st.weights[key]
    target = slot[0] + ".weight" if slot is not None else new
    if target not in st.shapes:
        if target.startswith("model.mtp.") and not st.keep_mtp:
            return  # MTP weights of a config without MTP layers
        raise CheckpointError(key, f"unexpected tensor: this config's model has no {target!r}")
    if slot is not None:
        base, e, _, orig = slot
        st.experts.setdefault(base, {})[e] = (orig, w, st.weights.get(_scale_key(orig)))
        return
    want = st.shapes[new]
    scale_key = _scale_key(key)
    if scale_key in st.weights:
        _place_fp8(st, key, new, want, st.weights[scale_key])
        return
    if _is_codes(w) and len(want) >= 2:
        raise _needs_scales(key, w)
    if len(want) == 3 and w.ndim == 2 and w.size == math.prod(want):
        w = w.reshape(want)  # grouped wo_a stored flat
    if tuple(w.shape) != tuple(want):
        raise CheckpointError(key, f"expected shape {tuple(want)}, found {tuple(w.shape)}")
    if new.endswith("tid2eid"):
        w = w.astype(mx.int32)
    if new.endswith("ffn.gate.weight"):
        w = w.astype(mx.float32)
    st.out[new] = w


def _place_fp8(st: _Official, key, new, want, scale):
    """A dense FP8 weight and its block scales as one ``mxfp8`` layer."""
    base = new[: -len(".weight")]
    out_dim, in_dim = (want[0] * want[1], want[2]) if len(want) == 3 else want
    wq, sc, bits = _fp8_to_mxfp8(key, st.weights[key], scale, out_dim, in_dim)
    if len(want) == 3:  # grouped wo_a: [G, o_lora, in]
        wq = wq.reshape(want[0], want[1], -1)
        sc = sc.reshape(want[0], want[1], -1)
    st.out[new], st.out[base + ".scales"] = wq, sc
    st.quant_bits[base] = bits


# -- phase 3: routed experts -------------------------------------------------------


def _stack_experts(st: _Official):
    """One SwitchLinear per projection: every expert present, all packed
    the same way, as the config's ``expert_dtype`` says."""
    qcfg = st.qcfg
    expert_fp4 = (getattr(st.args, "expert_dtype", None) or qcfg.get("expert_dtype")) == "fp4"
    n = st.args.n_routed_experts
    for base, slots in st.experts.items():
        missing = [e for e in range(n) if e not in slots]
        if missing:
            proj = base.rsplit(".", 1)[1]
            raise CheckpointError(
                f"{base.replace('model.', '', 1).replace('switch_mlp', 'experts')}",
                f"{len(missing)} of {n} experts missing for {proj} (first: expert {missing[0]})",
            )
        _, out_dim, in_dim = st.shapes[base + ".weight"]  # [E, out, in]
        ws, ss = [], []
        for e in range(n):
            orig, w, s = slots[e]
            if s is None:
                ws.append(_plain_expert(orig, w, out_dim, in_dim))
                continue
            if w.dtype == mx.int8 or w.shape[-1] * 2 == in_dim:
                wq, sc, bits = _fp4_to_mxfp4(orig, w, s, out_dim, in_dim)
            else:
                wq, sc, bits = _fp8_to_mxfp8(orig, w, s, out_dim, in_dim)
            ws.append(wq)
            ss.append(sc)
            st.quant_bits[base] = bits
        if ss and st.quant_bits[base] == 8 and expert_fp4:
            raise CheckpointError(
                slots[0][0], "config says expert_dtype fp4 but the experts are FP8"
            )
        if not ss and expert_fp4:
            raise CheckpointError(
                slots[0][0], "config says expert_dtype fp4 but the expert has no scale"
            )
        st.out[base + ".weight"] = mx.stack(ws)
        if ss:
            st.out[base + ".scales"] = mx.stack(ss)


def _plain_expert(orig, w, out_dim, in_dim):
    if _is_codes(w):
        raise _needs_scales(orig, w)
    if w.shape != (out_dim, in_dim):
        raise CheckpointError(orig, f"expected shape ({out_dim}, {in_dim}), found {tuple(w.shape)}")
    return w


# -- phase 4: nothing missing ----------------------------------------------------------


def _check_complete(st: _Official):
    if st.qcfg.get("quant_method") == "fp8" and not st.quant_bits:
        raise CheckpointError(
            "layers.0.attn.wq_a.weight",
            "config.json has an FP8 quantization_config but no tensor has a .scale",
        )
    missing = [k for k in st.shapes if k not in st.out]
    if missing and _distributed():
        # Pipelined hosts may hold only the files of their own layers: a
        # block with no tensor at all belongs to another host.
        present = {_block(k) for k in st.out}
        missing = [k for k in missing if _block(k) is None or _block(k) in present]
    if missing:
        raise CheckpointError(
            missing[0],
            f"missing from the checkpoint ({len(missing)} model parameter(s) "
            f"have no tensor; first shown)",
        )


# -- the mlx-community "deepseek-ai-" layout --------------------------------------


def _community_name(key: str) -> str:
    """MLX name of a key of the community layout (official names, MLX affine
    parts, stacked experts); ``wo_a`` groups keep their group index here."""
    for old, new in COMMUNITY_TOP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if key in TOP_LEVEL:
        return TOP_LEVEL[key]
    m = PREFIX.match(key)
    if not m:
        return key
    kind, idx, rest = m.groups()
    for pattern, repl in INNER + COMMUNITY_INNER:
        rest = pattern.sub(repl, rest)
    return f"model.{kind}.{idx}.{rest}"


def _community_to_mlx(model, weights):
    """Rename to the MLX module tree and join the per-group ``wo_a`` parts, so
    the result loads like any MLX conversion."""
    _refuse_mixed(weights)
    shapes = _logical_shapes(model)
    out, groups = {}, {}
    for key, w in weights.items():
        new = _community_name(key)
        m = COMMUNITY_GROUP.match(new)
        if m:
            base, g, part = m.groups()
            groups.setdefault(f"{base}.{part}", {})[int(g)] = (key, w)
            continue
        _check_community_target(key, new, shapes, weights)
        out[new] = w
    for new, parts in groups.items():
        out[new] = _join_groups(new, parts, shapes, weights)
    return out


def _refuse_mixed(weights):
    """MLX affine parts beside DeepSeek's own E8M0 ``.scale`` tensors: no
    converter writes that, so no reading of it can be trusted."""
    fp8 = next((k for k in weights if k.endswith(".scale")), None)
    if fp8 is not None:
        key = next(k for k in weights if k.endswith(QUANT_PARTS))
        key = key.rsplit(".", 1)[0] + ".weight"
        raise _unknown_layout(key, f"it sits beside DeepSeek's FP8 scales (e.g. {fp8})", weights)


def _join_groups(new, parts, shapes, weights):
    base = new.rsplit(".", 1)[0]
    want = shapes.get(base + ".weight")
    first_key = parts[min(parts)][0]
    if want is None or len(want) != 3:
        raise _unknown_layout(first_key, f"this model has no grouped {base!r}", weights)
    missing = [g for g in range(want[0]) if g not in parts]
    if missing or len(parts) != want[0]:
        raise _unknown_layout(
            first_key,
            f"expected {want[0]} output groups 0..{want[0] - 1}, found {sorted(parts)}",
            weights,
        )
    return mx.concatenate([parts[g][1] for g in range(want[0])], axis=0)


def _check_community_target(key, new, shapes, weights):
    base = new.rsplit(".", 1)[0] + ".weight" if new.endswith(QUANT_PARTS) else new
    if base in shapes or new.startswith("model.mtp."):
        return  # (MTP tensors are kept or dropped as for any MLX conversion)
    raise _unknown_layout(key, f"this model has no {base!r}", weights)


def _unknown_layout(key, reason, weights=None):
    """A tensor of an official-named checkpoint that fits none of the known
    layouts; says so, and whether it came quantized."""
    stem = key.rsplit(".", 1)[0]
    parts = [stem + p for p in QUANT_PARTS if weights is None or stem + p in weights]
    if parts:
        what = f"{stem} arrives quantized ({' / '.join(parts)}, MLX affine) in a layout"
    else:
        what = "unexpected tensor in a layout"
    return CheckpointError(key, f"{what} this loader does not know: {reason}; {LAYOUTS}")


def _packed_params(module, weights, path):
    """group_size / bits / mode of a packed weight, from its shapes."""
    in_dims = module.weight.shape[-1]
    scales = weights[path + ".scales"]
    bits = weights[path + ".weight"].shape[-1] * 32 // in_dims
    group = in_dims // scales.shape[-1]
    if scales.dtype != mx.uint8:
        return {"group_size": group, "bits": bits, "mode": "affine"}
    modes = {(4, 32): "mxfp4", (8, 32): "mxfp8", (4, 16): "nvfp4"}
    if (bits, group) not in modes:
        raise CheckpointError(
            path + ".weight", f"cannot tell the packing of {bits} bits per group of {group}"
        )
    return {"group_size": group, "bits": bits, "mode": modes[(bits, group)]}


def _quantize_packed(model, weights):
    """Turn every layer whose weights arrive packed into the matching
    quantized layer, from the tensors themselves (no config needed)."""

    def predicate(path, module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        return _packed_params(module, weights, path)

    nn.quantize(model, class_predicate=predicate)


def _sanitize_mlx(model, weights):
    shapes = _logical_shapes(model)
    out = {}
    for k, v in weights.items():
        if k.endswith("tid2eid"):
            v = v.astype(mx.int32)
        elif k.endswith("wo_a.weight") and v.ndim == 2 and k in shapes and len(shapes[k]) == 3:
            g = shapes[k][0]
            v = v.reshape(g, v.shape[0] // g, -1)
        elif (k.endswith("wo_a.scales") or k.endswith("wo_a.biases")) and v.ndim == 2:
            g = shapes[k[: -len("scales")] + "weight"][0]
            v = v.reshape(g, v.shape[0] // g, -1)
        out[k] = v
    if getattr(model.args, "quantization", None) is None:
        # Packed layers but no "quantization" config (e.g. saved from an
        # official checkpoint without re-quantizing): infer from the tensors.
        _quantize_packed(model, out)
    return out
