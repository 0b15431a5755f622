"""`edgelr distill`: train a compressed model to match the original's outputs. Parses, calls the library, prints.

`--nproc N` trains with N processes on this machine: the command starts itself again under torchrun
(`python -m torch.distributed.run --standalone --nproc-per-node N -m edgelr distill ...`) and returns its
exit code. Under torchrun only rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from edgelr.cli.args import positive

# DistillConfig fields set by a flag of another name than --field-name
_FLAGS = {"features": "--feature / --align-factorized"}
_PARSER: list[argparse.ArgumentParser] = []  # the distill parser, to write the command line again for --nproc
RANK0_GRACE_S = 3.0  # a failing process other than rank 0 waits this long before it exits
# torchrun's own log lines ("E1207 07:06:47.497000 15308 torch/distributed/elastic/...] ...")
_TORCHRUN_LOG = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*torch/distributed/")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="train a compressed model to match the original's outputs (no labels needed)")
    p.add_argument("teacher", metavar="TEACHER.onnx")
    p.add_argument("student", metavar="STUDENT.onnx", help="the compressed model (same inputs and outputs)")
    p.add_argument("--data", required=True, metavar="DIR_OR_NPZ",
                   help="a folder of images (with an optional preprocess.json) or an .npz of model inputs")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, metavar="N")
    length.add_argument("--epochs", type=float, metavar="N")
    p.add_argument("--batch", type=int, default=8, metavar="N",
                   help="samples per step, over all processes (a multiple of --nproc; default 8)")
    p.add_argument("--lr", type=positive, default=2e-5, metavar="LR", help="AdamW's peak learning rate (default 2e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="FILE", help="save progress here (and resume from it with --resume)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--preprocess", metavar="SPEC.json", help="image size, letterbox, mean, std, scale (images only)")
    p.add_argument("--freeze", action="append", default=[], metavar="PATTERN", help="keep matching weights fixed")
    p.add_argument("--keep-worse", action="store_true",
                   help="with --eval: write the trained model even when its held-out error is higher "
                        "(default: then the student is written unchanged)")
    p.add_argument("--pairs-only", action="store_true",
                   help="train only the factorized pairs' weights (the rest stays fixed)")
    aligned = p.add_mutually_exclusive_group()
    aligned.add_argument("--feature", action="append", default=[], metavar="TENSOR",
                         help="also align this intermediate tensor (same name in both models)")
    aligned.add_argument("--align-factorized", action="store_true",
                         help="also align every factorized pair's output with the layer it replaced")
    p.add_argument("--feature-weight", type=positive, metavar="W",
                   help="each aligned tensor's weight in the loss (default 1; with --align-factorized a "
                        "small one, edgelr.train.losses.FACTORIZED_FEATURE_WEIGHT)")
    p.add_argument("--augment", choices=["light", "strong", "none"], default="light",
                   help="image augmentation: light (crop, flip, colour; default), strong (crops of 5-100%%, "
                        "mosaics, colour casts, mixup: for a few dozen photos), none")
    p.add_argument("--train-precision", choices=["fp32", "bf16"], default="fp32",
                   help="the training compute: the student's forward pass (bf16: faster on CPUs with AMX or "
                        "AVX-512 BF16); the saved model is fp32 either way")
    p.add_argument("--precision", help=argparse.SUPPRESS)  # export's flag: a clear error here
    p.add_argument("--quantization-aware", action="store_true",
                   help="round Conv/Linear inputs to uint8 while training, for static INT8 after "
                        "(`edgelr compress OUT.onnx --quantize int8 --calib ...`)")
    p.add_argument("--time-limit", type=positive, metavar="S", help="stop after this many seconds, writing the output")
    p.add_argument("--eval", metavar="DATA.npz", help="held-out inputs: report the error before and after")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (torchrun; gloo on CPU, NCCL on GPUs): the "
                        "same weights as one process with the same --batch")
    _PARSER[:] = [p]


def run(args) -> int:
    from edgelr.errors import EdgelrError
    from edgelr.train.distill import ConfigFieldError, DistillConfig, distill

    if args.precision is not None:
        raise EdgelrError(f"--precision is the deployed model's format (edgelr export); distill trains in "
                          f"--train-precision fp32|bf16 (got --precision {args.precision})")
    try:
        config = DistillConfig(
            steps=args.steps, epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed,
            checkpoint=args.checkpoint, resume=args.resume, preprocess=args.preprocess, freeze=tuple(args.freeze),
            features="factorized" if args.align_factorized else tuple((f, f) for f in args.feature) or None,
            feature_weight=args.feature_weight, augment=args.augment, train_precision=args.train_precision,
            quantization_aware=args.quantization_aware, time_limit=args.time_limit,
            pairs_only=args.pairs_only, keep_worse=args.keep_worse)
    except ConfigFieldError as exc:
        raise _flag_error(exc) from None
    if args.nproc is not None:
        return _launch(args, config)
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        done = distill(args.teacher, args.student, args.data, args.output, config, eval_samples=args.eval,
                       progress=not args.quiet)
    except EdgelrError as exc:
        if rank:  # every process fails alike: rank 0 says why, and torchrun stops the group when one exits,
            time.sleep(RANK0_GRACE_S)  # so give rank 0 time to say it first
            return 1
        if isinstance(exc, ConfigFieldError):
            raise _flag_error(exc) from None
        raise
    if rank:
        return 0
    print(f"{done['steps']} steps in {done['seconds']:.0f} s, final loss {done['final_loss']:.4g}"
          + (f" ({done['world_size']} processes)" if done.get("world_size", 1) > 1 else "")
          + (" (stopped at the time limit)" if done.get("stopped_early") else ""))
    if done.get("error_before"):
        print(f"held-out relative output error: {done['error_before']['worst']:.4f} before, "
              f"{done['error_after']['worst']:.4f} after")
        if done.get("kept") == "student":
            print("training raised the held-out error: wrote the student unchanged (--keep-worse writes the trained one)")
    print(f"wrote {done['output']} (parity with torch: {max(done['parity'].values()):.1e})")
    return 0


def _flag_error(exc):
    """A DistillConfig field's error, said of the flag that sets the field."""
    from edgelr.errors import EdgelrError

    return EdgelrError(f"{_FLAGS.get(exc.field, '--' + exc.field.replace('_', '-'))} {exc.problem}")


def _launch(args, config) -> int:
    """Start this command again under torchrun with --nproc processes; their exit code."""
    from edgelr.errors import EdgelrError
    from edgelr.io.progress import MODE_VARIABLE, progress_mode

    n = args.nproc
    if n < 1:
        raise EdgelrError(f"--nproc must be >= 1, got {n}")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise EdgelrError("--nproc starts torchrun itself; under torchrun leave it out")
    if config.batch % n:
        raise EdgelrError(f"--batch {config.batch} does not split over --nproc {n} processes: give a multiple of {n}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               "-m", "edgelr", *(["-q"] if args.quiet else []), "distill", *_argv(args)]
    env = dict(os.environ)
    # torchrun would give each process 1 thread (and say so); share this machine's cores out instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    env[MODE_VARIABLE] = progress_mode()  # their stderr is our pipe; bars or lines as our own stderr takes them
    return _torchrun(command, env)


def _torchrun(command: list[str], env: dict) -> int:
    """Run COMMAND (torchrun), passing the processes' stderr through as it comes (progress bars included)
    but not torchrun's own log lines, nor the report it prints when a process fails: the failing
    process's one line says what went wrong."""
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    err = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    tail, failed = b"", False
    try:
        while chunk := proc.stderr.read1(1 << 16):
            tail += chunk
            *pieces, tail = re.split(rb"(?<=[\r\n])", tail)
            for piece in pieces:
                if _TORCHRUN_LOG.match(piece):
                    failed = failed or b"closing signal" in piece or b"failed (exitcode" in piece
                elif not failed and err is not None:
                    err.write(piece)
                    err.flush()
        if tail and not failed and not _TORCHRUN_LOG.match(tail) and err is not None:
            err.write(tail)
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        return 130


def _argv(args) -> list[str]:
    """The distill arguments of ARGS again, as a command line (without --nproc)."""
    argv: list[str] = []
    for action in _PARSER[0]._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ("help", "nproc", "precision") or value is None or value is False:
            continue
        if not action.option_strings:
            argv.append(str(value))
        elif value is True:
            argv.append(action.option_strings[-1])
        elif isinstance(value, list):
            for item in value:
                argv += [action.option_strings[-1], str(item)]
        else:
            argv += [action.option_strings[-1], str(value)]
    return argv
