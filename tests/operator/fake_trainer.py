"""A stand-in for `kubetune run RECIPE --config FILE` (a test double of the trainer, not of the
local backend): it serves the trainer's metric names over prometheus_client on the config's
metrics_port and writes the termination summary, as docs/architecture.md specifies.

Environment knobs: FAKE_PAUSE_AT (step) + FAKE_GO_FILE (waits there until the file exists),
FAKE_EXIT_CODE, FAKE_STEP_SECONDS.
"""
import json
import os
import sys
import time
from pathlib import Path

import yaml
from prometheus_client import Gauge, start_http_server


def main() -> int:
    recipe, flag, config_path = sys.argv[1:4]
    assert flag == "--config"
    cfg = yaml.safe_load(Path(config_path).read_text())
    gauges = {
        name: Gauge(f"kubetune_train_{name}", name)
        for name in ("step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_second", "last_checkpoint_step")
    }
    start_http_server(cfg["metrics_port"], addr="127.0.0.1")
    total = cfg["max_steps"]
    gauges["total_steps"].set(total)
    pause_at = int(os.environ.get("FAKE_PAUSE_AT", "0"))
    go_file = os.environ.get("FAKE_GO_FILE")
    loss = 0.0
    for step in range(1, total + 1):
        loss = 4.0 / step
        gauges["step"].set(step)
        gauges["loss"].set(loss)
        gauges["learning_rate"].set(cfg["optimizer"]["lr"])
        gauges["tokens_per_second"].set(100.0 * step)
        if step == pause_at and go_file:
            while not Path(go_file).exists():
                time.sleep(0.05)
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0.05")))
    exit_code = int(os.environ.get("FAKE_EXIT_CODE", "0"))
    if exit_code:
        print("boom: the fake trainer was told to fail", flush=True)
        return exit_code
    output = Path(cfg["output_dir"])
    output.mkdir(parents=True, exist_ok=True)
    summary = {"finalLoss": loss, "evalLoss": None, "steps": total, "checkpoint": str(output / "model"),
               "adapter": None, "tokensPerSecond": 100.0 * total}
    Path(os.environ["KUBETUNE_TERMINATION_LOG"]).write_text(json.dumps(summary) + "\n")
    time.sleep(0.6)  # keep serving a moment so the last gauges are scraped, as the real exporter does
    return 0


if __name__ == "__main__":
    sys.exit(main())
