"""The engines' Triton kernels compiled for Hopper (sm_90a) on a machine without a GPU (``scripts/kernel_report.py``):
every launch an 8B engine makes at batch 1 and 8 compiles with the Triton the GPU machine has, fits an SM without
spilling, uses the matrix instructions it is meant to, and compiles to one binary whatever the row count (the FP8
GEMM: one K loop, over wider tiles from 128 rows); so do the wider FP8 tilings the GPU sweep tries.

Needs Triton, which the CPU wheels of torch do not bring: skipped without it. ``.ci/run`` installs ``triton==3.6.0``
into a folder of its own and runs this file with it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kernel_report.py"
sys.path.insert(0, str(SCRIPT.parent))
import kernel_report  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "8b.json"
    p = subprocess.run([sys.executable, SCRIPT, "--shape", "8b", "--batches", "1,8", "--wide", "--check", "--out", out],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_launch_compiles_for_hopper_without_spills(report):
    launches = report["launches"]
    assert report["problems"] == [] and report["arch"] == 90
    # per batch size and step (decode, 32-token block): 4 projections x (quantization + GEMM), the head, attention
    kernels = {r["kernel"] for r in launches}
    assert kernels == {"_quant_kernel", "_gemm_kernel", "_gemm_tma_kernel", "_qk_norm_rope_kernel",
                       "_cache_write_kernel", "_split_kernel", "_merge_kernel"}
    for r in launches:
        assert r["registers"] > 0 and r["local_bytes"] == 0 and r["ctas_per_sm"] >= 1, r
        assert r["shared_bytes"] <= kernel_report.SM90["shared_cta"], r


def test_matrix_instructions_are_hoppers(report):
    """The FP8 GEMM runs e4m3 warpgroup MMAs (QGMMA) with its weight tile on the MMA's M side, the BF16 head bf16 ones
    (HGMMA), both fed by asynchronous copies (a software-pipelined loop; TMA loads in the ``triton-tma`` tiling);
    attention's 32-token query tile (128 rows at 8B) runs warpgroup MMAs in decode steps as in verify blocks."""
    for r in report["launches"]:
        if "fp8_matmul tma" in r["launch"]:  # the 8B projections have no K split: every one takes TMA loads
            assert r["kernel"] == "_gemm_tma_kernel" and set(r["mma"]) == {"QGMMA"}, r
            assert r["async_copies"].get("UTMALDG", 0) > 0 and "LDGSTS" not in r["async_copies"], r
        elif "fp8_matmul" in r["launch"] or r["launch"].startswith("wide "):
            assert set(r["mma"]) == {"QGMMA"} and r["async_copies"].get("LDGSTS", 0) > 0, r
        elif "invariant_linear" in r["launch"]:
            assert set(r["mma"]) == {"HGMMA"} and r["async_copies"].get("LDGSTS", 0) > 0, r
        elif r["kernel"] == "_split_kernel":
            assert set(r["mma"]) == {"HGMMA"}, r


def test_the_gpu_sweeps_wide_tilings_all_fit(report):
    """``scripts/sweep_linear.py --wide``'s candidates (64/128-row tiles, 64/128-channel weight tiles, 4/8 warps) at
    every 8B projection and 256 rows: each compiles, fits a CTA's shared memory and does not spill (six pipeline
    stages of the wider tiles did not fit: the sweep now takes as many as do)."""
    wide = [r for r in report["launches"] if r["launch"].startswith("wide ")]
    assert len(wide) == 4 * 8 and {r["constants"]["M_TILE"] for r in wide} == {64, 128}
    assert all(r["num_stages"] >= 3 for r in wide)


def test_one_binary_per_kernel_whatever_the_row_count(report):
    """A decode step (1 token a row, batch 1 or 8) and a 32-token block run the same binary of each kernel: the row
    count and the tokens per row are run-time arguments, never specializations. The FP8 GEMM alone takes a second
    binary at a batch of 8 (256 rows: 128-row tiles) with the same K loop as the first."""
    binaries = report["binaries"]
    gemm = {g: b for g, b in binaries.items() if g.startswith("_gemm_kernel:") and "fp8_matmul" in g}
    assert len(gemm) == 4 and all(len(b) == 2 for b in gemm.values()), gemm  # 32-row tiles, 128-row tiles
    # the cached split kernel: a lone row's binary writes the row's K/V itself (WRITE), a batch's does not
    split = "_split_kernel: cached attention"
    assert len(binaries[split]) == 2, binaries[split]
    assert all(len(b) == 1 for g, b in binaries.items() if g not in gemm and g != split), binaries
    assert all(len(k) == 1 for k in report["arithmetic"].values()), report["arithmetic"]
    assert {"_split_kernel: cached attention", "_merge_kernel: cached attention", "_qk_norm_rope_kernel: qk_norm_rope",
            "_gemm_kernel: down fp8_matmul [M, 12288] x [4096, 12288]"} <= set(binaries)
    for r in report["launches"]:  # the wide tiling at 256 rows only (a batch of 8's blocks), 32-row tiles below:
        if r["kernel"] == "_gemm_kernel" and " fp8_matmul [" in r["launch"]:  # the same k32 e4m3 MMAs, n 128 or 32
            rows = int(r["launch"].split("fp8_matmul [")[1].split(",")[0])
            tile = 128 if rows >= 128 else 32
            assert r["constants"]["M_TILE"] == tile, r
            assert set(r["mma_shapes"]) == {f"QGMMA.64x{tile}x32.F32.E4M3.E4M3"}, r
    for rows in (1, 8):  # a decode step and a verify block of as many rows: the same binaries
        decode, verify = ({r["binary"] for r in report["launches"]
                           if r["launch"] == f"S={rows} {step} attention (cached, 4096 keys)"}
                          for step in ("decode", "verify"))
        assert decode == verify and len(decode) == (2 if rows == 1 else 3), rows  # (cache write,) split, merge
    lone = {r["constants"]["WRITE"] for r in report["launches"] if r["kernel"] == "_split_kernel"
            and r["launch"].startswith("S=1 ") and r["constants"]["CAUSAL"]}
    assert lone == {True}


def test_several_binaries_and_spills_are_problems():
    """The checks can fail: two binaries in one group, two K loops of the GEMM in one group, two split kernels that
    differ in more than their lone-row loads and stores, a spill, an oversized CTA."""
    records = [{"kernel": "k", "group": "g", "binary": "a"}, {"kernel": "k", "group": "g", "binary": "b"},
               {"kernel": "k", "group": "h", "binary": "a"}]
    assert kernel_report.distinct_binaries(records) == {"k: g": ["a", "b"], "k: h": ["a"]}
    assert kernel_report.distinct_binaries(records, kernel_report.arithmetic) == {"k: g": ["a", "b"], "k: h": ["a"]}
    loop = {"BLOCK_K": 256, "K_PER_SPLIT": 4096, "SPLIT_K": 1, "SWAP": True, "SCALED": True}
    gemms = [{"kernel": "_gemm_kernel", "group": "g", "binary": b, "constants": {**loop, "M_TILE": m, **extra},
              "mma_shapes": {f"QGMMA.64x{m}x{k}.F32.E4M3.E4M3": 8}}
             for b, m, k, extra in (("a", 32, 32, {}), ("b", 128, 32, {}), ("c", 32, 32, {"BLOCK_K": 128}),
                                    ("d", 32, 16, {}))]
    arith = kernel_report.distinct_binaries(gemms, kernel_report.arithmetic)["_gemm_kernel: g"]
    assert len(kernel_report.distinct_binaries(gemms[:2], kernel_report.arithmetic)["_gemm_kernel: g"]) == 1
    assert len(arith) == 3 and '"mma": ["QGMMA.64xNx32.F32.E4M3.E4M3"]' in arith[0] + arith[1] + arith[2]
    split = [{"kernel": "_split_kernel", "group": "g", "binary": b, "mma_shapes": {"HGMMA.64x64x16.F32.BF16": 8},
              "constants": {"BLOCK_N": bn, "CAUSAL": True, "WRITE": w}}
             for b, bn, w in (("a", 64, True), ("b", 64, False), ("c", 32, False))]
    assert len(kernel_report.distinct_binaries(split[:2], kernel_report.arithmetic)["_split_kernel: g"]) == 1
    assert len(kernel_report.distinct_binaries(split, kernel_report.arithmetic)["_split_kernel: g"]) == 2
    assert kernel_report.ctas_per_sm(4, 64, 147456) == 1  # the 8B FP8 GEMM: its 144 KB of stages
    assert kernel_report.ctas_per_sm(4, 32, 1024) == 16   # 128 threads: 2048 threads an SM
    assert kernel_report.ctas_per_sm(8, 255, 1024) == 1   # 255 registers x 256 threads: the whole register file
    assert kernel_report.ctas_per_sm(4, 64, 240000) == 0  # more shared memory than an SM has


def test_wide_rows_keep_the_k_loop():
    """From ``WIDE_ROWS`` rows the FP8 tiling changes its tiles, never its K loop (each element's summation order):
    at every 8B and 1.7B projection; below, the 32-row tiling whatever M; a K-split tiling stays as it is."""
    from orthrus_export.bench import qwen3_config
    from orthrus_plugins.fp8_linear import kernel as fk
    for shape in ("8b", "1.7b"):
        for n, k in kernel_report.projections(qwen3_config(shape)).values():
            narrow = fk.config(n, k, 132)
            assert narrow.m_tile == 32 and all(fk.config(n, k, 132, m) == narrow for m in (1, 8, 32, 64, 127))
            for m in (128, 256, 4096):
                wide = fk.config(n, k, 132, m)
                assert (wide.block_k, wide.split_k, wide.swap) == (narrow.block_k, narrow.split_k, narrow.swap)
                if narrow.split_k == 1:
                    assert wide.m_tile in (64, 128) and wide.num_stages >= 3 and (m < 256 or wide.m_tile == 128)
                    assert (wide.m_tile + wide.block_n) * wide.block_k * wide.num_stages <= fk.SHARED_BUDGET
                else:
                    assert wide == narrow
    assert fk.config(24576, 4096, 132, 256).block_n == 128 and fk.config(4096, 12288, 132, 256).block_n == 64
    # 128-255 rows (a batch of 4): 64-channel tiles, 64-row tiles for the narrow projections (the M = 128 sweep)
    assert (fk.config(24576, 4096, 132, 128).block_n, fk.config(24576, 4096, 132, 128).m_tile) == (64, 128)
    assert (fk.config(4096, 12288, 132, 128).block_n, fk.config(4096, 12288, 132, 128).m_tile) == (64, 64)


def test_attention_launch_with_capped_registers_fits_two_programs_an_sm(tmp_path):
    """``Launch(num_stages=2, max_registers=128)`` (``--attention-launch``, ``Launch.from_spec``): the attention split
    kernel at 8B shapes compiles in 128 registers without spilling, two programs an SM (the default: 224 registers,
    one); a misspelt field is refused."""
    from orthrus_plugins.attention_common.kernel import Launch
    out = tmp_path / "capped.json"
    p = subprocess.run([sys.executable, SCRIPT, "--shape", "8b", "--batches", "1", "--check", "--out", out,
                        "--attention-launch", "num_stages=2,max_registers=128"], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    split = [r for r in json.loads(out.read_text())["launches"] if r["kernel"] == "_split_kernel"]
    assert len(split) == 3 and all(r["registers"] <= 128 and r["local_bytes"] == 0 and r["ctas_per_sm"] == 2
                                   and r["num_stages"] == 2 for r in split), split
    with pytest.raises(ValueError, match="not field=value"):
        Launch.from_spec("stages=2")
