"""The plan's command line, ``python -m rt_lib plan`` (the plan itself: ``rt_lib.pipeline.plan``),
and the plan flags that ``python -m rt_lib train --plan`` and ``reproduce --plan`` share."""

from __future__ import annotations

import argparse
import logging

from rt_lib.pipeline import plan


def add_plan_arguments(parser: argparse.ArgumentParser, *, json_flag: str = "--json") -> None:
    parser.add_argument("--gpu-memory", default=None,
                        help="memory of the GPU to plan for, e.g. 80GiB or 48GB (default: the visible CUDA device's)")
    parser.add_argument(json_flag, dest="plan_json", default=None, metavar="FILE",
                        help="also write the plan as JSON ('-': print the JSON instead of the text)")
    parser.add_argument("--eval-tokens", default="auto", choices=("auto", "yes", "no"),
                        help="count evaluation tokens: auto = when the task data is here and the task set is limited")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rt_lib plan", description=plan.__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=plan.__doc__.split("\n\n", 2)[2])
    ap.add_argument("--preset", default=plan.DEFAULT_PRESET, help="pipeline preset: smoke | cpu | paper (notebooks/presets/<name>.json)")
    ap.add_argument("--model", default=None, help="embedded kit name, local folder, GGUF file or Hugging Face id "
                                                  "(default: the recipe's)")
    ap.add_argument("--processes", type=int, default=1, help="data-parallel processes of the training run")
    ap.add_argument("--device", default=None, choices=("cuda", "cpu"),
                    help="device the run is for (default: cuda when a GPU is visible or --gpu-memory is given, or "
                         "when the recipe's backbone is bfloat16/float16; else cpu)")
    add_plan_arguments(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return plan.run(a.preset, json_path=a.plan_json, model=a.model, gpu_memory=a.gpu_memory, eval_tokens=a.eval_tokens,
                    processes=a.processes, device=a.device)

