"""A random-weight GGUF with the shape of a 7-14B model, for throughput runs without a model hub.

    python bench/random_gguf.py --out /tmp/random-14b.gguf [--preset qwen2.5-14b] [--tokenizer MODEL.gguf]

Speed on a GPU depends on the shapes and the quantisation type of the weights, not on their
values, so a model with random 4-bit weights of a real architecture's dimensions measures
prefill, decode and batching faithfully. Its answers are nonsense, but the JSON-schema grammar
keeps them valid, so the whole pipeline runs. The tokenizer (vocabulary, merges, chat template) is
copied from a real GGUF (the default model, or a tokenizer-only GGUF that
scripts/make_device_kit.sh cuts from one) and padded with unused tokens to the preset's
vocabulary size, so the embedding and output matrices have their real sizes too.

Every weight matrix is written as Q4_K blocks made directly of random bytes with small fixed
scales: no float copy of the model is ever built, and tensors are cut from one pool of random
blocks drawn once, so writing a 14B file is bound by the disk, not by the random generator.
(A real Q4_K_M file keeps the output matrix and some layers in Q6_K; this one is slightly smaller.)
Architecture: `llama` (the same matrix shapes as Qwen2.5 and Llama 3, without Qwen's q/k/v biases).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
Q4_K_BLOCK_ELEMENTS, Q4_K_BLOCK_BYTES = 256, 144  # ggml's block_q4_K: d, dmin (f16), scales[12], qs[128]
UNUSED_TOKEN_TYPE = 5  # llama.cpp's LLAMA_TOKEN_TYPE_UNUSED


@dataclass(frozen=True)
class Preset:
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int  # 0: the tokenizer's own size
    rope_base: float
    n_ctx_train: int = 32768


PRESETS = {
    "qwen2.5-14b": Preset(5120, 13824, 48, 40, 8, 152064, 1_000_000.0),
    "qwen2.5-7b": Preset(3584, 18944, 28, 28, 4, 152064, 1_000_000.0),
    "llama3-8b": Preset(4096, 14336, 32, 32, 8, 128256, 500_000.0, 8192),
    "tiny": Preset(256, 512, 2, 4, 2, 0, 10_000.0, 8192),  # for tests on a CPU
}


def tokenizer_fields(path: Path) -> list[tuple[str, object, object, object]]:
    """(key, value, type, array element type) of every tokenizer.* field of a GGUF."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    fields = []
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        fields.append((name, field.contents(), vtype, sub))
    return fields


# Random blocks are drawn once into a pool and tensors are cut from it cyclically: drawing 8 GiB of
# random bytes for a 14B file took most of its minute, and speed does not depend on the values. The
# pool's block count is prime, so no two rows of a matrix start at the same place in it.
POOL_BLOCKS = 262_147


def q4k_blocks(pool: np.ndarray, start: int, n_blocks: int, scale: float) -> np.ndarray:
    """n_blocks random Q4_K blocks from the pool (from block `start` on, wrapping): random 4-bit
    values and 6-bit sub-scales, fixed small d and dmin."""
    start %= len(pool)
    if start + n_blocks <= len(pool):
        blocks = pool[start : start + n_blocks].copy()
    else:
        blocks = pool[(start + np.arange(n_blocks, dtype=np.int64)) % len(pool)]
    halves = np.array([scale, scale / 4], dtype=np.float16).view(np.uint8)
    blocks[:, :4] = halves  # d, dmin: finite and small, so activations stay finite
    return blocks


def write(out: Path, preset: Preset, tokenizer: Path, seed: int = 0) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter

    fields = tokenizer_fields(tokenizer)
    values = {name: value for name, value, _, _ in fields}
    n_tok = len(values["tokenizer.ggml.tokens"])
    n_vocab = preset.n_vocab or n_tok
    if n_vocab < n_tok:
        raise SystemExit(f"preset vocabulary {n_vocab} is smaller than the tokenizer's {n_tok}")
    for dim in (preset.n_embd, preset.n_ff):
        if dim % Q4_K_BLOCK_ELEMENTS:
            raise SystemExit(f"dimension {dim} is not a multiple of {Q4_K_BLOCK_ELEMENTS} (Q4_K blocks)")
    pad = n_vocab - n_tok

    writer = GGUFWriter(str(out), "llama")
    writer.add_name(f"random-{out.stem}")
    writer.add_context_length(preset.n_ctx_train)
    writer.add_embedding_length(preset.n_embd)
    writer.add_feed_forward_length(preset.n_ff)
    writer.add_block_count(preset.n_layer)
    writer.add_head_count(preset.n_head)
    writer.add_head_count_kv(preset.n_head_kv)
    writer.add_rope_freq_base(preset.rope_base)
    writer.add_rope_dimension_count(preset.n_embd // preset.n_head)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M: what the file stands in for
    for name, value, vtype, sub in fields:
        if pad and name == "tokenizer.ggml.tokens":
            value = [*value, *(f"<|random_pad_{i}|>" for i in range(pad))]
        elif pad and name == "tokenizer.ggml.token_type":
            value = [*value, *([UNUSED_TOKEN_TYPE] * pad)]
        elif pad and name == "tokenizer.ggml.scores":
            value = [*value, *([0.0] * pad)]
        writer.add_key_value(name, value, vtype, sub_type=sub)

    head_dim = preset.n_embd // preset.n_head
    n_embd_kv = head_dim * preset.n_head_kv
    matrices = [("token_embd.weight", preset.n_embd, n_vocab)]
    for i in range(preset.n_layer):
        matrices += [
            (f"blk.{i}.attn_q.weight", preset.n_embd, preset.n_embd),
            (f"blk.{i}.attn_k.weight", preset.n_embd, n_embd_kv),
            (f"blk.{i}.attn_v.weight", preset.n_embd, n_embd_kv),
            (f"blk.{i}.attn_output.weight", preset.n_embd, preset.n_embd),
            (f"blk.{i}.ffn_gate.weight", preset.n_embd, preset.n_ff),
            (f"blk.{i}.ffn_up.weight", preset.n_embd, preset.n_ff),
            (f"blk.{i}.ffn_down.weight", preset.n_ff, preset.n_embd),
        ]
    matrices.append(("output.weight", preset.n_embd, n_vocab))
    norms = ["output_norm.weight"]
    for i in range(preset.n_layer):
        norms += [f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"]

    # ne0 (the row length) is the input dimension; GGUF's numpy-order byte shape is (rows, bytes).
    def byte_shape(ne0: int, ne1: int) -> tuple[int, int]:
        return ne1, ne0 // Q4_K_BLOCK_ELEMENTS * Q4_K_BLOCK_BYTES

    for name, ne0, ne1 in matrices:
        rows, width = byte_shape(ne0, ne1)
        writer.add_tensor_info(name, (rows, width), np.dtype(np.uint8), rows * width, GGMLQuantizationType.Q4_K)
    for name in norms:
        writer.add_tensor_info(name, (preset.n_embd,), np.dtype(np.float32), 4 * preset.n_embd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=(POOL_BLOCKS, Q4_K_BLOCK_BYTES), dtype=np.uint8)
    start = 0
    for _name, ne0, ne1 in matrices:
        rows, width = byte_shape(ne0, ne1)
        n_blocks = rows * width // Q4_K_BLOCK_BYTES
        # Scale so that a row's dot product with a unit-RMS input stays near 1 whatever ne0 is.
        writer.write_tensor_data(q4k_blocks(pool, start, n_blocks, 0.3 / (ne0**0.5) / 8).reshape(rows, width))
        start = (start + n_blocks) % POOL_BLOCKS
    for _ in norms:
        writer.write_tensor_data(np.ones(preset.n_embd, dtype=np.float32))
    writer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-14b")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="GGUF to copy the tokenizer from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--own-vocab",
        action="store_true",
        help="keep the tokenizer's own vocabulary size (no padding), e.g. Gemma 3's 262k tokens",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.own_vocab:
        preset = replace(preset, n_vocab=0)
    path = write(args.out, preset, args.tokenizer, args.seed)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB, preset {args.preset})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
