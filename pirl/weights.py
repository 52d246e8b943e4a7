"""Trunk weights in and out: import any supported format, export a torchvision-style ResNet.

Formats `read_trunk_weights` recognises (from the bytes, not the file name):
- safetensors: a flat state dict (our `trunk.safetensors`, or any torchvision-style export);
- a `torch.save` of a flat state dict (our `trunk.pt`; a torchvision ResNet's, whose `fc` is dropped);
- our training checkpoint (`checkpoints/checkpoint-*.pt`): `{"model": {"trunk.<key>": ...}, ...}`;
- VISSL's training checkpoint: `classy_state_dict -> base_model -> model -> trunk`, keys prefixed
  `_feature_blocks.` (or `base_model._feature_blocks.` when saved by a feature-extraction run);
  the model zoo's PIRL/NPID weights;
- VISSL's converted-model layout: a top-level `model_state_dict` of trunk weights (the zoo's
  converted NPID R50, which VISSL loads with STATE_DICT_KEY_NAME=model_state_dict);
- a run directory (CHECKPOINT.DIR): its `trunk.safetensors`, else `trunk.pt`, else its newest
  complete checkpoint.

Loading never unpickles arbitrary objects: `torch.load(weights_only=True)` (tensors, containers
and plain values; numpy arrays/scalars are allowed on a retry, as data only) or safetensors.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import sys
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from torch import nn

from pirl import storage
from pirl.errors import EXIT_CONFIG, PirlError
from pirl.redaction import redact

SHOWN = 10  # keys listed per kind in a mismatch message


class WeightsError(PirlError):
    """Unreadable, unsafe, or mismatched trunk weights (permanent: fix the URL or the config)."""

    exit_code = EXIT_CONFIG


@dataclass
class TrunkWeights:
    state_dict: dict[str, torch.Tensor]
    url: str  # as given
    resolved_url: str  # the object actually read (differs for a run directory)
    format: str  # safetensors | torch | checkpoint | vissl | vissl_converted
    sha256: str  # of the bytes read

    def identity(self) -> dict:
        return {
            "url": self.url,
            "resolved_url": self.resolved_url,
            "format": self.format,
            "sha256": self.sha256,
            "state_sha256": state_digest(self.state_dict),
        }


# ----------------------------------------------------------------------------------------------
# Import


def load_trunk_weights(url: str) -> dict[str, torch.Tensor]:
    """The trunk's state dict (torchvision key names, no `fc`) from any supported format."""
    return read_trunk_weights(url).state_dict


def read_trunk_weights(url: str) -> TrunkWeights:
    """Like `load_trunk_weights`, with the weights' identity (format, sha256, resolved URL)."""
    obj, resolved, fmt, sha = read_weights_object(url)
    state, kind = trunk_state_from(obj, resolved)
    return TrunkWeights(state, url, resolved, kind or fmt, sha)


def read_weights_object(url: str) -> tuple[object, str, str, str]:
    """(the decoded file, the URL actually read, safetensors | torch, sha256 of its bytes)."""
    if not url:
        raise WeightsError(
            "no trunk weights given: set config.MODEL.WEIGHTS_INIT.PARAMS_FILE to a trunk.safetensors, "
            "trunk.pt, training checkpoint, run directory or VISSL checkpoint URL"
        )
    resolved = resolve_weights_url(url)
    try:
        data = storage.read_bytes(resolved)
    except FileNotFoundError:
        raise WeightsError(f"trunk weights {resolved!r} do not exist") from None
    except storage.StorageError as exc:
        raise WeightsError(f"cannot read trunk weights {resolved!r}: {exc}") from None
    sha = hashlib.sha256(data).hexdigest()
    expected = _sidecar_sha256(resolved)
    if expected is not None and expected != sha:
        raise WeightsError(
            f"{resolved} does not match the sha256 in its checkpoint sidecar (corrupt or partial)"
        )
    if is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data), resolved, "safetensors", sha
        except Exception as exc:  # the library raises its own SafetensorError
            raise WeightsError(f"{resolved}: corrupt safetensors file: {exc}") from None
    return safe_torch_load(data, resolved), resolved, "torch", sha


def resolve_weights_url(url: str) -> str:
    """`url` itself, or for a run directory its exported trunk or newest complete checkpoint."""
    fs, path = storage.fs_and_path(url)
    try:
        is_dir = storage.retry(f"checking {url}", lambda: fs.isdir(path))
    except Exception:  # an unreachable store: reading the URL will report it
        return url
    if not is_dir:
        return url
    for name in ("trunk.safetensors", "trunk.pt"):
        candidate = storage.join(url, name)
        if storage.exists(candidate):
            return candidate
    from pirl import checkpoint

    metas = checkpoint.complete(url)
    if metas:
        return storage.join(url, "checkpoints", metas[-1]["file"])
    raise WeightsError(
        f"{url!r} is a directory without trunk.safetensors, trunk.pt or a complete checkpoint "
        "under checkpoints/"
    )


def _sidecar_sha256(url: str) -> str | None:
    """The sha256 a training checkpoint's .json sidecar records (None for other files)."""
    import json

    from pirl import checkpoint

    name = url.rsplit("/", 1)[-1]
    if not (name.startswith(checkpoint.PREFIX) and name.endswith(".pt")):
        return None
    try:
        meta = json.loads(storage.read_bytes(url[: -len(".pt")] + ".json"))
    except (FileNotFoundError, ValueError, storage.StorageError):
        return None
    return meta.get("sha256") if isinstance(meta, dict) else None


def is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _numpy_safe_globals() -> list:
    """numpy types that rebuild arrays and scalars (data only), for checkpoints that hold them."""
    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    found += [
        getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n[0].isupper()
    ]
    return found


def _unpickler_detail(exc: Exception) -> str:
    """The informative line of torch's weights_only error ('Unsupported global: ...')."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        return rest.splitlines()[0].split(". Please use")[0] if rest else text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def is_refused_pickle(exc: Exception) -> bool:
    """torch.load(weights_only=True) refused the file for what it would execute (not damage)."""
    return "Unsupported global" in str(exc)


def refusal(exc: Exception) -> str:
    """Why a file was refused, without torch's advice to load it unsafely."""
    return (
        "refused to load: unpickling it would need code execution, and only tensors and plain "
        f"values are ever loaded ({_unpickler_detail(exc)})"
    )


def safe_torch_load(data: bytes, source: str):
    """`torch.load(weights_only=True)`, with a clear WeightsError for corrupt or unsafe files."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        error: Exception = exc
        if "numpy" in str(exc):
            try:
                with torch.serialization.safe_globals(_numpy_safe_globals()):
                    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as exc2:
                error = exc2
        detail = _unpickler_detail(error)
        if is_refused_pickle(error):
            raise WeightsError(f"{source}: {refusal(error)}") from None
        raise WeightsError(
            f"{source}: not a readable weights file (corrupt, truncated, or another format: "
            f"expected safetensors or torch.save): {detail}"
        ) from None
    except Exception as exc:
        raise WeightsError(
            f"{source}: not a readable weights file (corrupt, truncated, or another format: "
            f"expected safetensors or torch.save): {_unpickler_detail(exc)}"
        ) from None


# Prefixes VISSL and DDP put before the torchvision-style trunk names, outermost first: `trunk.`
# (a whole model's state), `base_model.` (VISSL's feature-extraction trunk), `_feature_blocks.`
# (VISSL's ResNe(X)t), `module.` (DDP).
TRUNK_PREFIXES = ("module.", "trunk.", "base_model.", "_feature_blocks.")


def trunk_state_from(obj, source: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(flat trunk state dict with torchvision names, detected container kind or None)."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{source}: expected a dict of weights, got {type(obj).__name__}")
    kind = None
    if "classy_state_dict" in obj:
        kind = "vissl"
        node = obj["classy_state_dict"]
        for key in ("base_model", "model", "trunk"):
            if not isinstance(node, dict) or key not in node:
                raise WeightsError(
                    f"{source}: a VISSL checkpoint without classy_state_dict -> base_model -> model "
                    f"-> trunk (stopped at {key!r})"
                )
            node = node[key]
        obj = node
    elif "model_state_dict" in obj:
        kind = "vissl_converted"
        obj = obj["model_state_dict"]
        if not isinstance(obj, dict):
            raise WeightsError(
                f"{source}: model_state_dict is a {type(obj).__name__}, not a state dict"
            )
    elif isinstance(obj.get("model"), dict) and any(
        str(k).startswith("trunk.") for k in obj["model"]
    ):
        kind = "checkpoint"
        obj = obj["model"]
    elif isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj.get("trunk"), dict):
        obj = obj["trunk"]
    state = {}
    # A whole model's state (trunk + heads): keep only the trunk's entries.
    whole_model = any(str(k).removeprefix("module.").startswith("trunk.") for k in obj)
    for key, value in obj.items():
        key = str(key).removeprefix("module.")
        if whole_model and not key.startswith("trunk."):
            continue  # heads, loss buffers: not the trunk
        if kind == "vissl_converted" and key.startswith("heads."):
            continue
        for prefix in TRUNK_PREFIXES:
            key = key.removeprefix(prefix)
        if key in ("fc.weight", "fc.bias"):
            continue  # a torchvision classifier: the trunk stops at the average pool
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            # converted checkpoints may hold numpy arrays, which VISSL's loader also accepts
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor: "
                "this is not a state dict"
            )
        state[key] = value
    if not state:
        raise WeightsError(f"{source}: no trunk weights found (keys: {_shown(list(obj))})")
    return state, kind


def _shown(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def describe_resnet(state: dict[str, torch.Tensor]) -> str:
    """'ResNet-50 w1'-style guess of the architecture a state dict belongs to ('' if unsure).
    Only the widths the models support, and only when the stem's weights really hold that many
    values: a tiny file with empty tensors must not make a caller build a 1000-wide trunk."""
    from pirl.config import WIDTH_MULTIPLIERS
    from pirl.models import LAYERS

    try:
        blocks = [
            1 + max(int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}."))
            for i in range(1, 5)
        ]
        width = state["conv1.weight"].shape[0] // 64
    except (ValueError, KeyError, IndexError):
        return ""
    if width not in WIDTH_MULTIPLIERS or state["conv1.weight"].shape != (64 * width, 3, 7, 7):
        return ""
    bottleneck = "layer1.0.conv3.weight" in state
    for depth, layers in LAYERS.items():
        if layers == blocks and (depth >= 50) == bottleneck:
            return f"ResNet-{depth} w{width}"
    return ""


def apply_trunk_weights(trunk: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `trunk`, strictly: a mismatch is a WeightsError naming the missing,
    unexpected and wrongly shaped keys. Only BN's `num_batches_tracked` counters may be absent."""
    expected = trunk.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{source}: the weights do not fit the configured trunk"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_shown(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_shown(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches (weights vs trunk) ({len(shapes)}): {_shown(shapes)}")
        guess = describe_resnet(state)
        hint = f"the weights look like {guess}; " if guess else ""
        parts.append(
            f"{hint}set config.MODEL.TRUNK.RESNETS.DEPTH / WIDTH_MULTIPLIER to the weights' architecture"
        )
        raise WeightsError("\n  ".join(parts))
    trunk.load_state_dict(state, strict=False)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in key order: equal digests mean
    bit-identical weights, whatever file format carried them."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Export


def export_torchvision(state: dict[str, torch.Tensor], url: str) -> list[str]:
    """Write a torchvision-style ResNet state dict (no `fc`; load it with `m.fc = nn.Identity()`,
    then `m.load_state_dict(sd, strict=True)`). `url` ending in .safetensors or .pt/.pth writes
    that format; any other URL is a folder that gets both trunk.safetensors and trunk.pt.
    Accepts any container `trunk_state_from` does (e.g. a training model's `trunk.` keys)."""
    from safetensors.torch import save as save_safetensors

    flat, _ = trunk_state_from(dict(state), "the state dict to export")
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in flat.items()}
    if url.endswith(".safetensors"):
        targets = [("safetensors", url)]
    elif url.endswith((".pt", ".pth")):
        targets = [("torch", url)]
    else:
        targets = [
            ("safetensors", storage.join(url, "trunk.safetensors")),
            ("torch", storage.join(url, "trunk.pt")),
        ]
    for fmt, target in targets:
        if fmt == "safetensors":
            data = save_safetensors(weights)
        else:
            buf = io.BytesIO()
            torch.save(weights, buf)
            data = buf.getvalue()
        storage.write_bytes(target, data)
    return [t for _, t in targets]


def vissl_checkpoint(url: str) -> dict:
    """The weights at `url` as a consolidated VISSL checkpoint: `classy_state_dict -> base_model
    -> model -> {trunk, heads}`, trunk keys prefixed `_feature_blocks.` (what VISSL's benchmarks
    load with STATE_DICT_KEY_NAME=classy_state_dict, and its conversion scripts read). Heads come
    from our training checkpoints (named as VISSL's model names them for the run's HEAD.PARAMS)
    and VISSL's own; a trunk-only file gets none."""
    obj, resolved, _, _ = read_weights_object(url)
    trunk, kind = trunk_state_from(obj, resolved)
    heads: dict[str, torch.Tensor] = {}
    if kind == "checkpoint":
        assert isinstance(obj, dict)
        heads = vissl_head_state(obj["model"], obj.get("config"))
    elif kind == "vissl":
        assert isinstance(obj, dict)
        heads = dict(obj["classy_state_dict"]["base_model"]["model"].get("heads") or {})
    model = {
        "trunk": {f"_feature_blocks.{k}": v.detach().cpu().contiguous() for k, v in trunk.items()},
        "heads": heads,
    }
    return {"type": "consolidated", "classy_state_dict": {"base_model": {"model": model}}}


def vissl_head_state(model_state: dict, config_yaml: str | None) -> dict[str, torch.Tensor]:
    """Our model's `heads.<i>.<module>.<layer>.*` entries under VISSL's names, without the
    `heads.` prefix (VISSL adds it when loading): `<i>.<module>.clf.<layer>.*` for a head written
    as a list of modules, `<i>.clf.<layer>.*` for one written as a single [name, kwargs] module."""
    single = set()
    if config_yaml:
        params = (yaml.safe_load(config_yaml) or {}).get("config", {}).get("MODEL", {})
        params = params.get("HEAD", {}).get("PARAMS", [])
        single = {i for i, head in enumerate(params) if head and isinstance(head[0], str)}
    out = {}
    for key, value in model_state.items():
        if not key.startswith("heads."):
            continue
        head, module, rest = key[len("heads.") :].split(".", 2)
        name = f"{head}.clf.{rest}" if int(head) in single else f"{head}.{module}.clf.{rest}"
        out[name] = value.detach().cpu().contiguous()
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m pirl.weights SRC DEST [--format torchvision|vissl]`: convert any supported
    weights (a VISSL checkpoint, a training checkpoint, a run directory) into a torchvision-style
    trunk at DEST, or (--format vissl) into a checkpoint VISSL's tools read."""
    import argparse

    from pirl.models import ResNetTrunk

    parser = argparse.ArgumentParser(prog="python -m pirl.weights", description=main.__doc__)
    parser.add_argument("src", help="weights URL (any supported format)")
    parser.add_argument(
        "dest",
        help="torchvision: *.safetensors, *.pt, or a folder (both files); vissl: the file to "
        "write (VISSL names them *.torch)",
    )
    parser.add_argument(
        "--format",
        choices=("torchvision", "vissl"),
        default="torchvision",
        help="torchvision (default): a flat ResNet state dict; vissl: a consolidated VISSL "
        "checkpoint (trunk and heads)",
    )
    args = parser.parse_args(argv)
    try:
        weights = read_trunk_weights(args.src)
        arch = describe_resnet(weights.state_dict)
        if not arch:
            raise WeightsError(f"{args.src}: not a ResNet trunk this tool can rebuild")
        depth, width = arch.split()
        trunk = ResNetTrunk(int(depth.split("-")[1]), int(width[1:]))
        apply_trunk_weights(trunk, weights.state_dict, weights.resolved_url)
        if args.format == "vissl":
            buf = io.BytesIO()
            torch.save(vissl_checkpoint(args.src), buf)
            storage.write_bytes(args.dest, buf.getvalue())
            written = [args.dest]
        else:
            written = export_torchvision(trunk.state_dict(), args.dest)
    except PirlError as exc:
        print(redact(f"pirl.weights: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    print(f"{arch} ({weights.format}, sha256 {weights.sha256[:12]}) -> {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
