"""The evidence run's command line, ``python -m rt_lib evidence`` (the run: ``rt_lib.evidence.run``)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from rt_lib.cli.flags import add_deprecated_alias
from rt_lib.evidence import run as evidence_run
from rt_lib.evidence.calibration import BISECTION_STEPS
from rt_lib.evidence.run import (CALIBRATION_BLOCKS, HELDOUT_BLOCKS, STATIC_DROP_SAMPLES,
                                 TARGET_LAYERS, Evidence, routers_of)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=evidence_run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run folder (created; an existing one is continued)")
    ap.add_argument("--routers", required=True, help="router checkpoint folder, or a run folder with train/routers")
    ap.add_argument("--compare", nargs="*", default=[], help="run folders of other routers for the held-out loss")
    ap.add_argument("--tasks", default=None, help="comma list (default: all eight)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--heldout-blocks", type=int, default=HELDOUT_BLOCKS)
    ap.add_argument("--calibration-blocks", type=int, default=CALIBRATION_BLOCKS)
    ap.add_argument("--bisection-steps", type=int, default=BISECTION_STEPS,
                    help="threshold evaluations on the calibration blocks per target")
    ap.add_argument("--calibration-tolerance", type=float, default=0.0,
                    help="stop a threshold's calibration once it skips within this many layers of its target "
                         "(0: plain bisection)")
    ap.add_argument("--static-drop-samples", type=int, default=STATIC_DROP_SAMPLES,
                    help="256-token Wikipedia blocks scoring the static drop's attention importance")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (a smoke run)")
    ap.add_argument("--combine-only", action="store_true",
                    help="only rebuild eval/ and the measures from the parts written so far")
    ap.add_argument("--task-set", default=evidence_run.TASK_SET, help="evidence (0-shot; a seeded sample of 1,000 "
                    "documents of larger splits) or evidence-whole (0-shot, whole splits); rt_lib.evaluation.tasks")
    add_deprecated_alias(ap, "--task-preset", "--task-set")
    ap.add_argument("--routing-input", default="context",
                    help="context (default) or context+continuation: what a sequence router decides from "
                         "when a task is scored (docs/method.md)")
    ap.add_argument("--targets", default=",".join(map(str, TARGET_LAYERS)),
                    help="skipped attention sublayers per sequence, comma list")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ev = Evidence(a.out, routers_of(Path(a.routers)), dtype=a.dtype, batch_size=a.batch_size,
                  tasks=a.tasks.split(",") if a.tasks else None, compare=a.compare,
                  targets=[int(t) for t in a.targets.split(",")], heldout_blocks=a.heldout_blocks,
                  calibration_blocks=a.calibration_blocks, limit=a.limit, task_set=a.task_set,
                  routing_input=a.routing_input, bisection_steps=a.bisection_steps,
                  calibration_tolerance=a.calibration_tolerance, static_drop_samples=a.static_drop_samples)
    start = time.perf_counter()
    if a.combine_only:
        if not (ev.dir / "plan.json").is_file():
            raise FileNotFoundError(f"{ev.dir / 'plan.json'} does not exist: there is no evidence run to combine in "
                                    f"{a.out}; run without --combine-only first")
        ev.plan()  # the parts are combined only under the settings they were scored with
        table = ev.combine()
    else:
        table = ev.run()
    print(table.to_string(index=False))
    print(f"evidence run finished in {time.perf_counter() - start:.0f} s: {a.out}")
    return 0
