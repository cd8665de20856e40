"""The ``hcx`` command line: global options, then one command. Each command's parser and
function live with its group in :mod:`hcx.commands`."""

from __future__ import annotations

import argparse
import os
import sys

from hcx import paths
from hcx.config import RecipeError
from hcx.errors import HcxError, Stopped

COMMAND_GROUPS = ("train", "data", "models", "evaluate", "serve", "ops")  # modules of hcx.commands


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from hcx import __version__

    parser = argparse.ArgumentParser(
        prog="hcx",
        description="hcx: Korean-English bilingual LLMs on megatron-core.",
    )
    parser.add_argument("--version", action="version", version=f"hcx {__version__}")
    parser.add_argument("--data-dir", help="data root for data:// paths "
                        "(default: $HCX_DATA_DIR, then ../shared/data)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        importlib.import_module(f"hcx.commands.{group}").add_parsers(sub)
    return parser


def quiet_known_warnings() -> None:
    """Silence warnings that say nothing actionable to hcx users (megatron's notes that
    Apex/Transformer Engine are absent, torch deprecations inside megatron)."""
    import warnings

    for pattern in (r".*Transformer Engine and Apex are not installed.*",
                    r".*Apex is not installed.*", r".*full scope is deprecated.*",
                    r".*is deprecated. Please use `torch.distributed.*",
                    r".*\.grad attribute of a Tensor that is not a leaf.*"):
        warnings.filterwarnings("ignore", message=pattern)
    # torchrun children inherit this, so their imports are quiet too.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    # Megatron's TP comm/compute overlap needs kernels issued in order on GPU
    # (Megatron-LM's launch scripts set the same); meaningless on CPU.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    paths.set_data_root(args.data_dir)
    if args.data_dir:
        os.environ["HCX_DATA_DIR"] = args.data_dir  # reaches torchrun children too
    try:
        return args.func(args, argv)
    except RecipeError as e:
        print(f"hcx: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"hcx: {e}", file=sys.stderr)
        return 128 + e.signum
    except (HcxError, FileNotFoundError) as e:
        rank = os.environ.get("RANK")
        prefix = f"hcx [rank {rank}]" if rank not in (None, "0") else "hcx"
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hcx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
