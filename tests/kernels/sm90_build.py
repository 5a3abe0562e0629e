"""Builds every Triton kernel for sm_90 (H100 / H200) on a machine without a GPU.

The CPU interpreter runs the kernels but skips the compiler's rules (a global that is not a
`tl.constexpr(...)`, a dot whose dims are under 16, a type mismatch in a loop), so a kernel can
pass every CPU test and still fail to build on the GPU. tests/test_kernel_build.py runs this in a
process without TRITON_INTERPRET:

    python -m tests.kernels.sm90_build
"""

from __future__ import annotations

import inspect
import time

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from pagedllm.kernels import (activation, fused_moe, gemv, gguf_gemm, int_gemm, lora, norm, paged_attention, quant_rows,
                              rope_kv_write, sampling, scaled_gemm)

SM90 = GPUTarget("cuda", 90, 32)


def build(fn, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int = 3) -> None:
    """Compile `fn` to a cubin; parameters not named in `types` or `constexprs` are int32 scalars.
    Kernels with programmatic dependent launch are built with it on, as on the GPU."""
    pdl = "USE_PDL" in fn.arg_names
    constexprs = {**constexprs, "USE_PDL": True} if pdl else constexprs
    # Optional constants (a sliding window, a soft cap) left out take their defaults, as a launch without them does.
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty},
                  **constexprs}
    signature = {name: types.get(name, "i32") for name in fn.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    options = {"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": pdl}
    compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=SM90, options=options)


def attention_builds() -> list[tuple[str, callable]]:
    pa = paged_attention
    builds = []
    # (q dtype, KV cache dtype): 16-bit and float32 caches, and the float8 one (--kv-cache-dtype fp8) under both
    for dt, kv, prec in (("bf16", "bf16", "tf32"), ("fp32", "fp32", "ieee"),
                         ("bf16", "fp8e4nv", "tf32"), ("fp32", "fp8e4nv", "ieee")):
        io = {"q_ptr": f"*{dt}", "kv_cache": f"*{kv}", "out_ptr": f"*{dt}", "block_tables": "*i32", "seq_lens": "*i32",
              "query_start_loc": "*i32", "qk_scale": "fp32", "v_scale": "fp32", "common_prefix": "*i32",
              "part_m": "*fp32", "part_l": "*fp32", "part_acc": "*fp32"}
        tile_n = 64 if dt == "bf16" else 32
        if kv != dt:
            dt = f"{dt} q, {kv} KV cache"
        # decode tiles, prompt tiles, a padded head dim; float32 (the GPU oracle runs) only its prompt tiles
        # and decode tiles after the shared-prefix kernel (the float32 oracle runs them too)
        shapes = ((16, 1, 128, False), (128, 32, 128, False), (64, 16, 80, False), (16, 1, 128, True))
        if dt.startswith("fp32"):
            shapes = ((64, 16, 128, False), (16, 1, 128, True))
        for block_m, block_q, head_d, after_prefix in shapes:
            consts = dict(QPK=4, HEAD_D=head_d, HEAD_D_PAD=128, BLOCK_SIZE=16, BLOCK_M=block_m, BLOCK_Q=block_q,
                          TILE_N=tile_n, PREC=prec, UPCAST=False, AFTER_PREFIX=after_prefix)
            builds.append((f"unified {dt} block_m {block_m} head_dim {head_d}" + (" after a shared prefix" if after_prefix else ""),
                           lambda io=io, c=consts, w=4 if block_m <= 16 else 8: build(pa._unified_attention_kernel, io, c, w)))
        consts = dict(QPK=4, HEAD_D=128, HEAD_D_PAD=128, BLOCK_SIZE=16, BLOCK_M=128 if dt == "bf16" else 64,
                      TILE_N=tile_n, PREC=prec, UPCAST=False)
        builds.append((f"shared prefix {dt}", lambda io=io, c=consts: build(pa._shared_prefix_kernel, io, c, 8)))
        consts = dict(NUM_HEADS=32, QPK=4, HEAD_D=128, HEAD_D_PAD=128, BLOCK_SIZE=16, BLOCK_M=16, TILE_N=tile_n,
                      MIN_PARTITION=pa._MIN_PARTITION, PREC=prec, UPCAST=False)
        builds.append((f"split-KV {dt}", lambda io=io, c=consts: build(pa._split_kv_decode_kernel, io, c, 4)))
        consts = dict(NUM_HEADS=32, HEAD_D=128, HEAD_D_PAD=128, TILE_N=tile_n, MIN_PARTITION=pa._MIN_PARTITION)
        if dt == "bf16":  # the merge reads float32 partials whatever the model's and the cache's dtypes
            builds.append((f"split-KV merge {dt}", lambda io=io, c=consts: build(pa._split_kv_merge_kernel, io, c, 1)))
    return builds + windowed_attention_builds()


def windowed_attention_builds() -> list[tuple[str, callable]]:
    """The sliding-window and soft-cap variants (Mistral, Gemma 2/3) of every attention path, in bf16."""
    pa = paged_attention
    io = {"q_ptr": "*bf16", "kv_cache": "*bf16", "out_ptr": "*bf16", "block_tables": "*i32", "seq_lens": "*i32",
          "query_start_loc": "*i32", "qk_scale": "fp32", "v_scale": "fp32", "common_prefix": "*i32",
          "part_m": "*fp32", "part_l": "*fp32", "part_acc": "*fp32"}
    base = dict(QPK=4, HEAD_D=128, HEAD_D_PAD=128, BLOCK_SIZE=16, PREC="tf32", UPCAST=False)
    builds = []
    for window, cap in ((4096, 0.0), (4096, 50.0), (0, 50.0)):
        opts = dict(WINDOW=window, SOFT_CAP=cap)
        name = f"window {window} soft cap {cap}"
        for block_m, block_q, after_prefix in ((16, 1, False), (128, 32, False), (16, 1, True)):
            c = dict(base, BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=64 if block_q == 1 else 32, AFTER_PREFIX=after_prefix, **opts)
            builds.append((f"unified bf16 block_m {block_m} {name}" + (" after a shared prefix" if after_prefix else ""),
                           lambda c=c, w=4 if block_m <= 16 else 8: build(pa._unified_attention_kernel, io, c, w)))
        c = dict(base, BLOCK_M=128, TILE_N=64, **opts)
        builds.append((f"shared prefix bf16 {name}", lambda c=c: build(pa._shared_prefix_kernel, io, c, 8)))
        c = dict(base, NUM_HEADS=32, BLOCK_M=16, TILE_N=64, MIN_PARTITION=pa._MIN_PARTITION, **opts)
        builds.append((f"split-KV bf16 {name}", lambda c=c: build(pa._split_kv_decode_kernel, io, c, 4)))
        c = dict(NUM_HEADS=32, HEAD_D=128, HEAD_D_PAD=128, TILE_N=64, MIN_PARTITION=pa._MIN_PARTITION, WINDOW=window)
        builds.append((f"split-KV merge {name}", lambda c=c: build(pa._split_kv_merge_kernel, io, c, 1)))
    # Per-query key limits (Gemma 3's bidirectional image tokens): prompt tiles, with and without a window.
    limited = dict(io, key_limits="*i32")
    for window in (0, 1024):
        c = dict(base, BLOCK_M=128, BLOCK_Q=32, TILE_N=32, AFTER_PREFIX=False, WINDOW=window, SOFT_CAP=0.0,
                 KEY_LIMITS=True)
        builds.append((f"unified bf16 key limits window {window}",
                       lambda c=c: build(pa._unified_attention_kernel, limited, c, 8)))
    return builds


def other_builds() -> list[tuple[str, callable]]:
    builds = []
    for dt in ("bf16",):  # these kernels' code does not depend on the dtype
        types = {"logits_ptr": f"*{dt}", "inv_temp_ptr": "*fp32", "noise_ptr": "*fp32", "seed_ptr": "*i64",
                 "thresh_ptr": "*fp32", "best_val_ptr": "*fp32", "best_idx_ptr": "*i32"}
        for has_thresh, greedy in ((False, False), (True, False), (False, True)):
            consts = dict(HAS_THRESH=has_thresh, GREEDY=greedy, BLOCK=sampling._BLOCK, MIN_U=sampling._MIN_U, NO_INDEX=sampling._NO_INDEX)
            builds.append((f"gumbel-max {dt} thresholds={has_thresh} greedy={greedy}",
                           lambda t=types, c=consts: build(sampling._gumbel_max_kernel, t, c, 4)))
        types = {"x_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": f"*{dt}", "res_out_ptr": f"*{dt}",
                 "scale_ptr": "*fp32", "eps": "fp32"}
        for has_res in (False, True):
            builds.append((f"rms_norm {dt} residual={has_res}", lambda t=types, r=has_res: build(
                norm._rms_norm_kernel, t, dict(HAS_RES=r, QUANT=False, EXACT=False, BLOCK=4096), 8)))
        for gelu in (False, True):
            builds.append((f"silu_and_mul {dt} gelu={gelu}", lambda d=dt, g=gelu: build(
                activation._silu_and_mul_kernel, {"x_ptr": f"*{d}", "out_ptr": f"*{d}"}, dict(BLOCK=1024, GELU=g), 4)))
        for kv, has_norm in ((dt, False), (dt, True), ("fp8e4nv", False)):
            types = {"qkv_ptr": f"*{dt}", "q_out_ptr": f"*{dt}", "pos_ptr": "*i64", "cos_sin_ptr": "*fp32",
                     "q_w_ptr": f"*{dt}", "k_w_ptr": f"*{dt}", "k_cache": f"*{kv}", "v_cache": f"*{kv}", "slot_ptr": "*i64", "eps": "fp32",
                     "k_inv_scale": "fp32", "v_inv_scale": "fp32"}
            consts = dict(HAS_NORM=has_norm, HEAD_D=128, HALF=64, HALF_PAD=64, REST=0, REST_PAD=1, D_PAD=128,
                          BLOCK_SIZE=16, BLOCK_HQ=32, BLOCK_HK=8, EXACT_FP8=False)
            builds.append((f"rope_kv_write {dt} qk_norm={has_norm} {kv} KV cache",
                           lambda t=types, c=consts: build(rope_kv_write._rope_kv_write_kernel, t, c, 4)))
        # 16-bit weights (no scale pointer: the code of before the fp8 variant), and fp8 ones with per-row scales
        for w_dt, has_scale in ((dt, False), ("fp8e4nv", True)):
            types = {"x_ptr": f"*{dt}", "w_ptr": f"*{w_dt}", "b_ptr": f"*{dt}", "s_ptr": "*fp32", "out_ptr": f"*{dt}"}
            for rows, block_k in ((1, 512), (4, 256)):
                consts = dict(M_PAD=1 if rows == 1 else 16, HAS_BIAS=True, HAS_SCALE=has_scale, EVEN_K=False,
                              BLOCK_N=16, BLOCK_K=block_k, PREC="tf32", UPCAST=False, z_ptr=None, BITS=0,
                              GROUP_SIZE=0, GROUP_MODE=0)
                if not has_scale:
                    consts["s_ptr"] = None
                builds.append((f"gemv {dt} x {w_dt} weight {rows} rows",
                               lambda t=types, c=consts: build(gemv._gemv_kernel, t, c, 4)))
        builds.append((f"gemv split sums {dt}", lambda d=dt: build(
            gemv._sum_splits_kernel, {"part_ptr": "*fp32", "b_ptr": f"*{d}", "out_ptr": f"*{d}"}, dict(SPLITS=4, HAS_BIAS=True, BLOCK=1024), 4)))
    builds += eight_bit_builds()
    for dt, x_dt, add in (("bf16", "bf16", False), ("bf16", "fp32", True)):  # the shrink, then the expand
        types = {"x_ptr": f"*{x_dt}", "w_ptr": f"*{dt}", "out_ptr": "*fp32" if not add else f"*{dt}", "order_ptr": "*i64",
                 "slot_ptr": "*i64", "start_ptr": "*i64", "length_ptr": "*i64"}
        consts = dict(ADD=add, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, PREC="tf32", UPCAST=False)
        builds.append((f"lora sgmv {'expand' if add else 'shrink'}", lambda t=types, c=consts: build(lora._sgmv_kernel, t, c, 4)))
        types = {"x_ptr": f"*{x_dt}", "w_ptr": f"*{dt}", "out_ptr": "*fp32" if not add else f"*{dt}", "slots_ptr": "*i64"}
        consts = dict(ADD=add, X_SPLITS=8 if add else 1, BLOCK_N=64, BLOCK_K=128)
        builds.append((f"lora bgmv {'expand' if add else 'shrink (split K)'}",
                       lambda t=types, c=consts: build(lora._bgmv_kernel, t, c, 4)))
    builds += int_weight_builds()
    builds += gguf_builds()
    builds += moe_builds()
    for dt, shift in (("bf16", 16), ("fp32", 0)):  # raw bf16 logits, or the float32 copy after logit edits
        types = {"logits_ptr": f"*{dt}", "inv_temp_ptr": "*fp32", "top_k_ptr": "*i32", "top_p_ptr": "*fp32",
                 "min_p_ptr": "*fp32", "thresh_ptr": "*fp32"}
        consts = dict(SHIFT=shift, BLOCK=sampling._FILTER_BLOCK, POINTS=sampling._POINTS)
        builds.append((f"filter thresholds {dt}", lambda t=types, c=consts: build(sampling._filter_threshold_kernel, t, c, 8)))
    return builds


def eight_bit_builds() -> list[tuple[str, callable]]:
    """Activation quantization to fp8 and int8 (per token, per 128-column group, after RMSNorm and SiLU-and-mul) and
    the scaled GEMM's tiles (fp8 block-wise and row-wise, int8 row-wise)."""
    builds = []
    for q in ("fp8e4nv", "i8"):
        for group, block in ((0, 4096), (128, 128)):
            builds.append((f"quantize rows to {q} group={group}", lambda g=group, b=block, q=q: build(
                quant_rows._quantize_rows_kernel, {"x_ptr": "*bf16", "q_ptr": f"*{q}", "s_ptr": "*fp32"},
                dict(GROUP=g, BLOCK=b, EXACT=False), 8)))
        builds.append((f"silu_and_mul {q} out", lambda q=q: build(
            activation._silu_and_mul_quant_kernel, {"x_ptr": "*bf16", "q_ptr": f"*{q}", "s_ptr": "*fp32"},
            dict(BLOCK=2048, EXACT=False), 8)))
        builds.append((f"rms_norm {q} out", lambda q=q: build(norm._rms_norm_kernel, {
            "x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": f"*{q}", "res_out_ptr": "*bf16",
            "scale_ptr": "*fp32", "eps": "fp32"}, dict(HAS_RES=True, QUANT=True, EXACT=False, BLOCK=4096), 8)))
    for q, scalings in (("fp8e4nv", (False, True)), ("i8", (False,))):
        types = {"a_ptr": f"*{q}", "as_ptr": "*fp32", "w_ptr": f"*{q}", "ws_ptr": "*fp32", "b_ptr": "*bf16",
                 "out_ptr": "*bf16"}
        for rows in (16, 4096):
            cfg = scaled_gemm.default_config(rows)
            for block_scales in scalings:
                consts = dict(BLOCK_SCALES=block_scales, HAS_BIAS=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                              BLOCK_K=128, GROUP_M=8, UPCAST=False)
                builds.append((f"scaled gemm {q} {rows} rows block scales={block_scales}", lambda c=consts, g=cfg, t=types:
                               build(scaled_gemm._scaled_gemm_kernel, t, c, g["num_warps"], g["num_stages"])))
    return builds


def int_weight_builds() -> list[tuple[str, callable]]:
    """4- and 8-bit weights: the GEMV variant (one row, groups of 128 in 512-column tiles; several rows, a group per
    tile; per channel, whose group is past every column) and the GEMM (decode- and prefill-sized tiles, and one whose
    tiles gather a scale per column), for both 16-bit activation dtypes."""
    builds = []
    for dt in ("bf16", "fp16"):
        for bits in (4, 8):
            types = {"x_ptr": f"*{dt}", "w_ptr": "*i32", "b_ptr": f"*{dt}", "s_ptr": f"*{dt}", "z_ptr": "*u8",
                     "out_ptr": f"*{dt}"}
            for rows, block_n, block_k, group, mode, warps in ((1, 16, 512, 128, 1, 4), (1, 16, 1024, 1 << 30, 0, 8),
                                                               (4, 64, 128, 128, 0, 4)):
                consts = dict(M_PAD=1 if rows == 1 else 16, HAS_BIAS=True, HAS_SCALE=False, EVEN_K=True,
                              BLOCK_N=block_n, BLOCK_K=block_k, PREC="tf32", UPCAST=False, BITS=bits,
                              GROUP_SIZE=group, GROUP_MODE=mode)
                builds.append((f"gemv {dt} x int{bits} weight {rows} rows BLOCK_K {block_k} group mode {mode}",
                               lambda t=types, c=consts, w=warps: build(gemv._gemv_kernel, t, c, w, 4)))
            for bm, bn, bk, group, mode, even, warps, stages in ((16, 64, 128, 128, 0, True, 4, 4),
                                                                 (128, 128, 64, 128, 0, False, 8, 3),
                                                                 (64, 64, 64, 48, 2, False, 4, 3)):
                consts = dict(BITS=bits, GROUP_SIZE=group, GROUP_MODE=mode, HAS_BIAS=True, EVEN_K=even, BLOCK_M=bm,
                              BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PREC="tf32", UPCAST=False)
                builds.append((f"int gemm {dt} x int{bits} weight {bm}x{bn}x{bk} group mode {mode}", lambda t=types,
                               c=consts, w=warps, st=stages: build(int_gemm._int_gemm_kernel, t, c, w, st)))
    return builds


def gguf_builds() -> list[tuple[str, callable]]:
    """GGUF blocks (pagedllm/kernels/gguf_gemm.py), bf16 rows: every type's GEMV at one row (FMAs) and at several (the
    dot) and its decode-sized GEMM tile; Q4_K and Q6_K (Q4_K_M files' types) also the prefill tile, and Q4_K fp16 rows
    and a ragged K (masked block loads)."""
    builds = []
    for qtype in gguf_gemm._SHAPES:
        consts = gguf_gemm._consts(qtype)
        qk, name = consts["QK"], gguf_gemm.NAMES[qtype]
        main = name in ("Q4_K", "Q6_K")
        for dt in ("bf16", "fp16") if name == "Q4_K" else ("bf16",):
            types = {"x_ptr": f"*{dt}", "w_ptr": "*u8", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
            gemvs = ((1, 16, 1024, 8, True), (4, 32, 256, 4, True), (1, 8, 512, 4, False))
            for rows, bn, bk, warps, even in gemvs if name == "Q4_K" else gemvs[:2]:
                c = dict(consts, M_PAD=1 if rows == 1 else 16, HAS_BIAS=True, EVEN_K=even, BLOCK_N=bn,
                         NB=max(bk, qk) // qk, PREC="tf32", UPCAST=False)
                builds.append((f"gguf gemv {dt} x {name} {rows} rows BLOCK_K {bk}" + ("" if even else " ragged K"),
                               lambda t=types, c=c, w=warps: build(gguf_gemm._gguf_gemv_kernel, t, c, w)))
            for bm, bn, bk, warps in ((16, 64, 256, 4), (128, 64, 256, 8))[: 2 if main and dt == "bf16" else 1]:
                c = dict(consts, HAS_BIAS=True, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, NB=max(bk, qk) // qk, GROUP_M=8,
                         PREC="tf32", UPCAST=False)
                builds.append((f"gguf gemm {dt} x {name} {bm}x{bn}x{bk}",
                               lambda t=types, c=c, w=warps: build(gguf_gemm._gguf_gemm_kernel, t, c, w)))
    return builds


def moe_builds() -> list[tuple[str, callable]]:
    """The fused MoE's two grouped GEMMs with each of `moe_config`'s guessed tiles (bf16; ragged K once) and float32
    (the GPU oracle runs)."""
    builds = []
    tiles = {tuple(fused_moe.moe_config(t, 128, 768, 2048, 8).values()) for t in (1, 512, 2048, 4096)}
    cases = [("bf16", "tf32", t, True) for t in sorted(tiles)] + [("bf16", "tf32", (16, 64, 128, 4, 4), False),
                                                                  ("fp32", "ieee", (64, 64, 32, 4, 2), True)]
    for dt, prec, (bm, bn, bk, warps, stages), even in cases:
        types = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": f"*{dt}", "sorted_ptr": "*i32",
                 "expert_ptr": "*i32", "topk_w_ptr": "*fp32"}
        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=even, PREC=prec, UPCAST=False)
        name = f"{dt} {bm}x{bn}x{bk}" + ("" if even else " ragged K")
        builds.append((f"fused moe gate/up {name}", lambda t=types, c=consts, w=warps, st=stages: build(
            fused_moe._moe_gate_up_kernel, t, dict(c, TOP_K=8), w, st)))
        builds.append((f"fused moe down {name}", lambda t=types, c=consts, w=warps, st=stages: build(
            fused_moe._moe_down_kernel, t, c, w, st)))
    return builds


def main() -> None:
    for name, run in attention_builds() + other_builds():
        start = time.perf_counter()
        run()
        print(f"built {name} for sm_90 in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
