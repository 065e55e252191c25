"""ONNX Runtime for inference with a frozen model: `predict`, `serve` and head-mode features.

PyTorch stays the training path; this module only runs a copy of a model that no longer changes.
The model (a PEFT model with its LoRA merged into the backbone, or a merged export, with its head) is
exported once to ONNX with dynamic batch and sequence axes, optionally quantised to int8 weights
(`onnxruntime.quantization.quantize_dynamic`), cached on disk, and run by an `InferenceSession` on the
CPU with a chosen number of threads.

Runtimes (`--runtime` of predict and serve):

* `torch`: the eager model (the default; see `RUNTIMES`).
* `onnx`: the same float32 graph in ONNX Runtime. Probabilities agree with eager within 1e-4
  (measured ~1e-7: ONNX Runtime fuses and reorders float32 operations, nothing more).
* `onnx-int8`: the weights of every linear layer of the backbone quantised to int8, one scale per
  output channel, their inputs quantised per call (attention products and the head stay float32).
  Measured on MiniLM-L6 with a trained head (`simulations/bench_onnx.py`, 303 held-out synthetic
  examples): AUC +0.0004 against eager, but probabilities moved by 0.04 on average (at most 0.17;
  7% of predicted labels at the 0.5 threshold changed). int8 keeps the ranking, not the calibration:
  where a threshold on the probability matters, set it on int8 scores or use `onnx`.

Two graphs can be exported from one model: `scores` (outputs `logits` and `pooled`, what the head
reads) for predict and serve, and `pooled` (the backbone and pooling only, the head left out) for
features: its cache key holds no head weights, so a head trained round after round reuses one file.

Cache: `<cache>/<graph>-<key>[-int8].onnx` where the key is a SHA-256 of the merged weights, the model
config and class, the opset, the torch version and this module's format version; the int8 file adds
the quantisation settings. `<cache>` is the `cache_dir` argument, else `$FEDBEHAVIOR_ONNX_CACHE`,
else `$XDG_CACHE_HOME/fedbehavior/onnx` (`~/.cache/fedbehavior/onnx`); the model folder is never
written (it may be read-only, and `serve` reloads from it). Files are written atomically (temp file +
rename), and only the `CACHE_KEEP` most recently used are kept.

Exporter: torch 2.13's default (`dynamo=True`) needs the extra package onnxscript and took ~5× longer
on a tiny BERT; the TorchScript exporter (`dynamo=False`, deprecated but present) needs only onnx and
gives the same scores, so it is used. Attention is exported as the model runs it (SDPA): the tracer
keeps the padding mask (transformers never drops it while tracing) and the example batch is padded.

onnxruntime and onnx are optional (`pip install 'fedbehavior[onnx]'`) and imported only inside the
functions that need them, so that importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "onnx-int8")
"""Default `torch`: the eager model, exactly the scores training evaluated. Measured on MiniLM-L6 on
the 2-core development machine while other jobs ran (load 5-12; simulations/bench_onnx.py, three
runs, two with 2 threads and one with 1), throughput against eager: `onnx` 1.3-1.8x (features),
1.2-2.7x (batch predict), 1.8-4.7x (served req/s); `onnx-int8` 1.9-3.6x, 2.4-5.2x, 3.1-7.8x (the
highest serving ratios with 2 threads, where eager torch suffers most from a loaded host). They
stay opt-in: onnxruntime is an optional extra; the first use of a model exports and quantises it
(8-21 s for MiniLM here) and writes ~90 MB (float32) + ~23 MB (int8) to a cache; ONNX Runtime runs
here on the CPU only; and int8 moves probabilities (see the module docstring). `onnx` gives torch's
scores within 1e-4 and is the safe choice for a faster CPU deployment."""

INSTALL = "pip install 'fedbehavior[onnx]'"
OPSET = 17  # LayerNormalization is one operator from 17 on; onnxruntime >= 1.17 runs opset 17
FORMAT = 1  # bump when the exported graph changes for the same model (invalidates the cache)
QUANTISATION = {"weight_type": "QInt8", "per_channel": True, "reduce_range": False}
"""Signed int8 weights, one scale per output channel. Measured on MiniLM-L6's pooled embeddings of 256
sessions: least cosine to float32 0.979 per channel against 0.917 per tensor (0.735 with
reduce_range, 0.951 with unsigned weights), at the same speed."""
CACHE_KEEP = 8
HEAD_NAME = "classifier"  # BERT's sequence-classification head (PEFT keeps the name)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class OnnxUnavailable(RuntimeError):
    """onnxruntime / onnx are not installed but an ONNX runtime was asked for."""


def check_runtime(runtime: str) -> str:
    """`runtime` if it is known and can run here; a ValueError / OnnxUnavailable naming the fix."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime != "torch":
        missing = [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]
        if missing:
            raise OnnxUnavailable(
                f"--runtime {runtime} needs {' and '.join(missing)}, not installed here: {INSTALL} "
                "(or use --runtime torch)"
            )
    return runtime


def _onnxruntime() -> Any:
    check_runtime("onnx")
    import onnxruntime

    return onnxruntime


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where exported graphs are kept (see the module docstring)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("FEDBEHAVIOR_ONNX_CACHE"):
        return Path(os.environ["FEDBEHAVIOR_ONNX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedbehavior" / "onnx"


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model without Opacus' GradSampleModule wrapper(s)."""
    inner = getattr(model, "_module", None)
    while type(model).__name__ == "GradSampleModule" and isinstance(inner, torch.nn.Module):
        model, inner = inner, getattr(inner, "_module", None)
    return model


def prepared(model: torch.nn.Module, *, head: bool = True) -> torch.nn.Module:
    """A float32 CPU copy of `model` in eval mode with any LoRA merged into the backbone (the live
    model is left untouched); without `head`, the head is replaced by the identity, so the output
    called logits is the pooled embedding the head reads."""
    merged: Any = copy.deepcopy(_unwrapped(model))
    if hasattr(merged, "merge_and_unload"):  # a PeftModel: fold B·A into the weights, drop wrappers
        merged = merged.merge_and_unload()
    merged = merged.to(device="cpu", dtype=torch.float32)
    if not hasattr(merged, HEAD_NAME):
        raise TypeError(f"{type(merged).__name__} has no `{HEAD_NAME}` head: not a sequence classifier")
    if not head:
        setattr(merged, HEAD_NAME, torch.nn.Identity())
    merged.eval()
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged


def fingerprint(model: torch.nn.Module, *, graph: str, opset: int = OPSET) -> str:
    """SHA-256 of what determines the exported graph: weights, config, class, opset, versions."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    parts = [
        f"format={FORMAT}", f"graph={graph}", f"opset={opset}", f"torch={torch.__version__}",
        f"class={type(model).__module__}.{type(model).__qualname__}",
        f"config={config.to_json_string() if config is not None else ''}",
    ]  # fmt: skip
    digest.update("\n".join(parts).encode())
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\n{name}:{value.dtype}:{tuple(value.shape)}\n".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class _Graph(torch.nn.Module):
    """What is exported: the model's logits and the head's input (`scores`), or the pooled
    embedding only (`pooled`, the model's head already replaced by the identity)."""

    def __init__(self, model: torch.nn.Module, head: bool) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> Any:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if not self.head:
            return self.model(**inputs).logits
        captured: list[torch.Tensor] = []
        handle = getattr(self.model, HEAD_NAME).register_forward_pre_hook(
            lambda _module, args: captured.append(args[0])
        )
        try:
            logits = self.model(**inputs).logits
        finally:
            handle.remove()
        return logits, captured[0]


def _example(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of 2 × 8 tokens whose second row is padded, so that the traced graph keeps the mask."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 100) or 100)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, 8), generator=generator)
    attention_mask = torch.ones((2, 8), dtype=torch.long)
    attention_mask[1, 5:] = 0
    return input_ids, attention_mask, torch.zeros((2, 8), dtype=torch.long)


def _export(model: torch.nn.Module, path: Path, *, head: bool, opset: int) -> None:
    import warnings

    outputs = ["logits", "pooled"] if head else ["pooled"]
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes.update({name: {0: "batch"} for name in outputs})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings (see docstring)
        torch.onnx.export(
            _Graph(model, head), _example(model), str(path), dynamo=False, opset_version=opset,
            input_names=list(INPUTS), output_names=outputs, dynamic_axes=axes, do_constant_folding=True,
        )  # fmt: skip


def _quantise(source: Path, target: Path) -> None:
    _onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger()  # quantize_dynamic logs advice on pre-processing through the root logger
    level = quiet.level
    quiet.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(
            str(source), str(target),
            weight_type=getattr(QuantType, str(QUANTISATION["weight_type"])),
            per_channel=bool(QUANTISATION["per_channel"]), reduce_range=bool(QUANTISATION["reduce_range"]),
        )  # fmt: skip
    finally:
        quiet.setLevel(level)


def _write(path: Path, make: Any) -> None:
    """`make(tmp)` writes a temp file beside `path`, renamed to `path` once complete."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.onnx")
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _prune(folder: Path, keep: int) -> None:
    """Keep the `keep` most recently used graphs of `folder`."""

    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile by another process
            return 0.0

    files = sorted((f for f in folder.glob("*.onnx") if not f.name.startswith(".")), key=used, reverse=True)
    for old in files[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()


_export_lock = threading.Lock()


def export_onnx(
    model: torch.nn.Module,
    *,
    quantize: bool = False,
    head: bool = True,
    cache_dir: str | Path | None = None,
    opset: int = OPSET,
    keep: int = CACHE_KEEP,
) -> Path:
    """The ONNX file of `model` (`scores` graph with `head`, else `pooled`), int8 if `quantize`:
    from the cache, or exported (and quantised) into it now."""
    check_runtime("onnx-int8" if quantize else "onnx")
    graph = "scores" if head else "pooled"
    ready = prepared(model, head=head)
    key = fingerprint(ready, graph=graph, opset=opset)[:40]
    folder = cache_root(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / f"{graph}-{key}.onnx"
    suffix = hashlib.sha256(repr(sorted(QUANTISATION.items())).encode()).hexdigest()[:8]
    target = folder / f"{graph}-{key}-int8-{suffix}.onnx" if quantize else fp32
    with _export_lock:
        if not target.exists():
            if not fp32.exists():
                log.info("exporting the %s graph to ONNX (%s): once per model", graph, fp32.name)
                _write(fp32, lambda tmp: _export(ready, tmp, head=head, opset=opset))
            if quantize:
                log.info("quantising %s to int8 weights", fp32.name)
                _write(target, lambda tmp: _quantise(fp32, tmp))
            _prune(folder, max(keep, 2))  # never the pair just written
        for used in {fp32, target}:
            if used.exists():
                os.utime(used)  # most recently used: pruned last
    return target


class Encodings(Protocol):
    """`client.ingest.encoded.Encoded`'s interface: its length and model inputs for some of its rows."""

    def __len__(self) -> int: ...

    def inputs(self, rows: torch.Tensor | slice, device: torch.device) -> Mapping[str, torch.Tensor]: ...


class OnnxRunner:
    """An InferenceSession on the CPU with `threads` intra-op threads (0: onnxruntime's default, one
    per physical core). `run` takes the tokenizer's output (torch tensors or numpy arrays); inputs the
    graph wants but the batch lacks get BERT's defaults (token types 0, mask 1). Thread-safe."""

    def __init__(self, path: str | Path, *, threads: int = 0) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        self.path, self.threads = Path(path), threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, batch: Mapping[str, Any], output: str = "logits") -> np.ndarray:
        """`output` (logits or pooled) of the batch, float32, one row per example."""
        ids = _array(batch["input_ids"])
        feeds: dict[str, np.ndarray] = {}
        for name in self.inputs:
            if name in batch and batch[name] is not None:
                feeds[name] = _array(batch[name])
            elif name == "attention_mask":
                feeds[name] = np.ones_like(ids)
            else:
                feeds[name] = np.zeros_like(ids)
        return np.asarray(self.session.run([output], feeds)[0], dtype=np.float32)

    def probabilities(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Class probabilities as `client.evaluation.predict.score` computes them from eager logits."""
        return torch.softmax(torch.from_numpy(self.run(batch, "logits")), dim=-1)


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu").numpy()
    return np.ascontiguousarray(value, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def cached_runner(path: Path, threads: int = 0) -> OnnxRunner:
    """One session per (file, threads) in this process (a file's name is its content's key); building
    one costs ~0.5 s for MiniLM."""
    return OnnxRunner(path, threads=threads)


def onnx_runner(
    model: torch.nn.Module,
    runtime: str = "onnx",
    *,
    threads: int = 0,
    cache_dir: str | Path | None = None,
) -> OnnxRunner:
    """A runner of `model`'s `scores` graph (logits and pooled) for `runtime` (onnx or onnx-int8)."""
    if check_runtime(runtime) == "torch":
        raise ValueError("onnx_runner runs an ONNX runtime: onnx or onnx-int8")
    path = export_onnx(model, quantize=runtime == "onnx-int8", cache_dir=cache_dir)
    return OnnxRunner(path, threads=threads)


def onnx_pooled_features(
    model: torch.nn.Module,
    encoded: Encodings | Mapping[str, torch.Tensor],
    *,
    rows: torch.Tensor | None = None,
    chunk: int = 256,
    quantize: bool = False,
    threads: int = 0,
    cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """What `model`'s head reads for `rows` of `encoded` (None: every row), N × hidden, float32, on
    the CPU, computed by ONNX Runtime `chunk` rows per call: the values `client.training.features.head_inputs`
    computes eagerly (eval mode) within 1e-4 in float32 (int8 with `quantize`: see RUNTIMES).

    `encoded`: a `client.ingest.encoded.Encoded` (anything with `len` and `inputs(rows, device)`) or the
    tokenizer's output. The graph (backbone and pooling, no head) is cached by the backbone's weights,
    so a head that changes every round exports nothing again; its session is kept in this process."""
    path = export_onnx(model, quantize=quantize, head=False, cache_dir=cache_dir)
    runner = cached_runner(path, threads)
    cpu = torch.device("cpu")

    def inputs(part: torch.Tensor | slice) -> Mapping[str, Any]:
        if isinstance(encoded, Mapping):
            return {k: v[part] for k, v in encoded.items() if k in INPUTS}
        return encoded.inputs(part, cpu)

    total = int(encoded["input_ids"].shape[0]) if isinstance(encoded, Mapping) else len(encoded)
    count = total if rows is None else len(rows)
    parts = []
    for start in range(0, count, chunk):
        part = slice(start, start + chunk) if rows is None else rows[start : start + chunk]
        parts.append(torch.from_numpy(runner.run(inputs(part), "pooled")))
    if not parts:
        width = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
        return torch.zeros((0, width))
    return torch.cat(parts)
