"""CPU weight prepacking on and off, side by side with ONNX Runtime, on one uniform-width sub-net of ResNet-20.

MetaSchedule's `RewriteLayout` postproc only rewrites a kernel's weight layout when the kernel's weights are marked
layout-free (`relax.transform.AttachAttrLayoutFreeBuffers`); TVM's `static_shape_tuning_pipeline(cpu_weight_prepack=
True)` marks them before tuning and, after applying the database, moves the weight transforms into
`<name>_transform_params` (`SplitLayoutRewritePreproc`, `LiftTransformParams`, `FoldConstant`). dyncompile's build
does not (yet). This script tunes the same sub-net both ways (one database each, in --workdir, reused by a second
run), checks both against PyTorch, then times them and ONNX Runtime interleaved in one process
(`dyncompile.bench.interleaved_medians`), and prints where the time goes kernel by kernel.

    nice .venv/bin/python benchmarks/prepack_ablation.py --trials 16 --width 1.0 --workdir /tmp/prepack
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dyncompile.bench import interleaved_medians, kernel_times, onnx_runner  # noqa: E402
from dyncompile.ir import uniform_config  # noqa: E402
from dyncompile.passes.extract import extract_subnet  # noqa: E402
from dyncompile.pipeline import analyse_model  # noqa: E402
from dyncompile.targets import get_target  # noqa: E402
from dyncompile.targets.pipeline import apply_database, compile_module, prepare  # noqa: E402
from dyncompile.targets.relax_import import import_subnet  # noqa: E402
from dyncompile.targets.tuning import tune  # noqa: E402
from dyncompile.zoo.resnet import resnet20_fashion  # noqa: E402

PEAK_GFLOPS = 237.0  # this machine's 2 cores: 2 × 32 FP32 FLOP/cycle × ~3.7 GHz (see shared TVM notes)


def compiled(dg, name: str, config: dict, prepack: bool, trials: int, workdir: Path):
    """(vm, weights, tuning seconds) for the sub-net, tuned `trials` per kernel with or without prepacking."""
    import tvm
    from tvm import relax

    target = get_target("cpu").tvm_target()
    func, record = import_subnet(dg, name, config)
    mod = prepare(tvm.IRModule({name: func}), target)
    if prepack:
        with target:
            mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    tuning_dir = workdir / f"{'prepack' if prepack else 'plain'}-{trials}"
    start = time.perf_counter()
    tune(mod, [name], target, "cpu", tuning_dir, trials)
    seconds = time.perf_counter() - start
    mod = apply_database(mod, target, tuning_dir)
    if prepack:
        with target, tvm.transform.PassContext(opt_level=3):
            for step in ("SplitLayoutRewritePreproc", "LiftTransformParams", "FoldConstant"):
                mod = getattr(relax.transform, step)()(mod)
    vm = relax.VirtualMachine(compile_module(mod, target, "cpu"), tvm.cpu())
    full = {k: v.detach().numpy() for k, v in dg.gm.state_dict().items()}
    raw = [tvm.runtime.tensor(p.cut(full[p.source])) for p in record.parameters]
    return vm, list(vm[name + "_transform_params"](raw)), seconds, record.macs


def main() -> None:
    import tvm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per kernel")
    parser.add_argument("--width", type=float, default=1.0, help="uniform width of the sub-net")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dyncompile-prepack"), help="tuning databases")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()

    torch.manual_seed(0)
    dg = analyse_model(resnet20_fashion().eval(), (1, 1, 28, 28), groups=8)
    config = uniform_config(dg, args.width)
    name = f"w{round(args.width * 100)}"
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype("float32")
    plain = extract_subnet(dg, config).eval()
    with torch.no_grad():
        expected = plain(torch.from_numpy(x)).numpy()
    calls, vms, macs = {}, {}, 0
    for prepack in (False, True):
        label = "TVM prepacked" if prepack else "TVM"
        vm, weights, seconds, macs = compiled(dg, name, config, prepack, args.trials, args.workdir)
        vm_args = [tvm.runtime.tensor(x), *weights]
        out = vm[name](*vm_args)
        error = float(np.abs((out[0] if not hasattr(out, "numpy") else out).numpy() - expected).max())
        print(f"{label}: tuned in {seconds:.0f} s (0 when the database had it), max error vs PyTorch {error:.2g}")
        calls[label] = (lambda vm=vm, a=vm_args: vm[name](*a))
        vms[label] = (vm, vm_args)
    calls["ONNX Runtime"] = onnx_runner(plain, x)
    medians = interleaved_medians(calls, repeats=args.repeats)
    spin = os.environ.get("TVM_THREAD_POOL_SPIN_COUNT", "TVM's default")
    print(f"\nResNet-20 (Fashion-MNIST) {name}, {macs / 1e6:.1f} MMACs, batch 1, {args.trials} trials per kernel, "
          f"median of {args.repeats} interleaved calls; TVM_THREAD_POOL_SPIN_COUNT={spin}")
    print(f"{'engine':16s} {'ms':>8s} {'÷ ORT':>7s} {'GFLOP/s':>8s} {'% peak':>7s}")
    for label, ms in medians.items():
        gflops = 2 * macs / (ms * 1e6)
        print(f"{label:16s} {ms:8.3f} {ms / medians['ONNX Runtime']:7.2f} {gflops:8.1f} {100 * gflops / PEAK_GFLOPS:6.1f}%")
    for label, (vm, vm_args) in vms.items():
        rows = kernel_times(vm, name, vm_args, calls=50)
        print(f"\n{label}: {sum(us for _, us in rows):.0f} µs in {len(rows)} kernels per call; the largest:")
        for kernel, us in rows[:6]:
            print(f"  {us:8.1f} µs  {kernel}")


if __name__ == "__main__":
    main()
