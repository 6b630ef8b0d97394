"""GPU companion of ``kakeya bench``: decode-step attention over the compressed cache, encode/decode GB/s.

Measured (median of timed repeats after a warm-up, synchronised around each call):

- decode-step attention latency of one Llama-3-8B-shaped layer (32 query / 8 KV heads, D = 128, one
  sequence) at 8k, 32k and 128k context: :func:`~kakeyaturbo.kernels.attention.compressed_decode_attention`
  over a ``kakeya-v2`` (3 bits) and a ``rotated-int`` int4 cache, against
  ``scaled_dot_product_attention`` over the bf16 cache, with the bytes each one reads;
- encode and decode GB/s (bf16 bytes of K) of ``kakeya-v2`` and rotated int4 for a 32-layer x 8-head
  x D=128 cache at 4k and 32k tokens (one codec call per layer, all its heads and chunks at once).

Every row names the device. Results go to ``<out>/gpu-<device>.json`` and ``.md`` in one go. Without
CUDA it refuses (:class:`~kakeyaturbo.errors.ConfigError`), except ``--smoke``: tiny shapes on
whatever device there is, to check the script end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from kakeyaturbo.bench import synthetic_kv
from kakeyaturbo.codecs.base import Codec
from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Codec
from kakeyaturbo.codecs.rotated_int import RotatedIntCodec, RotatedIntConfig
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.kernels.attention import CompressedSpan, LayerStore, compressed_decode_attention, segment_from_encoded
from kakeyaturbo.transforms.rope import Rope


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Benchmark geometry: one layer's heads, the contexts timed and the cache sizes encoded."""

    n_q: int
    n_kv: int
    dim: int
    layers: int
    chunk_tokens: int
    contexts: tuple[int, ...]
    cache_tokens: tuple[int, ...]
    repeats: int


FULL = Shapes(n_q=32, n_kv=8, dim=128, layers=32, chunk_tokens=512, contexts=(8192, 32768, 131072),
              cache_tokens=(4096, 32768), repeats=10)
SMOKE = Shapes(n_q=4, n_kv=2, dim=32, layers=2, chunk_tokens=64, contexts=(256, 512), cache_tokens=(128,),
               repeats=2)


def median_ms(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in milliseconds, one warm-up call, synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def codecs_for(shapes: Shapes, device: torch.device, streams: int) -> dict[str, Codec]:
    """The benchmarked K codecs: ``kakeya-v2`` at 3 bits calibrated on ``streams`` synthetic streams
    (one transform each), and rotated int4 (group 32)."""
    calib = synthetic_kv(streams, 1024, shapes.dim, seed=7).to(device)
    return {"kakeya-v2-3": KakeyaV2Codec.calibrate(calib, bits=3.0, stream="k"),
            "rotated-int4": RotatedIntCodec(RotatedIntConfig(bits=4))}


def to_chunks(x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """``[n_kv, T, D]`` -> the engine's head layout ``[T / C, n_kv, C, D]`` (``C`` divides ``T``)."""
    n_kv, t, d = x.shape
    return x.reshape(n_kv, t // chunk_tokens, chunk_tokens, d).transpose(0, 1).contiguous()


def llama_rope(shapes: Shapes, device: torch.device) -> Rope:
    """Llama-3's RoPE (theta 500000, half pairing) for the benchmark's head dim."""
    cfg = LlamaConfig(hidden_size=shapes.n_q * shapes.dim, num_attention_heads=shapes.n_q,
                      num_key_value_heads=shapes.n_kv, head_dim=shapes.dim, rope_theta=500000.0)
    return Rope(LlamaRotaryEmbedding(cfg).to(device), "half")


def attention_rows(shapes: Shapes, device: torch.device, name: str) -> list[dict[str, Any]]:
    """Decode-step latency per layer, compressed vs bf16 SDPA, per context.

    The compressed store reads one synthetic payload as both K and V. ``kakeya-v2`` keys are taken
    as pre-RoPE (RoPE applied per tile, as its recipes store them); rotated-int4 keys as post-RoPE
    (the query is rotated once and keys are never unrotated).
    """
    rows = []
    codecs = codecs_for(shapes, device, shapes.n_kv)
    q = torch.randn(shapes.n_q, shapes.dim, device=device, dtype=torch.bfloat16)
    rope = llama_rope(shapes, device)
    for ctx in shapes.contexts:
        kv = synthetic_kv(shapes.n_kv, ctx, shapes.dim, seed=ctx).to(device)
        k16 = kv.to(torch.bfloat16).unsqueeze(0)
        sdpa_ms = median_ms(lambda k=k16: F.scaled_dot_product_attention(
            q[None, :, None], k, k, enable_gqa=True), shapes.repeats, device)
        bf16_bytes = 2 * k16.numel() * k16.element_size()
        for cname, codec in codecs.items():
            enc = codec.encode(to_chunks(kv, shapes.chunk_tokens))
            seg = segment_from_encoded(enc, codec, shapes.n_kv)
            key_rope = rope if cname.startswith("kakeya") else None
            store = LayerStore(compressed=[CompressedSpan(seg, seg, 0)], rope=key_rope)
            ms = median_ms(lambda s=store: compressed_decode_attention(q, s), shapes.repeats, device)
            packed = 2 * enc.nbytes
            rows.append({"device": name, "bench": "decode_attention", "codec": cname, "context": ctx,
                         "ms": ms, "sdpa_bf16_ms": sdpa_ms, "speedup_vs_sdpa": sdpa_ms / ms,
                         "compressed_bytes": packed, "bf16_bytes": bf16_bytes,
                         "compressed_GBps": packed / ms / 1e6, "sdpa_GBps": bf16_bytes / sdpa_ms / 1e6})
        del kv, k16
    return rows


def codec_rows(shapes: Shapes, device: torch.device, name: str) -> list[dict[str, Any]]:
    """Encode/decode GB/s (bf16 bytes of K) of a ``layers x n_kv`` cache, one codec call per layer."""
    rows = []
    codecs = codecs_for(shapes, device, shapes.n_kv)
    for tokens in shapes.cache_tokens:
        layers = [to_chunks(synthetic_kv(shapes.n_kv, tokens, shapes.dim, seed=i).to(device), shapes.chunk_tokens)
                  for i in range(shapes.layers)]
        bf16_bytes = 2 * sum(x.numel() for x in layers)
        for cname, codec in codecs.items():
            encoded = [codec.encode(x) for x in layers]
            enc_ms = median_ms(lambda c=codec, xs=layers: [c.encode(x) for x in xs], shapes.repeats, device)
            dec_ms = median_ms(lambda c=codec, e=encoded: [c.decode(x) for x in e], shapes.repeats, device)
            rows.append({"device": name, "bench": "codec_throughput", "codec": cname, "tokens": tokens,
                         "layers": shapes.layers, "kv_heads": shapes.n_kv, "dim": shapes.dim,
                         "encode_ms": enc_ms, "decode_ms": dec_ms, "bf16_bytes": bf16_bytes,
                         "encode_GBps": bf16_bytes / enc_ms / 1e6, "decode_GBps": bf16_bytes / dec_ms / 1e6,
                         "ratio": bf16_bytes / sum(e.nbytes for e in encoded)})
        del layers
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Two Markdown tables (attention latency, codec throughput), the device in every row."""
    att = [r for r in rows if r["bench"] == "decode_attention"]
    thr = [r for r in rows if r["bench"] == "codec_throughput"]
    out = ["| device | codec | context | ms | bf16 SDPA ms | speedup | compressed GB/s | SDPA GB/s |",
           "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['device']} | {r['codec']} | {r['context']} | {r['ms']:.3f} | {r['sdpa_bf16_ms']:.3f} | "
            f"{r['speedup_vs_sdpa']:.2f} | {r['compressed_GBps']:.1f} | {r['sdpa_GBps']:.1f} |" for r in att]
    out += ["", "| device | codec | tokens | layers x heads | encode GB/s | decode GB/s | ratio |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {r['device']} | {r['codec']} | {r['tokens']} | {r['layers']} x {r['kv_heads']} | "
            f"{r['encode_GBps']:.2f} | {r['decode_GBps']:.2f} | {r['ratio']:.2f} |" for r in thr]
    return "\n".join(out) + "\n"


def device_name(device: torch.device) -> str:
    """Human-readable device name (the CUDA card's name, or ``cpu``)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run(out: Path, *, smoke: bool = False, device: str | None = None) -> list[dict[str, Any]]:
    """Run the benchmark and write ``out/gpu-<device>.json`` and ``.md``; returns the rows.

    Raises:
        ConfigError: no CUDA device and not ``smoke``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda" and not smoke:
        raise ConfigError(f"bench_gpu measures CUDA devices; got {dev} (no CUDA available: "
                          f"{not torch.cuda.is_available()}); use --smoke for a tiny CPU run")
    shapes = SMOKE if smoke else FULL
    name = device_name(dev)
    with torch.inference_mode():
        rows = attention_rows(shapes, dev, name) + codec_rows(shapes, dev, name)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() + ("-smoke" if smoke else "")
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{stem}.md").write_text(markdown(rows))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m kakeyaturbo.bench_gpu [--smoke] [--device D] [--out DIR]``."""
    p = argparse.ArgumentParser(prog="kakeyaturbo.bench_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device (an end-to-end check)")
    p.add_argument("--device", default=None, help="device (default: cuda when available)")
    p.add_argument("--out", type=Path, default=Path("benchmarks"), help="output folder")
    args = p.parse_args(argv)
    run(args.out, smoke=args.smoke, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
