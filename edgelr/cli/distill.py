"""`edgelr distill`: train a compressed model to match the original's outputs. Parses, calls the library, prints."""

from __future__ import annotations

import argparse

from edgelr.cli.args import positive


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
    p.add_argument("--batch", type=int, default=8, metavar="N")
    p.add_argument("--lr", type=positive, default=2e-5, metavar="LR", help="AdamW's peak learning rate (default 2e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="FILE", help="save progress here (and resume from it with --resume)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--preprocess", metavar="SPEC.json", help="image size, letterbox, mean, std, scale (images only)")
    p.add_argument("--freeze", action="append", default=[], metavar="PATTERN", help="keep matching weights fixed")
    aligned = p.add_mutually_exclusive_group()
    aligned.add_argument("--feature", action="append", default=[], metavar="TENSOR",
                         help="also align this intermediate tensor (same name in both models)")
    aligned.add_argument("--align-factorized", action="store_true",
                         help="also align every factorized pair's output with the layer it replaced")
    p.add_argument("--feature-weight", type=positive, metavar="W",
                   help="each aligned tensor's weight in the loss (default 1; with --align-factorized a "
                        "small one, edgelr.distill.FACTORIZED_FEATURE_WEIGHT)")
    p.add_argument("--augment", choices=["light", "strong", "none"], default="light",
                   help="image augmentation: light (crop, flip, colour; default), strong (crops of 5-100%%, "
                        "mosaics, colour casts, mixup: for a few dozen photos), none")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the student's forward pass (bf16: faster on CPUs with AMX or AVX-512 BF16; saved in fp32)")
    p.add_argument("--quantization-aware", action="store_true",
                   help="round Conv/Linear inputs to uint8 while training, for static INT8 after "
                        "(`edgelr compress OUT.onnx --quantize int8 --calib ...`)")
    p.add_argument("--time-limit", type=positive, metavar="S", help="stop after this many seconds, writing the output")
    p.add_argument("--eval", metavar="DATA.npz", help="held-out inputs: report the error before and after")


def run(args) -> int:
    from edgelr.train.distill import distill

    done = distill(args.teacher, args.student, args.data, args.output, steps=args.steps, epochs=args.epochs,
                   batch=args.batch, lr=args.lr, seed=args.seed, checkpoint=args.checkpoint, resume=args.resume,
                   preprocess=args.preprocess, freeze=args.freeze,
                   features="factorized" if args.align_factorized else [(f, f) for f in args.feature] or None,
                   feature_weight=args.feature_weight,
                   augment={"light": True, "strong": "strong", "none": False}[args.augment], precision=args.precision,
                   quantization_aware=args.quantization_aware,
                   time_limit=args.time_limit, eval_samples=args.eval, progress=not args.quiet)
    print(f"{done['steps']} steps in {done['seconds']:.0f} s, final loss {done['final_loss']:.4g}"
          + (" (stopped at the time limit)" if done.get("stopped_early") else ""))
    if done.get("error_before"):
        print(f"held-out relative output error: {done['error_before']['all']:.4f} before, "
              f"{done['error_after']['all']:.4f} after")
    print(f"wrote {done['output']} (parity with torch: {max(done['parity'].values()):.1e})")
    return 0
