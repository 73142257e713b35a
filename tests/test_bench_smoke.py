"""benchmarks/bench.py runs every code path on the CPU (tiny model) and reports what it promises.
No timing is asserted: only the structure of the report, the FLOP count against its closed form,
and that a failing row is reported instead of stopping the run."""
import json

import pytest
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    module = load_benchmark("bench")
    return module


def dit_flops(tokens: int, dim: int, depth: int, in_ch: int, out_ch: int, patch: int, freq: int = 256) -> tuple[int, int]:
    """Matrix FLOPs (2 per multiply-add) of one DiT forward per image, and of forward + backward:
    patch conv, timestep MLP, per block adaLN (D→6D), qkv, QKᵀ and AV, proj, MLP (D→4D→D), final
    adaLN and linear.  The backward doubles every product except the input gradients nobody needs
    (the patch conv's image and the timestep MLP's sinusoidal features)."""
    N, D = tokens, dim
    patch_embed, t_mlp0 = 2 * N * D * in_ch * patch**2, 2 * freq * D
    block = 2 * D * 6 * D + 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D + 2 * 2 * N * D * 4 * D
    fwd = patch_embed + t_mlp0 + 2 * D * D + depth * block + 2 * D * 2 * D + 2 * N * D * patch**2 * out_ch
    return fwd, 3 * fwd - patch_embed - t_mlp0


def test_tiny_cpu_run_reports_every_part(bench, tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(["--device", "cpu", "--tiny", "--batches", "2", "--compile-backend", "eager", "--out", str(out),
                      "--train-speed", "reference,fastest,fp32,bf16,bf16+compile,bf16+mlp+attn+lt+norm+bf16res+master,"
                      "bf16+mlp+norm+fp8fwd+fp8bwd",
                      "--sample-speed", "reference,fastest,fp32,bf16,bf16+compile,bf16+fp8+compile,bf16+fp8+plainmlp"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))

    fwd, fwd_bwd = dit_flops(tokens=16, dim=64, depth=2, in_ch=4, out_ch=8, patch=2)
    assert res["flops"]["tiny"]["fwd_gflop_per_img"] == pytest.approx(fwd / 1e9, rel=1e-12)
    assert res["flops"]["tiny"]["fwd_bwd_gflop_per_img"] == pytest.approx(fwd_bwd / 1e9, rel=1e-12)
    assert res["peak"]["bf16_tflops"] > 0 and res["peak"]["fp32_tflops"] > 0

    assert [(r["head_dim"], r["dtype"]) for r in res["sdpa"]] == [(16, "bfloat16"), (16, "float32")]
    for r in res["sdpa"]:
        assert r["default_ops"] and isinstance(r["math"], float)
        assert all(isinstance(r[b], float) or r[b].startswith("refused") for b in bench.BACKENDS)

    assert [r["variant"] for r in res["train"]] == ["reference", "fp32", "bf16", "bf16+mlp+attn+lt+norm+bf16res+master",
                                                   "bf16+mlp+norm+fp8fwd+fp8bwd", "fastest", "bf16+compile"]  # compiled last
    for r in res["train"]:
        assert r["status"] == "ok" and r["finite"], r
        assert len(r["step_ms_all"]) == 3 and r["img_per_s"] == pytest.approx(2e3 / r["step_ms"])
        assert r["tail_ms"] == pytest.approx(r["opt_ms"] + r["ema_ms"] + r["grad_norm_ms"])
        assert (r["ema_ms"] == r["grad_norm_ms"] == 0) == ("master" in r["variant"])  # in opt.step
    assert [r["variant"] for r in res["sample"]] == ["reference", "fp32", "bf16", "bf16+fp8+plainmlp", "fastest", "bf16+compile",
                                                    "bf16+fp8+compile"]
    for r in res["sample"]:
        assert r["status"] == "ok" and r["extrapolated"], r
        for sampler, steps in (("ddpm", 250), ("ddim", 50), ("euler", 50), ("heun", 25)):
            s = r[sampler]
            nfe = 6 if sampler == "heun" else 3  # Heun: two evaluations per step
            assert s["finite"] and s["timed_steps"] == len(s["ms_per_step_all"]) == nfe, (sampler, s["timed_steps"])
            assert s["s_per_img"] == pytest.approx(steps * s["ms_per_nfe"] / 1e3 / 2)


def test_failing_row_is_reported_and_the_run_goes_on(bench, capsys):
    # A compiler backend that does not exist: every row fails inside, and each says so.
    res = bench.main(["--device", "cpu", "--tiny", "--parts", "train,sample", "--variants", "fp32+compile",
                      "--batches", "2,4", "--sample-variants", "fp32+compile", "--compile-backend", "no-such-backend"])
    assert [r["status"].split(":")[0] for r in res["train"] + res["sample"]] == ["error"] * 3
    assert "no-such-backend" in res["train"][0]["status"]
    assert "| tiny | 4 | fp32+compile |" in capsys.readouterr().out


def test_unknown_variant_is_refused_at_the_boundary(bench):
    with pytest.raises(ValueError, match="unknown train variant 'bf8'"):
        bench.parse_args(["--tiny", "--variants", "bf8"])
    with pytest.raises(ValueError, match="train variant 'fp32\\+bf16res': TrainSpeed.bf16_residual"):  # needs bf16
        bench.parse_args(["--tiny", "--device", "cpu", "--variants", "fp32+bf16res"])
    with pytest.raises(ValueError, match="unknown sample variant 'bf16\\+bf16res'"):  # a training lever
        bench.parse_args(["--tiny", "--sample-variants", "bf16+bf16res"])
    with pytest.raises(ValueError, match="unknown train variant 'bf16\\+tail'"):  # a lever that was removed
        bench.parse_args(["--tiny", "--variants", "bf16+tail"])
    assert bench.parse_args(["--tiny", "--sample-variants", "bf16+fp8+cudagraphs"]).rows[-1][3] == "bf16+fp8+cudagraphs"
    rows = bench.parse_args(["--tiny", "--device", "cpu", "--variants", "bf16+cudagraphs+master", "--batches", "2"]).rows
    assert [r[3] for r in rows if r[0] == "train"] == ["bf16+cudagraphs+master"]
