"""dev/bench.py's pass criteria: pure functions over measured numbers (no benchmark run)."""

import pytest

import bench  # dev/, put on sys.path by conftest

GPT2_124M = dict(num_layers=12, num_heads=12, channels=768, vocab_size=50257, max_seq_len=1024)


def verdicts(checks):
    return [ok for ok, _ in checks]


def test_matmul_flops_of_a_124m_step():
    # per token and direction: 12 layers x 12*768^2 (qkv 3C^2, proj C^2, fc 4C^2, fcproj 4C^2)
    # plus the classifier 50257*768 multiply-adds; x2 flops, x3 for forward + backward
    per_token = 12 * 12 * 768 ** 2 + 50257 * 768
    assert bench.matmul_flops_per_step(GPT2_124M, 4, 64) == 6 * 256 * per_token
    assert bench.matmul_flops_per_step(GPT2_124M, 4, 64) == pytest.approx(189.8e9, rel=1e-3)
    # the whole step's 6N + 12LCT count is larger: the floor leaves out attention and wpe
    assert bench.matmul_flops_per_step(GPT2_124M, 4, 64) < bench.flops_per_step(GPT2_124M, 4, 64)


def test_criteria_are_ratios_so_a_slower_machine_judges_the_same():
    fast = bench.judge_cpu_case("124M", ours_ms=700.0, fused_ms=1400.0, floor_ms=500.0, sgemm_gflops=380.0,
                                ours_peak_mib=2300.0, fused_peak_mib=2750.0)
    assert verdicts(fast) == [True, True, True]
    # everything 3x slower (a slower CPU): 2100 ms per step would fail any absolute 850 ms bound
    slow = bench.judge_cpu_case("124M", ours_ms=2100.0, fused_ms=4200.0, floor_ms=1500.0, sgemm_gflops=126.7,
                                ours_peak_mib=2300.0, fused_peak_mib=2750.0)
    assert verdicts(slow) == [True, True, True]
    text = "\n".join(t for _, t in slow)
    assert "2.00x" in text and "1.40x the matmul floor" in text  # the ratios ...
    assert "2,100.0 ms" in text and "4,200.0 ms" in text and "1,500.0 ms" in text and "126.7 GFLOP/s" in text  # ... and the figures


def test_each_criterion_fails_on_its_own():
    base = dict(ours_ms=700.0, fused_ms=1400.0, floor_ms=500.0, sgemm_gflops=380.0, ours_peak_mib=2300.0,
                fused_peak_mib=2750.0)
    assert verdicts(bench.judge_cpu_case("124M", **dict(base, fused_ms=800.0))) == [False, True, True]  # 1.14x
    assert verdicts(bench.judge_cpu_case("124M", **dict(base, floor_ms=340.0))) == [True, False, True]  # 2.06x
    assert verdicts(bench.judge_cpu_case("124M", **dict(base, fused_peak_mib=2000.0))) == [True, True, False]
    # the bounds themselves: 1.25x speedup and 2x the floor pass exactly
    assert verdicts(bench.judge_cpu_case("124M", 800.0, 1000.0, 400.0)) == [True, True]
    # the tiny model has more non-matmul work: a looser floor bound
    assert verdicts(bench.judge_cpu_case("tiny", 130.0, 350.0, 52.0)) == [True, True]  # 2.5x
    assert verdicts(bench.judge_cpu_case("tiny", 130.0, 350.0, 40.0)) == [True, False]  # 3.25x


def test_missing_numbers_leave_a_criterion_out():
    assert bench.judge_cpu_case("124M", None, 1400.0, 500.0) == []  # ours failed: nothing to judge
    assert verdicts(bench.judge_cpu_case("124M", 700.0, None, 500.0)) == [True]  # no PyTorch row
    assert verdicts(bench.judge_cpu_case("124M", 700.0, 1400.0, None)) == [True]  # no sgemm measurement
    assert verdicts(bench.judge_cpu_case("other", 700.0, 1400.0, 100.0)) == [True]  # no floor bound for it


def test_startup_criteria():
    assert verdicts(bench.judge_startup(1.0, 20.0, fused_setup_s=2.5)) == [True, True]
    assert verdicts(bench.judge_startup(3.0, 20.0, fused_setup_s=2.5)) == [False, True]
    assert verdicts(bench.judge_startup(1.0, 75.0, fused_setup_s=2.5)) == [True, False]
    assert verdicts(bench.judge_startup(1.0, 20.0)) == [True]  # no PyTorch setup time: only the cold bound
