"""A LoRA job on the full SST-2 training set through a real studio (web + Celery worker), timed.

Reports wall time (submit → succeeded, and the trainer's own train_runtime), samples/s and dev accuracy.
Usage: python bench/sst2_job.py [--dropout-on]  (prints one JSON line; numbers go into docs/benchmarks.md)
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.studio import SHARED_DATA, run_studio, wait_for_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--dropout-on", action="store_true", help="Keep the model's dropout and LoRA dropout 0.1."
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, run_studio(Path(folder) / "data") as studio:
        api = studio.client(timeout=600)
        ids = []
        for name in ("train.csv", "dev.csv"):
            path = SHARED_DATA / "sst2" / name
            upload = api.post("/api/v1/datasets", files={"file": (f"sst2-{name}", path.read_bytes())})
            upload.raise_for_status()
            ids.append(upload.json()["id"])
        spec = {
            "dataset_id": ids[0],
            "validation_dataset_id": ids[1],
            "method": "lora",
            "method_config": {
                "r": 8,
                "alpha": 16,
                "dropout": 0.1 if options.dropout_on else 0.0,
                "target_modules": ["query", "key", "value", "dense"],
            },
            "training": {
                "num_epochs": 1,
                "batch_size": 32,
                "learning_rate": 5e-4,
                "max_length": 128,
                "logging_steps": 20,
                "disable_dropout": not options.dropout_on,
            },
        }
        submitted = time.monotonic()
        created = api.post("/api/v1/jobs", json=spec)
        created.raise_for_status()
        job = wait_for_job(api, created.json()["id"], timeout=3600)
        wall = time.monotonic() - submitted
        points = api.get(f"/api/v1/jobs/{job['id']}/metrics").json()
        evals = [p["values"] for p in points if p["split"] == "eval"]
        started = job["started_at"]
        print(
            json.dumps(
                {
                    "status": job["status"],
                    "error": job["error"],
                    "submit_to_done_s": round(wall, 1),
                    "started_at": started,
                    "finished_at": job["finished_at"],
                    "steps": job["current_step"],
                    "dev_accuracy": evals[-1].get("accuracy") if evals else None,
                    "dev_f1_macro": evals[-1].get("f1_macro") if evals else None,
                    "train_samples_per_second": round(6920 / wall, 1),
                    "dropout_on": options.dropout_on,
                }
            )
        )


if __name__ == "__main__":
    main()
