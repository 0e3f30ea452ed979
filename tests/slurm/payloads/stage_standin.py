"""Stand-in for one stage of the pipeline in the chain tests (no torch: it starts in a blink).

It refuses to start without the previous stage's export (as wurst-train does), then writes its own
export (model.safetensors, config.json, provenance.json with start/finish times) into
<pipeline-dir>/<stage>/export; ``--pipeline-json`` also writes <pipeline-dir>/pipeline.json;
``--fail`` exits 1 instead, as a crashed stage would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline-dir", required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--needs", default=None)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--fail", action="store_true")
    parser.add_argument("--pipeline-json", nargs="*", default=None, metavar="STAGE")
    args = parser.parse_args()

    pipeline = Path(args.pipeline_dir)
    started = time.time()
    if args.needs:
        need = pipeline / args.needs / "export" / "model.safetensors"
        if not need.is_file():
            print(f"{args.stage} needs {need}; run {args.needs} first", file=sys.stderr)
            return 3
    time.sleep(args.seconds)
    if args.fail:
        print(f"{args.stage}: simulated failure", file=sys.stderr)
        return 1
    export = pipeline / args.stage / "export"
    export.mkdir(parents=True, exist_ok=True)
    (export / "model.safetensors").write_bytes(b"stand-in weights for " + args.stage.encode())
    (export / "config.json").write_text(json.dumps({"_target_": "standin", "stage": args.stage}))
    provenance = {
        "stage": args.stage,
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "needs": args.needs,
        "node": os.environ.get("SLURMD_NODENAME"),
        "started": started,
        "finished": time.time(),
    }
    (export / "provenance.json").write_text(json.dumps(provenance))
    if args.pipeline_json is not None:
        (pipeline / "pipeline.json").write_text(json.dumps({"stages": args.pipeline_json}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
