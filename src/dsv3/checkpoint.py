"""Checkpoint I/O in the released Hugging Face layout (SPEC 6).

`hf_layout` is the one name-mapping table: every tensor of the HF layout -> (our parameter, index into it).
Our names equal the HF ones except that routed experts are stacked ([E, 2I, d] gate-then-up, [E, d, I]) and
the MTP modules live under `mtp.K` instead of `model.layers.{num_hidden_layers + K}`. Saving and loading both
walk this table, so save -> load is exact.

Loading builds the model on the meta device and fills it tensor by tensor from the shards, so peak host
memory stays near one copy of the weights. FP8 E4M3 weights with 128x128 `weight_scale_inv` are dequantised
on load, or with fp8="keep" stay E4M3: the linear layers the FP8 layout quantises are swapped for
dsv3.fp8's FP8 twins while the model is still on meta, whose `weight_scale_inv` parameters carry the HF names
themselves, and filled with the stored bytes. Saving is atomic: a temporary directory renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dsv3.config import ModelConfig, read_json_object
from dsv3.fp8 import cache_dense_weights_, dequantize_blockwise, quantize_blockwise, to_fp8_
from dsv3.model import DeepSeekV3

Index = tuple  # an index into one of our parameters: () for the whole tensor, (e, slice) for an expert part
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
}
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # duplicated in the MTP layer on disk


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model its config describes; the message lists every problem."""


def _hf_prefix(name: str, n_layers: int) -> str:
    """Our dotted name -> its HF name (stacked experts are split afterwards)."""
    if name in ("embed_tokens.weight", "norm.weight"):
        return "model." + name
    if name == "lm_head.weight":
        return name
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
        return f"model.layers.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"mtp\.(\d+)\.(?:block\.)?(.+)", name):
        return f"model.layers.{n_layers + int(m[1])}.{m[2]}"
    raise KeyError(f"no HF name for parameter {name!r}")


def hf_layout(model: DeepSeekV3) -> dict[str, tuple[str, Index]]:
    """Every HF tensor name -> (our state_dict key, index into that tensor). Works on a meta-device model.

    A model holding FP8 weights (load_model(fp8="keep")) also maps every `*.weight_scale_inv`; stacked
    experts keep the gate's block rows before the up projection's, each half on its own checkpoint grid."""
    cfg = model.cfg
    layout: dict[str, tuple[str, Index]] = {}
    for name, t in model.state_dict().items():
        hf = _hf_prefix(name, cfg.num_hidden_layers)
        sfx = "_scale_inv" if name.endswith("_scale_inv") else ""
        stem = name.removesuffix(sfx)
        if stem.endswith("experts.gate_up_proj"):
            base = hf.removesuffix("gate_up_proj" + sfx)
            half = t.shape[1] // 2  # the gate's rows: I weights, or ceil(I/128) rows of scales
            for e in range(t.shape[0]):
                layout[f"{base}{e}.gate_proj.weight{sfx}"] = (name, (e, slice(0, half)))
                layout[f"{base}{e}.up_proj.weight{sfx}"] = (name, (e, slice(half, 2 * half)))
        elif stem.endswith("experts.down_proj"):
            base = hf.removesuffix("down_proj" + sfx)
            for e in range(t.shape[0]):
                layout[f"{base}{e}.down_proj.weight{sfx}"] = (name, (e,))
        else:
            layout[hf] = (name, ())
    return layout


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """The released layout repeats the embedding and head inside each MTP layer: HF name -> our key."""
    ours = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
    return {
        f"model.layers.{cfg.num_hidden_layers + k}.{c}": ours[c]
        for k in range(cfg.num_nextn_predict_layers)
        for c in _MTP_COPIES
    }


def is_fp8_weight(hf_name: str) -> bool:
    """Linear weights inside the blocks are FP8 in the released files; embedding, head, norms, router
    weight and eh_proj stay BF16, the correction bias F32 (SPEC 6)."""
    return (
        hf_name.startswith("model.layers.")
        and hf_name.endswith(("proj.weight", "kv_a_proj_with_mqa.weight"))
        and ".eh_proj." not in hf_name
    )


def fp8_module_names(model: DeepSeekV3) -> list[str]:
    """Our names of the modules whose weights the FP8 layout stores in E4M3 (`is_fp8_weight` through the one
    name table): the blocks' linear layers, MTP blocks included, and the stacked routed experts."""
    names = {ours.rsplit(".", 1)[0]: None for hf, (ours, _) in hf_layout(model).items() if is_fp8_weight(hf)}
    return list(names)


# ---- saving ---------------------------------------------------------------------------------------

def _hf_tensors(model: DeepSeekV3, fp8: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor on CPU) in checkpoint order, with scale_inv tensors after FP8 weights."""
    state = model.state_dict()
    dtype = model.embed_tokens.weight.dtype
    items = [(hf, state[ours][idx]) for hf, (ours, idx) in hf_layout(model).items()]
    items += [(hf, state[ours]) for hf, ours in _mtp_copies(model.cfg).items()]
    kept_scales = {hf: t for hf, t in items if hf.endswith("_scale_inv")}  # a model loaded with fp8="keep"
    for hf, t in items:
        t = t.detach()
        if hf in kept_scales:
            continue  # written right after its weight
        if t.dtype == torch.float8_e4m3fn:  # kept E4M3: the bytes as they are, no second rounding
            for name, x in ((hf, t), (hf + "_scale_inv", kept_scales[hf + "_scale_inv"])):
                yield name, x.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        elif hf.endswith("e_score_correction_bias"):
            yield hf, t.to("cpu", torch.float32).contiguous()
        elif fp8 and is_fp8_weight(hf):
            q, s = quantize_blockwise(t)
            yield hf, q.cpu().contiguous()
            yield hf + "_scale_inv", s.cpu().contiguous()
        else:
            yield hf, t.to("cpu", dtype).clone()  # clone: safetensors refuses views sharing storage


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_model(
    model: DeepSeekV3, path: str | Path, fp8: bool = False, max_shard_bytes: int = 5 * 2**30,
    progress: bool = False, extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` to directory `path` in the HF layout: config.json, sharded safetensors and their index.

    fp8=True stores block linear weights as E4M3 with 128x128 `weight_scale_inv`, as the released checkpoint.
    Atomic: written to a temporary sibling directory, then renamed over `path`; a crash leaves any previous
    checkpoint at `path` intact (or, killed between the two renames, beside it as `.NAME.old-*`, which
    `load_model`'s error names and the next save to `path` puts back first). Extra files already in `path`
    (e.g. a tokenizer) are not carried over: `extra_files(dir)` writes whatever else belongs in the checkpoint
    (tokenizer files, trainer state) into the temporary directory, so they appear together with the weights or
    not at all.
    """
    path = Path(path)
    if not fp8 and any(p.dtype == torch.float8_e4m3fn for p in model.parameters()):
        raise ValueError("the model holds FP8 weights (loaded with fp8='keep'): save it with fp8=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_replaced(path.parent, path.name)  # an earlier save of `path` cut short between its renames
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from other users and jobs
    try:
        cfg = model.cfg.to_dict()
        cfg["torch_dtype"] = _dtype_name(model.embed_tokens.weight.dtype)
        if fp8:
            cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        else:
            cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

        # Stream: each shard is written as soon as it is full, so at most one shard is held in memory. Its
        # final name needs the shard count, so shards are renamed once all are written.
        written: list[tuple[Path, list[str]]] = []
        shard: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush() -> None:
            part = tmp / f"part-{len(written):05d}.safetensors"
            save_file(shard, str(part), metadata={"format": "pt"})
            written.append((part, list(shard)))
            shard.clear()

        for name, t in tqdm(_hf_tensors(model, fp8), desc="saving", disable=not progress, unit=" tensors"):
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > max_shard_bytes and not name.endswith("_scale_inv"):
                flush()
                size = 0
            shard[name] = t
            size += nbytes
            total += nbytes
        flush()
        weight_map = {}
        for i, (part, names) in enumerate(written, start=1):
            fname = f"model-{i:05d}-of-{len(written):05d}.safetensors"
            part.rename(tmp / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if extra_files is not None:
            extra_files(tmp)
        for folder, _, names in os.walk(tmp):  # (extra_files may have made folders of its own)
            for name in names:
                f = os.path.join(folder, name)
                os.chmod(f, 0o666 & ~umask)  # safetensors writes shards 0600: others could not read them
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(folder)  # the files' names (the shard renames included), before the directory is published
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory src to dst; an existing dst is swapped out first (to `.NAME.old-PID-RANDOM`, which a
    crash before the second rename leaves for `restore_replaced` to put back) and deleted only afterwards."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{os.urandom(4).hex()}")  # never a leftover's name
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:  # (an exception, Ctrl-C) between the renames: the old checkpoint goes back
        if old is not None and not dst.exists():
            os.replace(old, dst)
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_OLD = re.compile(r"\.(.+)\.old-\d+(?:-[0-9a-f]+)?")


def replaced_copies(parent: str | Path, name: str | None = None) -> list[Path]:
    """The `.NAME.old-*` directories that `_replace_dir` swapped out of `parent` (of NAME = `name` only)."""
    out = []
    for p in Path(parent).iterdir():
        m = _OLD.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and (name is None or m[1] == name):
            out.append(p)
    return sorted(out)


def restore_replaced(parent: str | Path, name: str | None = None) -> None:
    """Undo a `_replace_dir` cut short between its two renames: `.NAME.old-*` goes back to NAME when NAME
    is missing (with NAME present, the swap completed and the old copy is garbage). With `name`, only that
    checkpoint's copies are looked at, and the garbage ones (an rmtree cut short) are deleted."""
    for p in replaced_copies(parent, name):
        target = p.parent / _OLD.fullmatch(p.name)[1]
        if not target.exists():
            os.replace(p, target)
        elif name is not None:
            shutil.rmtree(p, ignore_errors=True)


def fsync_dir(path: str | Path) -> None:
    """Make the directory's entries (renames, new files) durable; a no-op where directories cannot be
    opened for fsync (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace the text file at `path` in one rename after an fsync: a crash or a full disk leaves the old
    contents or the new, never an empty or half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# ---- loading --------------------------------------------------------------------------------------

def _shard_name(file: Path | None) -> str:
    return "nothing" if file is None else file.name


def _open_shard(file: Path) -> Any:
    """safe_open(file), a damaged file (truncated, not safetensors) raising CheckpointError naming it."""
    if file.is_file() and not os.access(file, os.R_OK):  # safetensors would call it missing
        raise CheckpointError(f"{file}: permission denied (mode {file.stat().st_mode & 0o777:o})")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _weight_files(path: Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint -> the shard file holding it (from the index, or the one file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: `weight_map` must map tensor names to shard file names")
        # a shard lies in the checkpoint's own directory: a path out of it ("../", absolute) would read any file
        outside = sorted({f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")})
        if outside:
            raise CheckpointError(f"{index}: `weight_map` names shards outside the checkpoint directory: "
                                  f"{', '.join(map(repr, outside))} (shards are file names in {path})")
    elif (path / "model.safetensors").is_file():
        with _open_shard(path / "model.safetensors") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise CheckpointError(f"{path}: no model.safetensors.index.json or model.safetensors")
    missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
    if missing:
        raise CheckpointError(f"{path}: shard files listed in the index are missing: {', '.join(missing)}")
    return {k: path / f for k, f in weight_map.items()}


def build_empty(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, fp8: bool = False) -> DeepSeekV3:
    """The model with uninitialised storage on `device` in `dtype` (built on meta: no init cost, one copy).

    fp8=True: the modules the FP8 layout quantises become dsv3.fp8's E4M3 twins before any storage exists,
    so their weights never exist in `dtype`."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = DeepSeekV3(cfg)
    finally:
        torch.set_default_dtype(prev)
    if fp8:
        to_fp8_(model, fp8_module_names(model))
    model.to_empty(device=device)
    model.rotary.reset_parameters()
    return model


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
    progress: bool = False, fp8: str = "dequantize",
) -> DeepSeekV3:
    """Load a checkpoint in the HF DeepSeek-V3 layout (ours or a released one) onto `device` in `dtype`.

    fp8="dequantize" (default): FP8 weights are dequantised with their 128x128 block scales into `dtype`.
    fp8="keep" (an FP8 checkpoint only): the blocks' linear weights and the routed experts stay E4M3 with
    their float32 scales, about half the memory of BF16, and run through dsv3.fp8 (blockwise FP8 GEMMs on
    CUDA, dequantise-and-matmul on the CPU); everything else loads in `dtype`. A weight the file holds in
    higher precision is quantised on load. The MTP layer's copies of the embedding and head are accepted
    and skipped (the model shares its own). Missing, unexpected or mis-shaped tensors raise CheckpointError
    listing all of them.
    """
    path = Path(path)
    if fp8 not in ("dequantize", "keep"):
        raise ValueError(f"fp8 must be 'dequantize' or 'keep', got {fp8!r}")
    if not path.is_dir():
        left = replaced_copies(path.parent, path.name) if path.parent.is_dir() else []
        hint = (f"; a save cut short left the previous checkpoint at {left[-1]} (the next save_model to {path} "
                f"puts it back, or rename it)") if left else ""
        raise FileNotFoundError(f"checkpoint directory {path} does not exist{hint}")
    cfg = ModelConfig.from_json(path)
    keep = fp8 == "keep"
    if keep:
        qc = cfg.quantization_config or {}
        if qc.get("quant_method") != "fp8" or list(qc.get("weight_block_size", [])) != [128, 128]:
            raise ValueError(
                f"{path / 'config.json'}: fp8='keep' needs an FP8 checkpoint with 128x128 blocks "
                f"(quantization_config {FP8_QUANTIZATION_CONFIG}), found {cfg.quantization_config}"
            )
    weight_map = _weight_files(path)
    files = sorted(set(weight_map.values()))
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers and not any(k.startswith(mtp_prefix) for k in weight_map):
        # transformers' save_pretrained drops the MTP layers; the main model is still complete
        warnings.warn(f"{path} has no MTP weights (layer {cfg.num_hidden_layers}); loading without MTP", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = build_empty(cfg, device, dtype, fp8=keep)
    layout = hf_layout(model)
    copies = _mtp_copies(cfg)
    params = model.state_dict(keep_vars=True)
    seen: set[str] = set()
    unexpected, mismatched = [], []
    with contextlib.ExitStack() as shards, torch.no_grad():
        opened: dict[Path, tuple[Any, set[str]]] = {}

        def shard(file: Path) -> tuple[Any, set[str]]:
            """A safetensors handle and its tensor names, opened once."""
            if file not in opened:
                f = shards.enter_context(_open_shard(file))
                opened[file] = f, set(f.keys())
            return opened[file]

        def scale_of(key: str) -> torch.Tensor | None:
            """key's `_scale_inv`, from whichever shard the index names (DeepSeek's tools look it up so too)."""
            file = weight_map.get(key + "_scale_inv")
            if file is None or key + "_scale_inv" not in shard(file)[1]:
                mismatched.append(f"{key}: FP8 weight without {key}_scale_inv")
                return None
            return shard(file)[0].get_tensor(key + "_scale_inv")

        for file in tqdm(files, desc="loading", disable=not progress, unit=" shards"):
            f, keys = shard(file)
            for key in sorted(keys):
                if weight_map.get(key) != file:  # a second copy, or a tensor the index does not list
                    unexpected.append(f"{key} (in {file.name}; the index says {_shard_name(weight_map.get(key))})")
                    continue
                if key.endswith("_scale_inv"):
                    if key.removesuffix("_scale_inv") not in weight_map:
                        unexpected.append(key)
                    continue
                if key in copies:
                    continue
                if key not in layout:
                    # transformers writes zero-width shared experts for n_shared_experts=0: nothing to load
                    if 0 not in f.get_slice(key).get_shape():
                        unexpected.append(key)
                    continue
                ours, idx = layout[key]
                target = params[ours].data[idx]
                t = f.get_tensor(key)
                if t.dtype != torch.float8_e4m3fn and key + "_scale_inv" in weight_map:
                    mismatched.append(f"{key}: {t.dtype} with a {key}_scale_inv (block-scaled weights are E4M3)")
                    continue
                if target.dtype == torch.float8_e4m3fn:  # fp8="keep"
                    if t.dtype == torch.float8_e4m3fn:
                        s = scale_of(key)
                        if s is None:
                            continue
                    else:
                        t, s = quantize_blockwise(t)
                    s_ours, s_idx = layout[key + "_scale_inv"]
                    s_target = params[s_ours].data[s_idx]
                    if (t.shape, s.shape) != (target.shape, s_target.shape):
                        mismatched.append(f"{key}: checkpoint {tuple(t.shape)} with scale_inv "
                                          f"{tuple(s.shape)}, model {tuple(target.shape)} with "
                                          f"{tuple(s_target.shape)}")
                        continue
                    target.copy_(t)
                    s_target.copy_(s)
                    seen.update((key, key + "_scale_inv"))
                    continue
                if t.dtype == torch.float8_e4m3fn:
                    s = scale_of(key)
                    if s is None:
                        continue
                    try:
                        t = dequantize_blockwise(t, s, torch.float32)
                    except ValueError as e:  # a mis-shaped scale_inv
                        mismatched.append(f"{key}: {e}")
                        continue
                if tuple(t.shape) != tuple(target.shape):
                    mismatched.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(target.shape)}")
                    continue
                target.copy_(t)
                seen.add(key)
        absent = sorted(k for k, file in weight_map.items() if k not in shard(file)[1])
    bad = {m.split(":")[0] for m in mismatched}
    missing = sorted(set(layout) - seen - bad - {k + "_scale_inv" for k in bad} - set(absent))
    if missing or unexpected or mismatched or absent:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched),
                             ("indexed-but-absent", [f"{k} ({weight_map[k].name})" for k in absent])):
            if items:
                shown = "\n  ".join(items[:50]) + (f"\n  ... and {len(items) - 50} more" if len(items) > 50 else "")
                parts.append(f"{len(items)} {title} tensor(s):\n  {shown}")
        raise CheckpointError(f"checkpoint {path} does not match its config.json:\n" + "\n".join(parts))
    if keep:
        cache_dense_weights_(model, dtype)
    return model.eval()
