"""The parts of the GPU paths that a CPU can check: the profile's kernel families on an H100
kernel list, the input-bound verdict with the GPU's idle gap, autotune's estimate of compile
trials, and benchmarks/gpu.sh's deadline and packing."""

from __future__ import annotations

import sys

import pytest

from distres import autotune, perf, profiling

# GPU kernel names as torch.profiler's CUDA traces of a ResNet-50 bf16 channels_last training
# step on an H100 (cuDNN 9, cuBLASLt, DDP over nccl, fused SGD; Inductor's names under
# --compile) give them, with the family each belongs to.
H100_RESNET50_BF16 = """
convolution/matmul	sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cudnn
convolution/matmul	sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x256x64_warpgroupsize2x1x1_g1_execute_segment_k_off_kernel__5x_cudnn
convolution/matmul	sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cudnn
convolution/matmul	sm80_xmma_fprop_implicit_gemm_indexed_wo_smem_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x16x64_stage4_warpsize4x1x1_g1_tensor16x8x16_kernel
convolution/matmul	sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize64x64x64_stage5_warpsize2x2x1_g1_tensor16x8x16_kernel
convolution/matmul	void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8::Params)
convolution/matmul	nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN
convolution/matmul	nvjet_hsh_64x8_64x16_4x1_v_bz_splitK_TNT
convolution/matmul	sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas
convolution/matmul	void implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>(int, int, int, float const*, int, float*, float const*, kernel_conv_params, unsigned long long, int, float, float, int, float const*, float const*, bool, int, int)
convolution/matmul	triton_tem_fused_convolution_0
convolution/matmul	triton_tem_fused_addmm_1
normalisation/elementwise	void cudnn::bn_fw_tr_1C11_kernel_NCHW<__nv_bfloat16, float, 512, true, 1>(cudnnTensorStruct, __nv_bfloat16 const*, cudnnTensorStruct, __nv_bfloat16*, float const*, float const*, float, float, float*, float*, float*, float*, float, float)
normalisation/elementwise	void cudnn::bn_bw_1C11_kernel_new<__nv_bfloat16, float, float2, 512, true, 1>(float, float, float, float, cudnnTensorStruct, __nv_bfloat16 const*, cudnnTensorStruct, __nv_bfloat16 const*, cudnnTensorStruct, __nv_bfloat16*, float const*, float*, float*, float const*, float const*, float)
normalisation/elementwise	void cudnn::batchnorm_fwtr_nhwc_semiPersist<__nv_bfloat16, float, 512, true, false, false, 1, 8>(cudnnBatchNormFwdNhwcParams)
normalisation/elementwise	void cudnn::batchnorm_bwtr_nhwc_semiPersist<__nv_bfloat16, float, 512, true, false, 1, 8>(cudnnBatchNormBwdNhwcParams)
normalisation/elementwise	void at::native::batch_norm_collect_statistics_channels_last_kernel<at::native::Welford, c10::BFloat16, float, 4>(c10::BFloat16 const*, int, int, float*, float*, volatile float*, int*, float)
normalisation/elementwise	void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, (cudnnKernelDataType_t)0>(cudnn::engines_precompiled::nchw2nhwc_params_t<float>, __nv_bfloat16 const*, __nv_bfloat16*)
normalisation/elementwise	void cudnn::engines_precompiled::nhwcToNchwKernel<float, __nv_bfloat16, float, true, false, (cudnnKernelDataType_t)0>(cudnn::engines_precompiled::nhwc2nchw_params_t<float>, float const*, __nv_bfloat16*)
normalisation/elementwise	void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::launch_clamp_scalar(at::TensorIteratorBase&, c10::Scalar, c10::Scalar, at::native::detail::ClampLimits)::{lambda()#1}::operator()() const::{lambda()#7}::operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >(int, at::native::(anonymous namespace)::launch_clamp_scalar(at::TensorIteratorBase&, c10::Scalar, c10::Scalar, at::native::detail::ClampLimits)::{lambda()#1}::operator()() const::{lambda()#7}::operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul>)
normalisation/elementwise	void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)
normalisation/elementwise	void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::threshold_kernel_impl<c10::BFloat16>(at::TensorIteratorBase&, c10::BFloat16, c10::BFloat16)::{lambda(c10::BFloat16, c10::BFloat16)#1}>(at::TensorIteratorBase&, at::native::threshold_kernel_impl<c10::BFloat16>(at::TensorIteratorBase&, c10::BFloat16, c10::BFloat16)::{lambda(c10::BFloat16, c10::BFloat16)#1} const&)::{lambda(int)#1}>(int, at::native::gpu_kernel_impl_nocast<at::native::threshold_kernel_impl<c10::BFloat16>(at::TensorIteratorBase&, c10::BFloat16, c10::BFloat16)::{lambda(c10::BFloat16, c10::BFloat16)#1}>(at::TensorIteratorBase&, at::native::threshold_kernel_impl<c10::BFloat16>(at::TensorIteratorBase&, c10::BFloat16, c10::BFloat16)::{lambda(c10::BFloat16, c10::BFloat16)#1} const&)::{lambda(int)#1})
normalisation/elementwise	void at::native::(anonymous namespace)::max_pool_forward_nhwc<c10::BFloat16, float>(c10::BFloat16 const*, int, long, long, long, int, int, int, int, int, int, int, int, int, int, int, int, int, c10::BFloat16*, long*)
normalisation/elementwise	void at::native::(anonymous namespace)::max_pool_backward_nhwc<c10::BFloat16, float>(c10::BFloat16 const*, long const*, int, long, long, long, int, int, int, int, int, int, int, int, int, int, int, int, int, int, c10::BFloat16*)
normalisation/elementwise	void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, float>, unsigned int, float, 4> >(at::native::ReduceOp<float, at::native::MeanOps<float, float, float, float>, unsigned int, float, 4>)
normalisation/elementwise	void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)
normalisation/elementwise	void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, long>(float*, float*, float const*, long const*, float const*, bool, long, long, long, long)
normalisation/elementwise	void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<3>, at::native::(anonymous namespace)::FusedSgdMathFunctor<float, 3>, double, float*, float const*, bool, bool, bool, float const*, float const*, float const*>(at::native::(anonymous namespace)::TensorListMetadata<3>, at::native::(anonymous namespace)::FusedSgdMathFunctor<float, 3>, double, float*, float const*, bool, bool, bool, float const*, float const*, float const*)
normalisation/elementwise	Memcpy HtoD (Pinned -> Device)
normalisation/elementwise	triton_poi_fused__native_batch_norm_legit_functional_add_relu_threshold_backward_12
normalisation/elementwise	triton_red_fused__native_batch_norm_legit_functional_convolution_backward_3
normalisation/elementwise	triton_per_fused__native_batch_norm_legit_functional_7
communication	ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)
"""


def test_kernel_families_on_an_h100_kernel_list():
    rows = [line.split("\t") for line in H100_RESNET50_BF16.strip().splitlines()]
    wrong = [(want, name[:90], got) for want, name in rows if (got := profiling.category_kernel(name)) != want]
    assert not wrong
    assert {want for want, _ in rows} == {"convolution/matmul", "normalisation/elementwise", "communication"}


@pytest.mark.parametrize(
    "op, want",
    [
        ("aten::cudnn_batch_norm", "normalisation/elementwise"),
        ("aten::native_batch_norm_backward", "normalisation/elementwise"),
        ("aten::cudnn_convolution", "convolution/matmul"),
        ("aten::convolution_backward", "convolution/matmul"),
        ("aten::addmm", "convolution/matmul"),
        ("aten::add_", "normalisation/elementwise"),
        ("nccl:all_reduce", "communication"),
    ],
)
def test_host_op_families(op, want):
    assert profiling.category(op) == want


class FakeEvent:
    """A CUDA event on a fake GPU clock: ``clock[0]`` is when the GPU reaches the next record."""

    def __init__(self, clock):
        self.clock, self.t = clock, None

    def record(self):
        self.t = self.clock[0]

    def elapsed_time(self, end) -> float:
        return 1e3 * (end.t - self.t)  # ms, as torch.cuda.Event gives


def test_idle_gaps_add_up_the_gpu_time_between_each_fetchs_events():
    clock = [0.0]
    gaps = perf.IdleGaps(lambda: FakeEvent(clock))
    for busy_until, fetched_at in ((1.0, 1.0), (2.0, 2.5), (3.0, 3.25)):
        clock[0] = busy_until  # the GPU reaches the event before the fetch here ...
        gaps.before()
        clock[0] = fetched_at  # ... and the one after it once the host has the batch
        gaps.after()
    assert gaps.seconds() == pytest.approx(0.75)
    gaps.reset()
    assert gaps.seconds() == 0.0


def test_a_host_wait_the_gpu_did_not_idle_through_is_not_input_bound():
    # nvJPEG on a side stream: the host waits 40% of the step, the GPU runs queued steps meanwhile
    label, msg = perf.verdict(0.40, 98.0, "--data-backend dali", "--compile", gpu_idle_frac=0.02)
    assert label == "compute-bound" and "idle 2%" in msg and "--compile" in msg
    label, msg = perf.verdict(0.40, 60.0, "--data-backend dali", "--compile", gpu_idle_frac=0.35)
    assert label == "input-bound" and "GPU idle 35%" in msg and "dali" in msg
    assert perf.verdict(0.40, None, "x", "y")[0] == "input-bound"  # CPU: the host's wait is the step's
    assert not perf.input_bound(0.05, 0.5)


def test_compile_trials_are_estimated_apart_from_eager_ones():
    def cfg(compile_mode=None):
        from distres import config

        c = config.parse_args(["--data", "synthetic"])
        return c.replace(compile=compile_mode is not None, compile_mode=compile_mode or "default")

    costs = autotune.Costs()
    costs.add(cfg(), 8.0)
    assert costs.estimate(cfg()) == 8.0
    first = costs.estimate(cfg("reduce-overhead"))
    assert first == 8.0 + autotune.COMPILE_S["reduce-overhead"]  # not the eager trial's 8 s
    costs.add(cfg("reduce-overhead"), 70.0)
    assert costs.estimate(cfg("reduce-overhead")) == 70.0
    assert costs.estimate(cfg("max-autotune-no-cudagraphs")) == 8.0 + autotune.COMPILE_S["max-autotune-no-cudagraphs"]
    assert costs.estimate(cfg()) == 8.0  # a compiled trial does not make eager ones look longer


def _gpu_sh(tmp_path, **env):
    import os
    import subprocess

    from tests.helpers import REPO

    out = tmp_path / "out"
    full = dict(os.environ, OUT=str(out), TMPDIR=str(tmp_path), DISTRES_GPU_DRY="1", PYTHON=sys.executable, **env)
    cmd = ["bash", str(REPO / "benchmarks/gpu.sh"), "first"]
    return out, subprocess.Popen(
        cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def test_gpu_sh_keeps_its_deadline_and_packs_what_it_has(tmp_path):
    """A step that would outlast the deadline is interrupted at it, the steps after it are
    skipped and listed, and $OUT holds the three files of the part, the summary in the pack."""
    import tarfile
    import time

    deadline = 6
    out, proc = _gpu_sh(
        tmp_path,
        DISTRES_GPU_DEADLINE_S=str(deadline),
        DISTRES_GPU_GRACE_S="1",
        DISTRES_GPU_MIN_STEP_S="2",
        DISTRES_GPU_FAKE_SLOW="1",
    )
    t0 = time.perf_counter()
    console, _ = proc.communicate(timeout=120)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, console
    assert took < deadline + 8, console  # the deadline, and a few seconds for the table and the pack
    assert sorted(p.name for p in out.iterdir()) == ["first.log", "first.md", "first.tgz"]
    summary = (out / "first.md").read_text()
    assert "- slow (test): exit 124" in summary  # timeout's status: interrupted at the deadline
    assert "- probe: skipped" in summary and "- pytest -m gpu: skipped" in summary
    with tarfile.open(out / "first.tgz") as tar:
        assert "first/summary.md" in tar.getnames()
    assert not list(tmp_path.glob("distres-gpu-first.*"))  # its working folder is gone


def test_a_killed_gpu_sh_still_leaves_its_pack(tmp_path):
    import os
    import signal
    import tarfile
    import time

    out, proc = _gpu_sh(tmp_path, DISTRES_GPU_FAKE_SLOW="1")
    try:
        log = out / "first.log"
        deadline = time.time() + 60
        while time.time() < deadline and not (log.exists() and "== slow" in log.read_text()):
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as a device's command limit would
        proc.communicate()
    with tarfile.open(out / "first.tgz") as tar:
        names = tar.getnames()
    assert "first/summary.md" in names and len(list(out.iterdir())) <= 8


def smoke_run(tmp_path, device: str, compiled: bool, run=None, levers: str = "all") -> None:
    """One short ResNet-18 run through the paths that only meet on a GPU: --profile-steps,
    --autotune with a small budget, TrivialAugment, mixup/cutmix and random erasing on the gpu
    backend, EMA, TensorBoard where installed (and with ``compiled`` --compile --compile-mode
    reduce-overhead);
    stopped at the end of its first epoch (step 3) and resumed to its end (6 steps). ``run``: how to run distres.train
    (default: its command line)."""
    import importlib.util
    import json

    from tests.helpers import make_imagefolder, read_metrics, run_train

    tensorboard = importlib.util.find_spec("tensorboard") is not None

    run = run or (lambda argv: run_train(argv, timeout=600))

    data = make_imagefolder(tmp_path / "data", {"train": {"a": 24, "b": 24}, "val": {"a": 8, "b": 8}}, size=40)
    out = tmp_path / "run"
    args = ["--arch", "resnet18", "--data", "imagefolder", "--data-dir", str(data), "--image-size", "32"]
    args += ["--cifar-stem", "off"]  # the ImageNet stem: a sixteenth of the compute at 32 px, the same paths
    args += ["--data-backend", "gpu", "--device", device, "--batch-size", "16", "--epochs", "2", "--log-every", "1"]
    args += ["--auto-augment", "ta_wide", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--random-erase", "0.25"]
    args += ["--ema-decay", "0.9", "--checkpoint-every", "0", "--no-progress", "--wandb", "disabled"]
    args += ["--tensorboard"] if tensorboard else []
    args += ["--autotune", "--autotune-budget", "20", "--autotune-steps", "2", "--autotune-levers", levers]
    args += ["--output-dir", str(out)]
    if compiled:
        args += ["--compile", "--compile-mode", "reduce-overhead"]
    r = run(args + ["--profile-steps", "2:3", "--max-steps", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((out / "profile").glob("rank0.*.pt.trace.json")), r.stderr[-2000:]
    shares = json.loads((out / "profile/summary-rank0.json").read_text())["shares"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.02)
    table = json.loads((out / "autotune.json").read_text())
    assert table["trials"][0]["lever"] == "start" and table["trials"][0]["images_per_sec"] > 0
    r = run(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at step 3" in r.stderr
    assert "autotune: resuming with the settings chosen before" in r.stderr
    records = read_metrics(out)
    assert [x["step"] for x in records if x["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    evals = [x for x in records if x["kind"] == "eval"]
    assert [x["epoch"] for x in evals] == [1, 2] and all("ema_top1" in x for x in evals)
    assert list((out / "tensorboard").glob("events.out.tfevents.*")) or not tensorboard


@pytest.mark.slow
def test_smoke_run_of_the_gpu_paths_on_the_cpu(tmp_path):
    """The GPU smoke run's flags together, on the CPU (without torch.compile, whose compilation
    on a CPU outlasts the rest): tests/test_gpu.py runs the same on CUDA, compiled."""
    from tests.helpers import train_here

    smoke_run(tmp_path, "cpu", compiled=False, run=train_here, levers="channels_last")


def test_a_loader_case_over_its_timeout_is_reported_and_ends(tmp_path):
    from benchmarks import loaders

    res = loaders.run_case("torch", tmp_path, 32, 8, 0, "cpu", 2, 1, timeout=0.5)
    assert "timed out after 0.5 s" in res["error"]


def test_a_set_too_small_for_its_workers_is_noted(tmp_path, capsys):
    from benchmarks import loaders
    from tests.helpers import make_imagefolder

    root = make_imagefolder(tmp_path / "d", {"train": {"a": 10, "b": 10}})
    runs = [{"backend": "torch"}]
    loaders._check_sizes(runs, root, batch=8, workers=4, per_repeat=5)  # 2 batches an epoch
    assert len(runs[0]["size_notes"]) == 2 and "only 2 ever decode" in capsys.readouterr().err
    loaders._check_sizes(runs, root, batch=2, workers=4, per_repeat=5)  # 10 batches an epoch
    assert runs[0]["size_notes"] == []
